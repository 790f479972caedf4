"""Deprecated: `detr-attn weights` moved to `detection.cli.weights`; `add_arguments` and `run`
here warn and still work."""
from __future__ import annotations

from detection.deprecation import forward_moved_names

__getattr__ = forward_moved_names(__name__, {name: f"detection.cli.weights:{name}" for name in ("add_arguments", "run")})
