#!/usr/bin/env python
"""Thin wrapper: `python scripts/eval_coco_subset.py ARGS` == `detr-attn eval ARGS`.

Examples:
    python scripts/eval_coco_subset.py --model demo --ann synth/annotations/instances_val.json \
        --images synth/val --out runs/eval_demo
    python scripts/eval_coco_subset.py --detections results.json --ann instances_val2017.json \
        --random 500 --seed 0 --categories person dog --out runs/eval_subset
"""
import sys

from detection.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
