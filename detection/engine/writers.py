"""Deprecated: the run-folder layout moved to `detection.engine.run_folder` and the journal
primitives to `detection.engine.journal`; the old names here warn and still work."""
from __future__ import annotations

from detection.deprecation import forward_moved_names

_JOURNAL = ("repair_journal", "read_journal", "Journal")
_RUN_FOLDER = ("RUN_FILE", "PREDICTIONS_FILE", "ERRORS_FILE", "DETECTIONS_FILE", "PARTS_DIR", "RunFolderMismatch",
               "fingerprint_mismatch", "RunFolder", "error_record", "coco_results")

__getattr__ = forward_moved_names(__name__, {
    **{name: f"detection.engine.journal:{name}" for name in _JOURNAL},
    **{name: f"detection.engine.run_folder:{name}" for name in _RUN_FOLDER},
})
