#!/usr/bin/env python
"""Thin wrapper: `python scripts/train.py ARGS` == `detr-attn train ARGS` (works under torchrun:
`torchrun --nproc_per_node 2 scripts/train.py --config ... --out ...`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
