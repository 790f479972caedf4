"""detection: DETR/ViT detectors that expose per-detection attention as saliency maps.

Public entry points are re-exported lazily so that `import detection` stays cheap.
"""
from __future__ import annotations

import importlib

from detection.version import __version__  # noqa: F401 (the package version)

_LAZY = {
    "Detections": "detection.structures",
    "AttentionRecord": "detection.models.outputs",
    "SampledAttention": "detection.models.outputs",
    "load_model": "detection.models.registry",
    "build_model": "detection.models.registry",
    "postprocess": "detection.postprocess",
    "Detector": "detection.models.contract",
    "PreprocessSpec": "detection.models.contract",
    "PostprocessRule": "detection.models.contract",
    "explain": "detection.api",
    "Explanation": "detection.api",
}


def __dir__() -> list[str]:
    """The lazy exports too, so that `dir(detection)` and tab completion find `explain`."""
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detection' has no attribute {name!r}")
