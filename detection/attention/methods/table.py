"""The one table of explanation methods: name -> class. The engine, the API, the CLI's validation
and the report read it; a new method is one module plus one entry in `_TABLE`."""
from __future__ import annotations

from typing import Any, Sequence

from detection.attention.methods.base import ExplanationMethod, MethodNotApplicable, model_family
from detection.attention.methods.drise import Drise
from detection.attention.methods.gradient import AttnGrad, Relevance
from detection.attention.methods.in_box import InBoxAttention
from detection.attention.methods.raw import RawAttention
from detection.attention.methods.rollout import AttentionRollout

_TABLE: tuple[type[ExplanationMethod], ...] = (RawAttention, AttentionRollout, AttnGrad, Relevance, Drise, InBoxAttention)

#: name -> method class, in the order help texts list them.
METHODS: dict[str, type[ExplanationMethod]] = {method.name: method for method in _TABLE}
#: The method a run's attention maps use unless told otherwise (its files keep the unsuffixed names).
DEFAULT_METHOD: str = RawAttention.name


def parse_methods(text: str) -> list[str]:
    """'raw,attn-grad' -> ['raw', 'attn-grad'] (known names only, each once, in order)."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    check_names(names or [text])
    return names


def check_names(names: Sequence[str]) -> list[str]:
    """`names` (each once, in order) when every one is a known method; ValueError naming the others."""
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown explanation method(s) {unknown}: the method must be one of {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def applicable_methods(model: Any) -> list[str]:
    """The method names that apply to `model`'s family."""
    return [name for name, method in METHODS.items() if method.refusal(model) is None]


def check_methods(names: Sequence[str], model: Any) -> None:
    """Raise MethodNotApplicable for the first method of `names` that does not apply to `model`:
    the message names the method, the family, why, and the methods that apply."""
    for name in check_names(names):
        reason = METHODS[name].refusal(model)
        if reason is not None:
            raise MethodNotApplicable(
                f"explanation method {name!r} does not apply to the {model_family(model)} family: {reason}; "
                f"methods that apply: {', '.join(applicable_methods(model))}")
