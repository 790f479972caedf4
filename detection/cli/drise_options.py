"""The D-RISE options shared by `detr-attn eval` and `detr-attn predict` (`--explain ...,drise`)."""
from __future__ import annotations

import argparse

from detection.attention.drise_saliency import FILLS, DriseOptions


def add_drise_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser, default_precision: str) -> None:
    """--drise-masks/-grid/-probability/-seed/-batch-size/-precision; `default_precision` says in
    the help what an unset --drise-precision means."""
    group.add_argument("--drise-masks", type=int, default=1000, help="D-RISE: number of random masks per image (default 1000)")
    group.add_argument("--drise-grid", type=int, default=16, help="D-RISE: random grid cells per side (default 16)")
    group.add_argument("--drise-probability", type=float, default=0.5, help="D-RISE: share of grid cells kept (default 0.5)")
    group.add_argument("--drise-fill", choices=FILLS, default="black",
                       help="D-RISE: what masked pixels become: black (the paper's) or the image's mean colour "
                            "(the substrate of eval's deletion / insertion curves)")
    group.add_argument("--drise-seed", type=int, default=0, help="D-RISE: seed of the masks (default 0)")
    group.add_argument("--drise-batch-size", type=int, help="D-RISE: masked copies per forward pass (default: by input size, <= 64)")
    group.add_argument("--drise-precision", choices=("fp32", "bf16", "fp16", "auto"),
                       help=f"D-RISE forward passes through the fast path (default: {default_precision}; bf16 pays off "
                            "on CUDA and for ResNet-50 on AVX512-BF16 CPUs, not for the demo model on a CPU)")


def drise_options(args: argparse.Namespace) -> DriseOptions:
    """DriseOptions of parsed --drise-* options (ValueError names the bad value)."""
    return DriseOptions(num_masks=args.drise_masks, grid_size=args.drise_grid, probability=args.drise_probability,
                        seed=args.drise_seed, batch_size=args.drise_batch_size, fill=args.drise_fill)
