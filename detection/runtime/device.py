"""The one place that chooses a device and a numeric precision, and knows bf16 support.

Precision names: "fp32" | "bf16" | "fp16". "auto" resolves to bf16 where the hardware runs
it natively (CUDA with bf16, CPU with AVX512-BF16 or AMX), else fp32.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX512-BF16 / AMX) on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """"auto" -> cuda when available, else cpu. A bare "cuda" becomes "cuda:<local_rank>"
    when a torchrun local rank is given. Asking for CUDA without CUDA is a ValueError."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available (use --device cpu or auto)")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware runs it natively, else fp32. Explicit choices are
    checked and pass through."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)} or 'auto', got {precision!r}")
    return precision


def precision_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
    return PRECISION_DTYPES[precision]


def autocast(device: torch.device, precision: str, training: bool = False) -> ContextManager:
    """Autocast for `precision` on `device` (a no-op context for fp32).

    training=True refuses fp16 off CUDA (no loss scaling on CPU; use bf16 there).
    """
    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return nullcontext()
    if training and precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)
