"""Keep freed CPU memory for reuse instead of returning it to the OS (glibc malloc tuning), so
steady-state forward passes do not page-fault their large activations in again."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# glibc stores the trim threshold in a size_t but mallopt takes an int: the largest int is
# 2 GiB, far above any heap top we free at once.
_TRIM_THRESHOLD_BYTES = 2**31 - 1

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Set glibc's `M_MMAP_MAX = 0` (every block from the heap) and a very large
    `M_TRIM_THRESHOLD` (freed heap memory is kept) once per process; True if in effect.

    glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh `mmap`
    and unmaps it on free, so each forward pass would fault in and zero its big activations
    again; with these settings the same memory is reused from the second batch on (figures:
    README, Speed). The cost: the process keeps its peak heap until it exits. Opt out with
    `DETR_ATTN_MALLOC=default`; a no-op elsewhere than glibc (macOS, Windows, musl).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DETR_ATTN_MALLOC", "").strip().lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    return _applied
