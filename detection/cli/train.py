"""`detr-attn train`: train or fine-tune a DETR on COCO-format data.

    detr-attn train --config configs/train/demo.yaml [--set key=value ...] --out RUN_DIR [--resume]

The run folder and exact resume are described in `detection.train.loop.train`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from detection.train.config import load_train_config
from detection.train.loop import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="train config YAML (configs/train/*.yaml); with --resume "
                                         "defaults to RUN_DIR/config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted keys, YAML values (repeatable)")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, model/)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    parser.add_argument("--kill-after-step", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = args.config
    if config_path is None and args.resume:
        config_path = Path(args.out) / "config.yaml"
    if config_path is None:
        print("detr-attn train: --config is required (or --resume with an existing run folder)", file=sys.stderr)
        return 2
    try:
        config = load_train_config(config_path, args.set)
    except ValueError as error:
        print(f"detr-attn train: {error}", file=sys.stderr)
        return 2
    summary = train(config, args.out, resume=args.resume, kill_after_step=args.kill_after_step)
    if summary["rank"] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "rank"}, default=float))
    return 0
