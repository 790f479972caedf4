"""Deprecated: `detr-attn weights` moved to `detection.cli.weights`; `add_arguments` and `run`
here warn and still work."""
from __future__ import annotations

import importlib
import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    if name not in ("add_arguments", "run"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"detection.models.weights_cli.{name} moved to detection.cli.weights.{name}",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("detection.cli.weights"), name)
