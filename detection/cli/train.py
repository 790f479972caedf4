"""`detr-attn train`: train or fine-tune a DETR on COCO-format data.

    detr-attn train --data DIR --out RUN_DIR [--init NAME|PATH] [--epochs N] [--batch-size B] [--lr LR] [--compile]
    detr-attn train --config configs/train/demo.yaml [--set key=value ...] --out RUN_DIR [--resume]

`--data DIR` is the layout `detr-attn synth` writes (DIR/train, DIR/val,
DIR/annotations/instances_{train,val}.json). The settings are, in order of precedence: the
flags (--data, --init, --epochs, --batch-size, --lr, --compile), then --set, then --config, then the
defaults (`detection.train.config.DEFAULTS`). The run folder and exact resume are described in
`detection.train.loop.train`.

Exit status: 0 trained; 2 bad option, config, data layout or --init.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from detection.cli.vocabulary import examples
from detection.train.config import FROM_SCRATCH_MODEL, SCHEDULES, coco_folder_data, load_train_config
from detection.train.loop import train

_SCRATCH, _FINE_TUNE = SCHEDULES["scratch"], SCHEDULES["fine-tune"]
DESCRIPTION = f"""train or fine-tune a DETR model

Which model trains:
  with --init NAME|PATH   those weights are fine-tuned: lr {_FINE_TUNE['lr']:.0e}, backbone lr {_FINE_TUNE['lr_backbone']:.0e},
                          {_FINE_TUNE['warmup_steps']} warm-up steps (unless --lr or --set optim.* say otherwise); with a
                          validation set the weights are evaluated before the first step too, so the
                          run ends by printing the AP before and after
  without --init          {FROM_SCRATCH_MODEL} (configs/models/{FROM_SCRATCH_MODEL}.yaml) from random weights: lr {_SCRATCH['lr']:.0e},
                          backbone lr {_SCRATCH['lr_backbone']:.0e}, no warm-up (--set model=NAME: another architecture)
The first log line and RUN_DIR/config.yaml (model, init, optim) say which it was."""

EXAMPLES = examples(
    'detr-attn train --data data/shapes --out runs/tiny',
    'detr-attn train --data data/mine --init detr-r50 --out runs/finetune --epochs 20',
    'detr-attn train --config configs/train/demo.yaml --out runs/demo --resume',
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="DIR",
                        help="COCO-format dataset: DIR/train, DIR/val, DIR/annotations/instances_{train,val}.json "
                             "(the layout `detr-attn synth` writes; without val, no evaluation)")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, model/)")
    parser.add_argument("--init", metavar="NAME|PATH",
                        help="fine-tune these weights (a published name such as detr-r50, 'demo', a native or HF "
                             "folder, an authors' .pth, a training .pt); the class head is replaced when the "
                             "data's categories differ")
    parser.add_argument("--epochs", type=int, help="number of epochs (optim.epochs)")
    parser.add_argument("--batch-size", type=int, help="images per optimiser step and rank (optim.batch_size)")
    parser.add_argument("--lr", type=float, help=f"learning rate of the transformer and heads (optim.lr; default "
                                                 f"{_SCRATCH['lr']:.0e} from random weights, {_FINE_TUNE['lr']:.0e} with --init)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model for training (inductor: a C++ compiler on CPU, Triton "
                             "on CUDA); the first steps and each new input shape take longer")
    parser.add_argument("--config", help="train config YAML (configs/train/*.yaml); with --resume "
                                         "defaults to RUN_DIR/config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted keys, YAML values (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    parser.add_argument("--kill-after-step", type=int, default=None, help=argparse.SUPPRESS)


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as config keys (they win over --set and --config); raises ValueError for --data."""
    values: dict[str, Any] = coco_folder_data(args.data) if args.data else {}
    for key, value in (("init", args.init), ("optim.epochs", args.epochs),
                       ("optim.batch_size", args.batch_size), ("optim.lr", args.lr),
                         ("compile", True if args.compile else None)):
        if value is not None:
            values[key] = value
    return values


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = args.config
    if config_path is None and args.resume:
        config_path = Path(args.out) / "config.yaml"
    if config_path is None and not args.data:
        print("detr-attn train: give --data DIR (or --config FILE, or --resume with an existing run folder)",
              file=sys.stderr)
        return 2
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--lr", args.lr)):
        if value is not None and value <= 0:
            print(f"detr-attn train: {flag} must be positive, got {value}", file=sys.stderr)
            return 2
    try:
        values = _flag_values(args)
        config = load_train_config(config_path, args.set, values)
    except ValueError as error:
        print(f"detr-attn train: {error}", file=sys.stderr)
        return 2
    try:
        summary = train(config, args.out, resume=args.resume, kill_after_step=args.kill_after_step)
    except (ValueError, FileNotFoundError) as error:  # bad init name, trainable_layers, annotations ...
        print(f"detr-attn train: {error}", file=sys.stderr)
        return 2
    if summary["rank"] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "rank"}, default=float))
        before, after = summary.get("initial_metrics"), summary.get("metrics")
        if before and after:
            print(f"AP {before['AP']:.3f} -> {after['AP']:.3f}, AP50 {before['AP50']:.3f} -> {after['AP50']:.3f} "
                  f"(the --init weights before training -> the trained model, on {after['num_images']} "
                  f"validation images)")
    return 0
