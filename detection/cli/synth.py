"""`detr-attn synth`: options, messages and exit statuses around `data.synthetic.generate_dataset`.

Exit status: 0 written; 2 bad option, or --out holds files and --overwrite was not given.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from detection.cli.vocabulary import add_quiet, examples
from detection.data.synthetic import SHAPE_SETS, SynthConfig, generate_dataset


EXAMPLES = examples(
    'detr-attn synth --out data/shapes --train 1000 --val 200 --seed 1',
    'detr-attn synth --out data/shapes --train 10 --val 5 --overwrite',
    'detr-attn synth --out data/hard --shapes hard --train 0 --val 0 --selection 80 --test 80 --seed 23',
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
    parser.add_argument("--selection", type=int, default=0,
                        help="number of selection-split images (choices are made on it, then frozen)")
    parser.add_argument("--test", type=int, default=0, help="number of test-split images")
    hard = parser.add_argument_group("hard shapes (--shapes hard)")
    hard.add_argument("--shapes", choices=SHAPE_SETS, default=SynthConfig.shapes,
                      help="convex: circle, triangle, square, star, cross; hard: also ring, frame, ell, u-shape, "
                           "chevron, crescent, bar (boxes that are not the mask), occluders, same-coloured "
                           "distractors, RLE masks")
    hard.add_argument("--convex-share", type=float, default=SynthConfig.convex_share,
                      help="chance that a hard image's object is convex (>= 0.3)")
    hard.add_argument("--stroke-cells", type=float, default=SynthConfig.stroke_cells,
                      help="narrowest stroke of a hard shape in feature cells of the model below")
    hard.add_argument("--feature-stride", type=int, default=SynthConfig.feature_stride,
                      help="the model's feature stride in pixels (demo model: 16)")
    hard.add_argument("--model-min-size", type=int, default=SynthConfig.model_min_size,
                      help="the model's shortest-edge resize (demo model: 160)")
    hard.add_argument("--model-max-size", type=int, default=SynthConfig.model_max_size,
                      help="the model's longest-edge cap (demo model: 240)")
    add_quiet(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the train/, val/, selection/, test/ and annotations/ folders an earlier synth wrote in --out "
                             "(without it, a non-empty --out is refused)")


def run(args: argparse.Namespace) -> int:
    try:
        config = SynthConfig(
            image_size=args.image_size, size_jitter=args.size_jitter, min_objects=args.min_objects,
            max_objects=args.max_objects, difficulty=args.difficulty,
            min_object_size=args.min_object_size, max_object_size=args.max_object_size, shapes=args.shapes,
            convex_share=args.convex_share, stroke_cells=args.stroke_cells, feature_stride=args.feature_stride,
            model_min_size=args.model_min_size, model_max_size=args.model_max_size,
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
        for name in ("train", "val", "selection", "test", "annotations"):  # what synth writes; nothing else is touched
            shutil.rmtree(out / name, ignore_errors=True)
    generate_dataset(args.out, args.train, args.val, args.seed, config, progress=not args.quiet,
                     selection=args.selection, test=args.test)
    extra = "".join(f" + {count} {name}" for name, count in (("selection", args.selection), ("test", args.test)) if count)
    print(f"wrote {args.train} train + {args.val} val{extra} images to {args.out}")
    return 0
