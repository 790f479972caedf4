"""Text prompts of open-vocabulary detectors: one rule that splits a prompt into phrases, for every
family, and the errors a bad prompt gets (empty, unreadable, beyond the text encoder's limit)."""
from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from detection.models.hf.detector import HFDetectorConfig

PROMPT_EXAMPLE = '--prompt "cat. remote control."'


@dataclass(frozen=True)
class PromptedConfig(HFDetectorConfig):
    """An HFDetectorConfig whose classes are a prompt's phrases: class_names[i] = prompt[i],
    category_ids[i] = i (the phrase's index in the prompt). query_meaning: what query_index is."""

    prompt: tuple[str, ...] = ()
    query_meaning: str = ""

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        values["prompt"] = list(self.prompt)
        return values


class PromptError(ValueError):
    """A prompt that cannot be used; the message says why (and names the file or the limit)."""


def parse_prompt(text: str) -> tuple[str, ...]:
    """'cat. remote control.' -> ('cat', 'remote control'): phrases separated by '.', each stripped
    of surrounding white space, inner white space collapsed to one space, empty pieces dropped.
    Raises PromptError when no phrase is left."""
    phrases = tuple(" ".join(piece.split()) for piece in str(text).split("."))
    phrases = tuple(phrase for phrase in phrases if phrase)
    if not phrases:
        raise PromptError(f"the prompt {text!r} has no phrase: give phrases separated by '.', e.g. {PROMPT_EXAMPLE}")
    return phrases


def read_prompt_file(path: str | os.PathLike) -> tuple[str, ...]:
    """One phrase per line (blank lines skipped, white space collapsed; a '.' inside a line is kept
    as part of the phrase). PromptError names the file when it cannot be read or holds no phrase."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: cannot read the prompt file ({exc})") from exc
    phrases = tuple(" ".join(line.split()) for line in lines)
    phrases = tuple(phrase for phrase in phrases if phrase)
    if not phrases:
        raise PromptError(f"{path}: the prompt file holds no phrase (one phrase per line)")
    return phrases


def check_phrases(phrases: Sequence[str]) -> tuple[str, ...]:
    """A prompt given as phrases (the API's list): each a non-empty string; PromptError otherwise."""
    if isinstance(phrases, str):
        return parse_prompt(phrases)
    cleaned = tuple(" ".join(str(phrase).split()) for phrase in phrases)
    if not cleaned or not all(cleaned):
        raise PromptError(f"the prompt {list(phrases)!r} has an empty phrase or none: give non-empty phrases, "
                          f"e.g. {PROMPT_EXAMPLE}")
    return cleaned


def prompt_text(phrases: Sequence[str]) -> str:
    """The prompt as one string, the form run.json records and parse_prompt reads back."""
    return " ".join(f"{phrase}." for phrase in phrases)


class PromptedDetector:
    """What every prompted family's detector shares (mixed in before HFDetector): `with_prompt`,
    the HF internals it reads (`_internal`, `_renamed`) and the forward options' checks. A subclass
    sets `tokenize` (tokenizer, phrases, limit, title) -> its prompt tokens and `recorded` (what its
    attention record holds, for the refusal of other attention), and takes (hf_model, family,
    preprocess, config, prompt, tokenizer) in its constructor."""

    tokenize: Any
    recorded: str = ""

    def _renamed(self, path: str) -> RuntimeError:
        """The error for an HF internal this code reads that is not there (renamed by transformers)."""
        import transformers

        return RuntimeError(f"{self.family.title}: {type(self.hf_model).__name__} has no '{path}' with transformers "
                            f"{transformers.__version__}: the module this code reads was renamed; the "
                            f"{self.family.title} support needs updating")

    def _internal(self, path: str) -> Any:
        """hf_model's attribute at the dotted `path` (`_renamed` when a part is missing)."""
        module: Any = self.hf_model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                raise self._renamed(path)
        return module

    def _checked_padding(self, images: Any, padding_mask: Any, *, cross_attention: bool, encoder_attention: bool,
                         decoder_self_attention: bool, keep_graph: bool, keep_features: bool,
                         padded: bool = False) -> Any:
        """The forward's options checked (ValueError names the problem); returns the padding mask
        (B, H, W), all False when none is given. padded: the family takes padded batches."""
        batch, _, height, width = images.shape
        if padding_mask is None:
            padding_mask = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
        elif not padded and bool(padding_mask.any()):
            raise ValueError(f"{self.family.title} takes no padding mask: run images of one input size per batch")
        if encoder_attention or decoder_self_attention:
            raise ValueError(f"{self.family.title} records {self.recorded} only (no encoder self-attention grids, "
                             "no decoder self-attention)")
        if (keep_graph or keep_features) and not cross_attention:
            raise ValueError("keep_graph / keep_features go in the attention record: ask for one "
                             "(cross_attention=True)")
        return padding_mask

    def with_prompt(self, phrases: Sequence[str]) -> Any:
        """The same weights with another prompt (the HF module is shared, not copied)."""
        phrases = check_phrases(phrases)
        prompt = type(self).tokenize(self.tokenizer, phrases, self.token_limit, self.family.title)
        config = dataclasses.replace(self.config, prompt=phrases, class_names=phrases,
                                     category_ids=tuple(range(len(phrases))))
        return type(self)(self.hf_model, self.family, self.preprocess_spec, config, prompt, self.tokenizer)
