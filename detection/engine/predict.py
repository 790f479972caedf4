"""Backwards-compatible home of the batch prediction API, now split by job: `predictor`
(Predictor), `outputs` (record + per-image files), `predict_run` (run_predict), `cli.predict`.
"""
from __future__ import annotations

from detection.deprecation import forward_moved_names
from detection.engine.outputs import OutputOptions, detection_record, write_image_outputs
from detection.engine.predict_run import PredictSettings, PredictSummary, PredictUsageError, run_predict
from detection.engine.predictor import PredictionResult, Predictor

__all__ = ["OutputOptions", "PredictSettings", "PredictSummary", "PredictUsageError", "PredictionResult",
           "Predictor", "detection_record", "run_predict", "write_image_outputs"]

__getattr__ = forward_moved_names(__name__, {
    "weights_digest": "detection.models.digest:weights_digest",
    "resolve_precision": "detection.runtime.device:resolve_precision",
    **{name: f"detection.cli.predict:{name}" for name in ("add_arguments", "run", "settings_from_args", "EXIT_OK",
                                                          "EXIT_SOME_FAILED", "EXIT_USAGE", "EXIT_CRASH")},
})
