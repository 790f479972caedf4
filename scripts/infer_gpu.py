#!/usr/bin/env python
"""`detr-attn predict` with GPU-oriented defaults: --device cuda --precision bf16
--batch-size 16 --workers 8 --batching padded. Any option given on the command line wins.

    python scripts/infer_gpu.py IMAGES... --out DIR [--model demo] [--overlays] ...
    torchrun --nproc_per_node 8 scripts/infer_gpu.py IMAGES... --out DIR   # one GPU per rank

Padded batching is the default here because GPU throughput needs full batches and varied
image sizes rarely share an exact shape; use --batching exact for results identical to
one-image-at-a-time runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.cli import main  # noqa: E402

GPU_DEFAULTS = {"--device": "cuda", "--precision": "bf16", "--batch-size": "16", "--workers": "8",
                "--batching": "padded"}


def with_gpu_defaults(argv: list[str]) -> list[str]:
    """Append each GPU default whose option the user did not give (as --opt or --opt=value)."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    extra: list[str] = []
    for option, value in GPU_DEFAULTS.items():
        if option not in given:
            extra += [option, value]
    return argv + extra


if __name__ == "__main__":
    sys.exit(main(["predict", *with_gpu_defaults(sys.argv[1:])]))
