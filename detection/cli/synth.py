"""`detr-attn synth`: options, messages and exit statuses around `data.synthetic.generate_dataset`.

Exit status: 0 written; 2 bad option, or --out holds files and --overwrite was not given.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from detection.cli.vocabulary import add_quiet, examples
from detection.data.synthetic import SynthConfig, generate_dataset


EXAMPLES = examples(
    'detr-attn synth --out data/shapes --train 1000 --val 200 --seed 1',
    'detr-attn synth --out data/shapes --train 10 --val 5 --overwrite',
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--train", type=int, default=1000, help="number of training images")
    parser.add_argument("--val", type=int, default=200, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=SynthConfig.image_size, help="nominal image side (px)")
    parser.add_argument("--size-jitter", type=float, default=SynthConfig.size_jitter,
                        help="each side drawn in image_size * [1-j, 1+j]")
    parser.add_argument("--min-objects", type=int, default=SynthConfig.min_objects)
    parser.add_argument("--max-objects", type=int, default=SynthConfig.max_objects)
    parser.add_argument("--difficulty", type=float, default=SynthConfig.difficulty,
                        help="0 (plain backgrounds, large shapes) .. 1 (clutter, occlusion, small shapes)")
    parser.add_argument("--min-object-size", type=float, default=None, help="min object extent (px)")
    parser.add_argument("--max-object-size", type=float, default=None, help="max object extent (px)")
    add_quiet(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the train/, val/ and annotations/ folders an earlier synth wrote in --out "
                             "(without it, a non-empty --out is refused)")


def run(args: argparse.Namespace) -> int:
    try:
        config = SynthConfig(
            image_size=args.image_size, size_jitter=args.size_jitter, min_objects=args.min_objects,
            max_objects=args.max_objects, difficulty=args.difficulty,
            min_object_size=args.min_object_size, max_object_size=args.max_object_size,
        )
    except ValueError as error:
        print(f"detr-attn synth: {error}")
        return 2
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.overwrite or not out.is_dir():
            print(f"detr-attn synth: --out {out} is not an empty folder: its old images would stay beside the new "
                  f"annotations; give an empty or new folder, or --overwrite to replace an earlier synth's data")
            return 2
        for name in ("train", "val", "annotations"):  # what synth writes; nothing else is touched
            shutil.rmtree(out / name, ignore_errors=True)
    generate_dataset(args.out, args.train, args.val, args.seed, config, progress=not args.quiet)
    print(f"wrote {args.train} train + {args.val} val images to {args.out}")
    return 0
