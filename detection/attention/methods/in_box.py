"""in-box: the detection's raw cross-attention inside its own box, with its contrast lowered.

A trained DETR's query attends to a few cells of its object, so the raw map's Otsu mask is a few
peaks and its mass leaks outside the box. `in-box` keeps what the attention says about *which
pixels of the box* are the object and takes what the box says about where the object ends:

    m(y, x) = (a(y, x) / max a) ** power · coverage(y, x)

a: the raw map of a layers/heads choice over the valid feature cells (`attention.maps.query_cell_maps`);
coverage: the share of cell (y, x) (model-input pixels [y·s, (y+1)·s) x [x·s, (x+1)·s)) inside the
detection's box mapped to model-input pixels (original xyxy · input/original size per axis); power
< 1 flattens the peaks so that a whole stroke, not its brightest cell, clears the threshold.

Inside a filled box `in-box` is the attention; where the attention avoids part of the box (a ring's
hole, the open side of a u-shape) the map is low there and no box-only map can be. The power was
chosen on the hard-shapes selection split (docs/methods.md, "A method that a box cannot fake") and
frozen: `DEFAULT_POWER`. Choices: `in-box/<layers>/<heads>` for the run's raw layers/heads
choices (dense or sampled attention alike; no rollout).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.maps import image_geometry, query_cell_maps
from detection.attention.methods.base import (ExplanationMethod, ImageInput, MethodContext, MethodMaps,
                                              MethodOptions, Targets)

DEFAULT_POWER = 0.35


def box_cell_coverage(boxes_xyxy: torch.Tensor, original_size: Sequence[int], input_size: Sequence[int],
                      stride: int, grid_size: Sequence[int]) -> torch.Tensor:
    """(N, 4) boxes xyxy in original pixels -> (N, hv, wv) float32: the share of each feature cell's
    area inside the box. Cell (y, x) covers model-input pixels [y·s, (y+1)·s) x [x·s, (x+1)·s),
    cropped to the input (h_in, w_in); original pixels map to input pixels linearly per axis."""
    height, width = (int(v) for v in original_size)
    input_h, input_w = (int(v) for v in input_size)
    grid_h, grid_w = (int(v) for v in grid_size)
    boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float64).reshape(-1, 4)
    scale = torch.tensor([input_w / width, input_h / height, input_w / width, input_h / height], dtype=torch.float64)
    boxes = boxes * scale

    def axis(low: torch.Tensor, high: torch.Tensor, cells: int, limit: int) -> torch.Tensor:
        starts = torch.arange(cells, dtype=torch.float64) * stride
        ends = torch.clamp(starts + stride, max=float(limit))
        overlap = (torch.minimum(high[:, None], ends) - torch.maximum(low[:, None], starts)).clamp(min=0.0)
        return overlap / (ends - starts).clamp(min=1e-12)  # (N, cells)

    rows = axis(boxes[:, 1], boxes[:, 3], grid_h, input_h)
    cols = axis(boxes[:, 0], boxes[:, 2], grid_w, input_w)
    return (rows[:, :, None] * cols[:, None, :]).float()


def in_box_cells(cells: torch.Tensor, coverage: torch.Tensor, power: float = DEFAULT_POWER) -> torch.Tensor:
    """(N, hv, wv) non-negative attention and (N, hv, wv) box coverage -> the in-box maps (N, hv, wv):
    (cells / their max) ** power · coverage; an all-zero map stays zero."""
    if not power > 0:
        raise ValueError(f"the in-box power must be positive, got {power}")
    peak = cells.flatten(1).amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = (cells.clamp(min=0.0) / peak[:, None, None]).double() ** power
    return (scaled * coverage.double()).float()


class InBoxAttention(ExplanationMethod):
    name = "in-box"
    options = ("layers", "heads", "in_box_power")
    needs_attention = True

    def __init__(self, layers: Sequence[Any] = ("last",), heads: Sequence[Any] = ("mean",),
                 power: float = DEFAULT_POWER) -> None:
        self.layers = [layer for layer in layers if layer != ROLLOUT_LAYERS]
        self.heads = list(heads)
        self.power = float(power)

    @classmethod
    def build(cls, context: MethodContext, options: MethodOptions) -> "InBoxAttention":
        power = DEFAULT_POWER if options.in_box_power is None else options.in_box_power
        return cls(options.layers, options.heads, power)

    def choices(self) -> list[str]:
        return [f"{self.name}/{layers}/{heads}" for layers in self.layers for heads in self.heads]

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        record = image.attention
        if record is None:
            raise ValueError("in-box maps need the inference pass's attention record (none was returned)")
        valid_h, valid_w, input_h, input_w = image_geometry(record, 0)
        stride = int(record.feature_stride)
        coverage = box_cell_coverage(targets.boxes, image.original_size, (input_h, input_w), stride, (valid_h, valid_w))
        out = {}
        for layers in self.layers:
            for heads in self.heads:
                cells = query_cell_maps(record, 0, targets.query_index, heads=heads, layers=layers)
                out[f"{self.name}/{layers}/{heads}"] = MethodMaps(in_box_cells(cells, coverage, self.power),
                                                                  stride, (input_h, input_w))
        return out
