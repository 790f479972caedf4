"""rollout: Chefer et al.'s rules on raw (not gradient-weighted) attention through encoder and
decoder (`attention.aggregate.decoder_rollout`), per head choice; dense attention only."""
from __future__ import annotations

from typing import Any, Sequence

from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.methods.base import (ExplanationMethod, ImageInput, MethodContext, MethodMaps,
                                              MethodOptions, Targets, attention_kind)
from detection.attention.methods.raw import choice_name, record_maps


class AttentionRollout(ExplanationMethod):
    name = "rollout"
    options = ("heads",)
    needs_attention = True
    needs_self_attention = True

    def __init__(self, heads: Sequence[Any] = ("mean", "max")) -> None:
        self.heads = list(heads)

    @classmethod
    def build(cls, context: MethodContext, options: MethodOptions) -> "AttentionRollout":
        return cls(options.heads)

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        if attention_kind(model) == "sampled":
            return "rollout needs dense attention (this family's cross-attention is sampled points)"
        if getattr(model, "last_layer_attention_only", False):
            return "rollout needs every layer's attention (this family's record holds its last layer's only)"
        return None

    def choices(self) -> list[str]:
        return [choice_name(ROLLOUT_LAYERS, heads) for heads in self.heads]

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        return {choice_name(ROLLOUT_LAYERS, heads): record_maps(image, targets, ROLLOUT_LAYERS, heads) for heads in self.heads}
