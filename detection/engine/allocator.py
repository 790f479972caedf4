"""Keep freed CPU memory for reuse instead of returning it to the OS (glibc malloc tuning).

PyTorch's CPU tensors come from the C library's malloc. glibc serves every block larger than
its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps it on free, so each forward
pass of DETR-R50 at 800x1066 page-faults in and zeroes its big activations again (one bf16
stage-1 activation is 256 x 200 x 267 x 2 bytes = 27 MB). `retain_freed_memory()` sets
`M_MMAP_MAX = 0` (every block from the heap) and a very large `M_TRIM_THRESHOLD` (freed heap
memory is kept), so from the second batch on the same memory is reused without faults.

Measured with `scripts/bench.py --threads 2` against `DETR_ATTN_MALLOC=default` on the 2-vCPU
development machine (README, Speed): DETR-R50 bf16 with maps 0.291 -> 0.265 s/img, fp32
0.593 -> 0.482 s/img, HF fp32 1.136 -> 0.635 s/img. The cost: the process keeps its peak heap size until
it exits, which is what a batch-inference process wants anyway.

Opt out with the environment variable `DETR_ATTN_MALLOC=default`. Elsewhere than glibc (macOS,
Windows, musl) this is a no-op.
"""
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
    """Apply the glibc settings above once per process; True if they are in effect."""
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
