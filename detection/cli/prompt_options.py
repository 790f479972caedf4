"""--prompt / --prompt-file: the phrases of an open-vocabulary detector, for every verb that loads one."""
from __future__ import annotations

import argparse

from detection.models.hf.prompt import parse_prompt, read_prompt_file


def add_prompt_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", metavar="TEXT",
                       help='the classes of an open-vocabulary detector (OWL-ViT, OWLv2, Grounding DINO, '
                            'OmDet-Turbo): phrases separated by ".", e.g. "cat. remote control."; category_id = the phrase\'s index (docs/prompted.md)')
    group.add_argument("--prompt-file", metavar="FILE", help="the prompt's phrases, one per line")


def prompt_from_args(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The phrases given (None: neither option); PromptError (a ValueError) for an empty prompt or an
    unreadable file, naming it."""
    if args.prompt is not None:
        return parse_prompt(args.prompt)
    if args.prompt_file is not None:
        return read_prompt_file(args.prompt_file)
    return None
