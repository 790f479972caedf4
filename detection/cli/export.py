"""`detr-attn export RUN_DIR --format coco-masks --out FILE [--ann GT.json] [--method M]` and
`detr-attn export RUN_DIR --format fiftyone --out DIR [--method M]`: options, messages and exit statuses around
`evaluation.mask_export.export_coco_masks` and `evaluation.fiftyone_export.export_fiftyone`.

Exit status: 0 written; 2 bad option, unreadable run folder, run without saved attention
(`predict --save-attention`), or a file name the ground truth does not know.
"""
from __future__ import annotations

import argparse
import sys
from detection.cli.vocabulary import examples
from detection.attention.methods import DEFAULT_METHOD


EXAMPLES = examples(
    'detr-attn export runs/photos --format coco-masks --out masks.json',
    'detr-attn export runs/photos --format fiftyone --out runs/photos_fo --method attn-grad',
)

FORMATS = ("coco-masks", "fiftyone")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `detr-attn predict --save-attention`")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="coco-masks: COCO results with the compressed-RLE Otsu explanation mask of each "
                             "detection; fiftyone: a dataset folder for fo.Dataset.from_dir(DIR, "
                             "dataset_type=fo.types.FiftyOneDataset) (masks + per-detection heatmaps)")
    parser.add_argument("--out", required=True, metavar="FILE|DIR",
                        help="results JSON to write (coco-masks) or dataset folder (fiftyone)")
    parser.add_argument("--method", default=DEFAULT_METHOD,
                        help="whose maps: raw (--save-attention, default) or a method saved by predict --explain "
                             "(rollout, attn-grad, relevance, drise)")
    parser.add_argument("--ann", default=None, metavar="GT.json",
                        help="COCO ground truth: take image ids from it by file name (default: the run's ids)")


def run(args: argparse.Namespace) -> int:
    from detection.evaluation.fiftyone_export import export_fiftyone
    from detection.evaluation.mask_export import export_coco_masks

    try:
        if args.format == "fiftyone":
            if args.ann is not None:
                raise ValueError("--ann applies to --format coco-masks only")
            count = export_fiftyone(args.run_dir, args.out, args.method)
            print(f"wrote a FiftyOne dataset of {count} samples to {args.out} "
                  "(fo.Dataset.from_dir(DIR, dataset_type=fo.types.FiftyOneDataset))")
            return 0
        results = export_coco_masks(args.run_dir, args.out, args.ann, args.method)
    except (FileNotFoundError, ValueError) as error:
        print(f"detr-attn export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(results)} explanation masks to {args.out}")
    return 0
