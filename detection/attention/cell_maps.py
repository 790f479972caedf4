"""The one type of per-detection maps on a grid that every explanation method returns (raw and
rollout attention, attn-grad, relevance, D-RISE): the grid values and how they map to pixels.
Its own module so that `attention.gradients` and `attention.methods` can both use it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from detection.attention.maps import Interpolation, cells_to_image


@dataclass(frozen=True)
class MethodMaps:
    """Maps of N detections over a grid: values (N, h, w) float32; cell (y, x) covers model-input
    pixels [y·stride, (y+1)·stride) x [x·stride, (x+1)·stride) of an input of `input_size`
    (h_in, w_in) -- feature cells for attention methods, pooled pixels for D-RISE."""

    values: torch.Tensor
    stride: int
    input_size: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", torch.as_tensor(self.values).detach().float().cpu())
        object.__setattr__(self, "input_size", (int(self.input_size[0]), int(self.input_size[1])))

    def to_image(self, original_size: Sequence[int], interpolation: Interpolation = "bilinear") -> np.ndarray:
        """(N, H, W) float32 in original pixels (`attention.maps.cells_to_image`)."""
        return cells_to_image(self.values, self.stride, self.input_size, original_size, interpolation)

    def geometry(self) -> dict[str, Any]:
        """How the stored values map to pixels (for npz metadata)."""
        return {"stride": int(self.stride), "input_size": [int(v) for v in self.input_size],
                "grid_size": [int(v) for v in self.values.shape[-2:]]}
