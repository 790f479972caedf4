"""The CLI's shared vocabulary: one spelling per option across verbs (old spellings kept as hidden
aliases for scripts), what --model accepts, and help that shows defaults and ends with examples."""
from __future__ import annotations

import argparse

#: What every verb's --model accepts.
MODEL_HELP = ("the detector: 'demo' or 'hard' (shipped), a published name (detr-r50, detr-r50-dc5, detr-r101, "
              "detr-r101-dc5, downloaded once), a native model folder, an authors' .pth, a Hugging Face "
              "folder (config.json + model.safetensors) or hf:ORG/NAME[@REVISION]")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; each option's default shown unless it is empty, off, or already said."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and text and text != argparse.SUPPRESS and "default" not in text.lower()
                and action.default not in (None, False, argparse.SUPPRESS, [], "")):
            text += " (default: %(default)s)"
        return text


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Options given without help text still show their default in --help."""
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its options there
        if (action.help is None and action.option_strings
                and action.default not in (None, False, argparse.SUPPRESS, [], "")):
            action.help = "(default: %(default)s)"


def add_quiet(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--quiet: no progress bars (--no-progress is its hidden older spelling)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def add_workers(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: int) -> None:
    """--workers: decoding processes (--num-workers is its hidden older spelling)."""
    parser.add_argument("--workers", type=int, default=default, help="image decoding processes (0: decode in "
                        "this process)")
    parser.add_argument("--num-workers", dest="workers", type=int, help=argparse.SUPPRESS)


def examples(*lines: str) -> str:
    """An epilog of example command lines."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)
