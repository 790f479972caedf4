"""detr-attn: run DETR-family detectors on images and see where each detection looks (saliency maps, overlays, reports).

The command line: one module per verb, each a thin shell around one library call.

`detection.cli.<verb>` holds the verb's options, messages and exit statuses and nothing else.

Each verb module provides `add_arguments(parser)` and `run(args) -> int` (the exit status).
Modules are imported only when their verb runs, so `detr-attn --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from detection.cli.vocabulary import HelpFormatter, show_defaults
from detection.version import __version__

VERBS: dict[str, tuple[str, str]] = {
    "predict": ("detection.cli.predict", "detect objects and save detections, attention maps, overlays"),
    "eval": ("detection.cli.eval", "COCO-subset evaluation: pycocotools AP + attention faithfulness"),
    "train": ("detection.cli.train", "train or fine-tune a DETR model"),
    "synth": ("detection.cli.synth", "generate a synthetic COCO-format dataset"),
    "report": ("detection.cli.report", "build an HTML + PDF report from a predict run folder"),
    "weights": ("detection.cli.weights", "list, download, convert and verify checkpoints"),
    "export": ("detection.cli.export", "export a predict run: COCO explanation masks (RLE) or a FiftyOne dataset"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-attn", description=__doc__.splitlines()[0],
                                     epilog="`detr-attn VERB --help` shows a verb's options, defaults and examples")
    parser.add_argument("--version", action="version", version=f"detr-attn {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, (module_name, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        build_parser().parse_args(argv)  # prints usage / help and exits
        return 2
    verb, rest = argv[0], argv[1:]
    module, parser = verb_parser(verb)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


def verb_parser(verb: str) -> tuple[object, argparse.ArgumentParser]:
    """The verb's module (imported now) and its parser: options, defaults shown, examples."""
    module = importlib.import_module(VERBS[verb][0])
    parser = argparse.ArgumentParser(prog=f"detr-attn {verb}", description=getattr(module, "DESCRIPTION", VERBS[verb][1]),
                                     formatter_class=HelpFormatter, epilog=getattr(module, "EXAMPLES", None))
    module.add_arguments(parser)
    show_defaults(parser)
    return module, parser

