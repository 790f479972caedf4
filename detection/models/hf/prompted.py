"""Prompted (open-vocabulary) HF families: the folder's tokenizer and the family's detector class,
built for a prompt. `load_hf_detector` calls `build_prompted` for families with `prompted=True`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from detection.models.hf.detector import HFDetector
from detection.models.hf.families import Family
from detection.models.hf.folder import HFFolder, HFFolderError
from detection.models.hf.grounding import build_grounding_detector
from detection.models.hf.omdet import build_omdet_detector
from detection.models.hf.owl import build_owl_detector
from detection.models.hf.owlv2 import build_owlv2_detector

#: model_type -> the builder of its detector (hf_model, family, preprocess, tokenizer, phrases, name, source).
_BUILDERS = {"owlvit": build_owl_detector, "owlv2": build_owlv2_detector, "grounding-dino": build_grounding_detector,
             "mm-grounding-dino": build_grounding_detector, "omdet-turbo": build_omdet_detector}


#: The files of a tokenizer, any one set: a fast tokenizer's, CLIP's byte-level BPE, BERT's WordPiece.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def load_tokenizer(folder: Path) -> Any:
    """The folder's own tokenizer (transformers' AutoTokenizer, local files only); HFFolderError
    naming the folder when its tokenizer files are missing or unreadable."""
    import transformers

    # without its files AutoTokenizer still builds a tokenizer, with an empty vocabulary (every word unknown)
    if not any(all((Path(folder) / name).is_file() for name in files) for files in TOKENIZER_FILES):
        raise HFFolderError(folder, "has no tokenizer files, which a prompted detector needs beside config.json: "
                                    + " or ".join(" + ".join(files) for files in TOKENIZER_FILES))
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HFFolderError(folder, f"cannot load the tokenizer that a prompted detector needs (tokenizer files "
                                    f"beside config.json, e.g. vocab.json + merges.txt or vocab.txt): {exc}") from exc


def build_prompted(hf_model: nn.Module, family: Family, checked: HFFolder, phrases: Sequence[str],
                   source: str) -> HFDetector:
    """The family's prompted detector for `phrases` (PromptError: empty, or beyond the encoder's limit)."""
    builder = _BUILDERS.get(family.model_type)
    if builder is None:
        raise HFFolderError(checked.path, f"{family.title} is not loaded with a prompt yet")
    tokenizer = load_tokenizer(checked.path)
    return builder(hf_model, family, checked.preprocess, tokenizer, phrases, Path(checked.path).name, source)
