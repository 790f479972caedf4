"""`detr-attn report RUN_DIR`: options, messages and exit statuses around `render.report.write_report`.

Exit status: 0 written; 2 bad option, unreadable run folder, or (--viewer) no saved attention grids.
"""
from __future__ import annotations

import argparse
import sys

from detection.cli.vocabulary import examples
from detection.render.report import write_report
from detection.render.viewer import write_viewer


EXAMPLES = examples(
    'detr-attn report runs/photos',
    'detr-attn report runs/photos --viewer',
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `detr-attn predict`")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    parser.add_argument(
        "--link-images",
        action="store_true",
        help="refer to the run's overlay PNGs by relative path instead of embedding them (smaller HTML)",
    )
    parser.add_argument(
        "--pdf-max-images", type=int, default=50, help="images in the PDF (0: all; default 50)"
    )
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument(
        "--viewer",
        action="store_true",
        help="write only OUT/viewer.html: the interactive viewer (one offline file; needs a run made with "
        "--save-attention, and --save-encoder-attention for encoder maps)",
    )


def run(args: argparse.Namespace) -> int:
    if args.pdf_max_images < 0:
        print("detr-attn report: error: --pdf-max-images must be >= 0", file=sys.stderr)
        return 2
    if args.viewer:
        try:
            summary = write_viewer(args.run_dir, args.out, args.title)
        except (FileNotFoundError, ValueError) as error:
            print(f"detr-attn report: error: {error}", file=sys.stderr)
            return 2
        sizes = summary.bytes_per_image
        print(f"wrote {summary.path} ({summary.images} images, {summary.bytes_total / 1024:.0f} KiB; per image "
              f"{min(sizes) / 1024:.0f}-{max(sizes) / 1024:.0f} KiB)")
        if summary.skipped:
            print(f"detr-attn report: {summary.skipped} image(s) without saved grids left out", file=sys.stderr)
        return 0
    try:
        html_path, pdf_path = write_report(args.run_dir, args.out, args.link_images, args.pdf_max_images, args.title)
    except (FileNotFoundError, ValueError) as error:
        print(f"detr-attn report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {html_path}")
    print(f"wrote {pdf_path}")
    return 0
