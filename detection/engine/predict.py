"""Backwards-compatible home of the batch prediction API, now split by job: `predictor`
(Predictor), `outputs` (record + per-image files), `predict_run` (run_predict), `cli.predict`.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

from detection.engine.outputs import OutputOptions, detection_record, write_image_outputs
from detection.engine.predict_run import PredictSettings, PredictSummary, PredictUsageError, run_predict
from detection.engine.predictor import PredictionResult, Predictor

__all__ = ["OutputOptions", "PredictSettings", "PredictSummary", "PredictUsageError", "PredictionResult",
           "Predictor", "detection_record", "run_predict", "write_image_outputs"]

# old name -> (module that holds it now, its name there); reading one warns
_DEPRECATED = {
    "weights_digest": ("detection.models.digest", "weights_digest"),
    "resolve_precision": ("detection.runtime.device", "resolve_precision"),
    "add_arguments": ("detection.cli.predict", "add_arguments"),
    "run": ("detection.cli.predict", "run"),
    "settings_from_args": ("detection.cli.predict", "settings_from_args"),
    "EXIT_OK": ("detection.cli.predict", "EXIT_OK"),
    "EXIT_SOME_FAILED": ("detection.cli.predict", "EXIT_SOME_FAILED"),
    "EXIT_USAGE": ("detection.cli.predict", "EXIT_USAGE"),
    "EXIT_CRASH": ("detection.cli.predict", "EXIT_CRASH"),
}


def __getattr__(name: str) -> Any:
    if name not in _DEPRECATED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, new_name = _DEPRECATED[name]
    warnings.warn(f"detection.engine.predict.{name} is deprecated; use {module_name}.{new_name}",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module_name), new_name)
