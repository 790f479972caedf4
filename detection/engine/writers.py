"""Deprecated: the run-folder layout moved to `detection.engine.run_folder` and the journal
primitives to `detection.engine.journal`; the old names here warn and still work."""
from __future__ import annotations

import warnings
from typing import Any

from detection.engine import journal, run_folder

_MOVED = {
    "repair_journal": journal, "read_journal": journal, "Journal": journal,
    "RUN_FILE": run_folder, "PREDICTIONS_FILE": run_folder, "ERRORS_FILE": run_folder,
    "DETECTIONS_FILE": run_folder, "PARTS_DIR": run_folder, "RunFolderMismatch": run_folder,
    "fingerprint_mismatch": run_folder, "RunFolder": run_folder, "error_record": run_folder,
    "coco_results": run_folder,
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"detection.engine.writers.{name} moved to {module.__name__}.{name}",
                  DeprecationWarning, stacklevel=2)
    return getattr(module, name)
