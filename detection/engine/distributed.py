"""Deprecated: the torchrun context lives in `detection.runtime.distributed` (`DistContext`,
`init_distributed`); `init_from_env` here warns and calls `init_distributed()`."""
from __future__ import annotations

import warnings

from detection.runtime.distributed import DistContext, init_distributed

__all__ = ["DistContext", "init_from_env"]


def init_from_env(timeout_hours: float = 24.0) -> DistContext:
    """Deprecated alias of `detection.runtime.distributed.init_distributed(backend="gloo")`."""
    warnings.warn("detection.engine.distributed.init_from_env is deprecated; use "
                  "detection.runtime.distributed.init_distributed()", DeprecationWarning, stacklevel=2)
    return init_distributed(backend="gloo", timeout_hours=timeout_hours)
