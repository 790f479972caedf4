"""The attention a detector's forward pass returns on request, with the geometry needed to map it.

Conventions shared by every consumer (maps, metrics, rendering):
  * feature grid (h, w) is row-major; flattened index = y * w + x;
  * feature cell (y, x) covers input pixels [y*stride, (y+1)*stride) x [x*stride, (x+1)*stride)
    of the padded input batch (input = after resize, before/with padding);
  * padding masks are True where there is padding (authors' convention; HF's pixel_mask is
    the negation).

Two kinds of decoder cross-attention, one record (`AttentionRecord.kind`):
  * "dense" (DETR): every query weighs every cell of ONE feature grid (`decoder_cross`);
  * "sampled" (multi-scale deformable attention: Deformable DETR, RT-DETR, D-FINE, RF-DETR):
    every query samples a few points on each of several feature levels (`SampledAttention`).
    The record's grid geometry (`feature_padding_mask`, `feature_stride`, `feature_size`) is
    then that of the FINEST level, level 0, the grid the maps are drawn on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

AttentionKind = Literal["dense", "sampled"]


def _move(tensor: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


@dataclass(kw_only=True)
class SampledAttention:
    """Multi-scale deformable cross-attention: sampled points with weights, per level.

    locations: (L_dec, B, heads, Q, levels, points, 2) float32 sampling locations (x, y),
        normalised over each level's PADDED feature map as `F.grid_sample(...,
        align_corners=False)` reads them (Deformable DETR's `sampling_locations`, HF's too):
        x = 0 is the left edge of the level's cell 0 and x = 1 the right edge of its last cell,
        so x * w_l - 0.5 is the level's cell-centre coordinate (cell c has its centre at c) and
        x * w_l * s_l the input pixel (y likewise with h_l). Reference points already carry each
        image's valid ratio, so an image's valid region is [0, valid_w/w_l) on its padded level.
    weights: (L_dec, B, heads, Q, levels, points) float32 softmax weights; for each layer,
        image, head and query they sum to 1 over levels x points.
    level_sizes: (levels, 2) (h_l, w_l) of each level's padded grid (a tensor or sequence;
        stored as a tuple of int pairs). Level 0 must be the finest level (smallest stride).
    level_strides: (levels,) input pixels per cell of each level (e.g. 8, 16, 32, 64).
    """

    locations: torch.Tensor
    weights: torch.Tensor
    level_sizes: tuple[tuple[int, int], ...]
    level_strides: tuple[int, ...]

    def __post_init__(self) -> None:
        sizes = self.level_sizes.tolist() if isinstance(self.level_sizes, torch.Tensor) else self.level_sizes
        self.level_sizes = tuple((int(h), int(w)) for h, w in sizes)
        self.level_strides = tuple(int(s) for s in self.level_strides)
        levels = len(self.level_sizes)
        if self.locations.ndim != 7 or self.locations.shape[-1] != 2:
            raise ValueError(f"locations must be (L, B, heads, Q, levels, points, 2), got {tuple(self.locations.shape)}")
        if tuple(self.weights.shape) != tuple(self.locations.shape[:-1]):
            raise ValueError(
                f"weights {tuple(self.weights.shape)} must be locations' shape without the last axis "
                f"{tuple(self.locations.shape[:-1])}"
            )
        if self.weights.shape[4] != levels or len(self.level_strides) != levels:
            raise ValueError(
                f"{self.weights.shape[4]} levels in the points, {levels} level sizes and "
                f"{len(self.level_strides)} level strides: they must agree"
            )
        if levels == 0 or min(min(size) for size in self.level_sizes) <= 0 or min(self.level_strides) <= 0:
            raise ValueError(f"level sizes {self.level_sizes} and strides {self.level_strides} must be positive")
        if self.level_strides[0] != min(self.level_strides):
            raise ValueError(f"level 0 must be the finest level, got strides {self.level_strides}")

    @classmethod
    def from_layers(
        cls,
        locations: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor],
        level_sizes: torch.Tensor | Sequence[Sequence[int]],
        level_strides: Sequence[int],
    ) -> "SampledAttention":
        """Stack per-decoder-layer tensors in Deformable DETR's / HF's layout (query before head).

        locations: one (B, Q, heads, levels, points, 2) tensor per layer (`sampling_locations`);
        weights: one (B, Q, heads, levels, points) tensor per layer (softmaxed
        `attention_weights`). Stored as float32 (L, B, heads, Q, levels, points[, 2]).
        """
        if len(locations) != len(weights) or not locations:
            raise ValueError(f"{len(locations)} layers of locations and {len(weights)} of weights: need the same, >= 1")
        return cls(
            locations=torch.stack([layer.float().transpose(1, 2) for layer in locations]),
            weights=torch.stack([layer.float().transpose(1, 2) for layer in weights]),
            level_sizes=level_sizes,
            level_strides=level_strides,
        )

    @property
    def batch_size(self) -> int:
        return int(self.weights.shape[1])

    @property
    def num_queries(self) -> int:
        return int(self.weights.shape[3])

    def select_image(self, index: int) -> "SampledAttention":
        """The points of one image of the batch (batch dimension kept, size 1)."""
        sl = slice(index, index + 1)
        return dataclasses.replace(self, locations=self.locations[:, sl], weights=self.weights[:, sl])

    def to(self, device: torch.device | str) -> "SampledAttention":
        return dataclasses.replace(self, locations=self.locations.to(device), weights=self.weights.to(device))

    def keep_last_layer(self) -> "SampledAttention":
        return dataclasses.replace(self, locations=self.locations[-1:], weights=self.weights[-1:])


@dataclass(kw_only=True)
class AttentionRecord:
    """Attention weights of one forward pass over a (padded) batch; keyword-only constructor.

    Exactly one of the two decoder cross-attention fields is set (`kind` says which):
    decoder_cross: dense kind, (L_dec, B, heads, Q, h, w) float32 softmax weights of each
        decoder query over the encoder memory, every layer and every head (not averaged).
        Padded cells are 0.
    decoder_cross_sampled: sampled kind, a `SampledAttention` (points on several levels).
    feature_padding_mask: (B, h, w) bool, True on feature cells that are padding; for the
        sampled kind the mask of the finest level (level 0, (h, w) == level_sizes[0]).
    feature_stride: input pixels per feature cell (32 for R50/R101, 16 for DC5, patch size
        for ViT backbones); for the sampled kind level 0's stride.
    input_size: (H, W) of the padded input batch, in input pixels.
    image_sizes: (B, 2) int64, (height, width) of each image in input pixels before padding.
    encoder_self: optional (L_enc, B, heads, h*w, h*w); [..., i, j] is how much feature
        cell i (query) attends to cell j (key), flattened row-major. Dense kind only.
    decoder_self: optional (L_dec, B, heads, Q, Q) (either kind).
    """

    decoder_cross: torch.Tensor | None = None
    feature_padding_mask: torch.Tensor
    feature_stride: int
    input_size: tuple[int, int]
    image_sizes: torch.Tensor
    encoder_self: torch.Tensor | None = None
    decoder_self: torch.Tensor | None = None
    decoder_cross_sampled: SampledAttention | None = None

    def __post_init__(self) -> None:
        if (self.decoder_cross is None) == (self.decoder_cross_sampled is None):
            raise ValueError("an AttentionRecord holds exactly one of decoder_cross (dense) and decoder_cross_sampled")
        sampled = self.decoder_cross_sampled
        if sampled is None:
            return
        if self.encoder_self is not None:
            raise ValueError("encoder_self (dense self-attention over one grid) is not defined for sampled attention")
        if tuple(self.feature_padding_mask.shape[-2:]) != sampled.level_sizes[0]:
            raise ValueError(
                f"feature_padding_mask {tuple(self.feature_padding_mask.shape)} must be level 0's grid "
                f"{sampled.level_sizes[0]} for sampled attention"
            )
        if int(self.feature_stride) != sampled.level_strides[0]:
            raise ValueError(f"feature_stride {self.feature_stride} must be level 0's stride {sampled.level_strides[0]}")

    @property
    def kind(self) -> AttentionKind:
        """"dense" (decoder_cross over one grid) or "sampled" (decoder_cross_sampled points)."""
        return "dense" if self.decoder_cross is not None else "sampled"

    @property
    def feature_size(self) -> tuple[int, int]:
        """(h, w) of the grid maps are drawn on: the dense grid, or the finest sampled level."""
        if self.decoder_cross is not None:
            return int(self.decoder_cross.shape[-2]), int(self.decoder_cross.shape[-1])
        return self.decoder_cross_sampled.level_sizes[0]

    @property
    def batch_size(self) -> int:
        if self.decoder_cross is not None:
            return int(self.decoder_cross.shape[1])
        return self.decoder_cross_sampled.batch_size

    @property
    def num_queries(self) -> int:
        if self.decoder_cross is not None:
            return int(self.decoder_cross.shape[3])
        return self.decoder_cross_sampled.num_queries

    def select_image(self, index: int) -> "AttentionRecord":
        """The record of one image of the batch (batch dimension kept, size 1)."""
        sl = slice(index, index + 1)
        return AttentionRecord(
            decoder_cross=None if self.decoder_cross is None else self.decoder_cross[:, sl],
            decoder_cross_sampled=None if self.decoder_cross_sampled is None else self.decoder_cross_sampled.select_image(index),
            feature_padding_mask=self.feature_padding_mask[sl],
            feature_stride=self.feature_stride,
            input_size=self.input_size,
            image_sizes=self.image_sizes[sl],
            encoder_self=None if self.encoder_self is None else self.encoder_self[:, sl],
            decoder_self=None if self.decoder_self is None else self.decoder_self[:, sl],
        )

    def to(self, device: torch.device | str) -> "AttentionRecord":
        """The record with every tensor on `device` (tensors already there are shared, not copied)."""
        return AttentionRecord(
            decoder_cross=_move(self.decoder_cross, device),
            decoder_cross_sampled=None if self.decoder_cross_sampled is None else self.decoder_cross_sampled.to(device),
            feature_padding_mask=self.feature_padding_mask.to(device),
            feature_stride=self.feature_stride,
            input_size=self.input_size,
            image_sizes=self.image_sizes.to(device),
            encoder_self=_move(self.encoder_self, device),
            decoder_self=_move(self.decoder_self, device),
        )

    def keep_last_layer(self) -> "AttentionRecord":
        """The record with only the last decoder layer's cross-attention (either kind).

        Self-attention fields are kept whole (they serve rollout, which needs every layer).
        """
        if self.decoder_cross is not None:
            return dataclasses.replace(self, decoder_cross=self.decoder_cross[-1:])
        return dataclasses.replace(self, decoder_cross_sampled=self.decoder_cross_sampled.keep_last_layer())

    @property
    def device(self) -> torch.device:
        """Device of the cross-attention tensors."""
        if self.decoder_cross is not None:
            return self.decoder_cross.device
        return self.decoder_cross_sampled.weights.device


__all__ = ["AttentionKind", "AttentionRecord", "SampledAttention"]

