"""raw: the decoder cross-attention row of the detection's query, aggregated over layers
(last, mean, an index) and heads (mean, max, an index) -- the maps eval scored before #13."""
from __future__ import annotations

from typing import Any, Sequence

from detection.attention.maps import query_cell_maps
from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.methods.base import (ExplanationMethod, ImageInput, MethodContext, MethodMaps,
                                              MethodOptions, Targets)


def choice_name(layers: Any, heads: Any) -> str:
    """'last/mean': the key of one layers/heads choice in metrics.json's `attention`."""
    return f"{layers}/{heads}"


def record_maps(image: ImageInput, targets: Targets, layers: Any, heads: Any) -> MethodMaps:
    """One layers/heads choice of the image's attention record as MethodMaps."""
    record = image.attention
    if record is None:
        raise ValueError("attention maps need the inference pass's attention record (none was returned)")
    cells = query_cell_maps(record, 0, targets.query_index, heads=heads, layers=layers)
    input_size = tuple(int(v) for v in record.image_sizes[0].tolist())
    return MethodMaps(cells, int(record.feature_stride), input_size)


class RawAttention(ExplanationMethod):
    """Every layers x heads choice (`layers` without "rollout": that is `AttentionRollout`)."""

    name = "raw"
    options = ("layers", "heads")
    needs_attention = True

    def __init__(self, layers: Sequence[Any] = ("last", "mean"), heads: Sequence[Any] = ("mean", "max")) -> None:
        self.layers = [layer for layer in layers if layer != ROLLOUT_LAYERS]
        self.heads = list(heads)

    @classmethod
    def build(cls, context: MethodContext, options: MethodOptions) -> "RawAttention":
        return cls(options.layers, options.heads)

    def choices(self) -> list[str]:
        return [choice_name(layers, heads) for layers in self.layers for heads in self.heads]

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        return {choice_name(layers, heads): record_maps(image, targets, layers, heads)
                for layers in self.layers for heads in self.heads}
