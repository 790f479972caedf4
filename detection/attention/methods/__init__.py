"""Explanation methods behind one interface (`base.ExplanationMethod`): raw, rollout,
attn-grad, relevance, drise; which apply to a detector, and the refusal naming the family."""
from __future__ import annotations

from typing import Any

from detection.attention.methods.base import (ExplanationMethod, ImageInput, MethodMaps, MethodNotApplicable,
                                              Targets, attention_kind, model_family)
from detection.attention.methods.drise import Drise
from detection.attention.methods.gradient import AttnGrad, Relevance
from detection.attention.methods.raw import RawAttention, choice_name
from detection.attention.methods.rollout import AttentionRollout

METHODS: dict[str, type[ExplanationMethod]] = {
    "raw": RawAttention, "rollout": AttentionRollout, "attn-grad": AttnGrad, "relevance": Relevance, "drise": Drise,
}

__all__ = ["METHODS", "AttentionRollout", "AttnGrad", "Drise", "ExplanationMethod", "ImageInput", "MethodMaps",
           "MethodNotApplicable", "RawAttention", "Relevance", "Targets", "applicable_methods", "attention_kind",
           "check_methods", "choice_name", "model_family", "parse_methods"]


def parse_methods(text: str) -> list[str]:
    """'raw,attn-grad' -> ['raw', 'attn-grad'] (known names only, each once, in order)."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown explanation method(s) {unknown or text!r}; choose from {', '.join(METHODS)}")
    return names


def applicable_methods(model: Any) -> list[str]:
    """The method names that apply to `model`'s family."""
    return [name for name, method in METHODS.items() if method.refusal(model) is None]


def check_methods(names: list[str], model: Any) -> None:
    """Raise MethodNotApplicable for the first method of `names` that does not apply to `model`."""
    for name in names:
        reason = METHODS[name].refusal(model)
        if reason is not None:
            raise MethodNotApplicable(
                f"explanation method {name!r} does not apply to the {model_family(model)} family: {reason}; "
                f"methods that apply: {', '.join(applicable_methods(model))}")
