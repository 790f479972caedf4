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

Encoder self-attention (`encoder_self`) is dense attention over ONE grid: for the dense kind
that is the record's grid; a sampled record may carry the dense self-attention of an encoder
layer over its OWN grid (RT-DETR's / D-FINE's AIFI layer on the top level), described by
`encoder_self_size` and `encoder_self_stride` with the same cell conventions as above.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from detection.models.transformer_inputs import KeptInputs, TransformerInputs

AttentionKind = Literal["dense", "sampled"]
Sampler = Literal["bilinear", "nearest"]
LevelCombination = Literal["footprint", "at_points"]


def _move(tensor: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _pad_levels(flat: torch.Tensor, points_per_level: Sequence[int]) -> torch.Tensor:
    """(B, Q, heads, sum(points)[, 2]) -> (B, Q, heads, levels, max(points)[, 2]), zeros in the padding."""
    counts = [int(n) for n in points_per_level]
    if int(flat.shape[3]) != sum(counts):
        raise ValueError(f"{int(flat.shape[3])} points in the flat layout, points_per_level {counts} sum to {sum(counts)}")
    slots = max(counts)
    padded = flat.new_zeros(*flat.shape[:3], len(counts), slots, *flat.shape[4:])
    for level, chunk in enumerate(flat.split(counts, dim=3)):
        padded[:, :, :, level, : counts[level]] = chunk
    return padded


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
    points_per_level: (levels,) points each level really has; None means `points` on every
        level. Ragged levels (D-FINE's `decoder_n_points` list) are stored padded to the largest
        count: level l's points are slots [0, points_per_level[l]) and later slots are padding,
        checked to carry weight 0 (so every consumer may treat all slots alike).
    sampler: how the model read a point, and so how a map must splat it (its transpose):
        "bilinear" -- `F.grid_sample(mode="bilinear", padding_mode="zeros",
        align_corners=False)` (Deformable DETR, RT-DETR, RF-DETR, "default" decoder_method);
        "nearest" -- the "discrete" decoder_method of RT-DETR v2 / D-FINE: the cell
        (clamp(int64(y·h_l + 0.5), 0, h_l − 1), clamp(int64(x·w_l + 0.5), 0, w_l − 1)),
        computed in float32 as Hugging Face's `multi_scale_deformable_attention_v2` does (so
        cell c is read for x·w_l in [c − 0.5, c + 0.5): half a cell left of grid_sample's
        centres). `detection.models.hf.capture_sampled` stores such points as the cell the
        model read, x = c_x / w_l, y = c_y / h_l (computed in the model's own dtype).
    level_combination: how maps bring the levels onto level 0's grid
        (`detection.attention.sampled`): "footprint" (default) splats each point on its own
        level's grid with the transpose of `sampler`, then spreads each level cell's weight over
        the level-0 cells its input-pixel footprint covers; "at_points" (the earlier geometry)
        splats every point bilinearly at its input-pixel location directly on level 0's grid
        (bilinear sampler only).
    """

    locations: torch.Tensor
    weights: torch.Tensor
    level_sizes: tuple[tuple[int, int], ...]
    level_strides: tuple[int, ...]
    points_per_level: tuple[int, ...] | None = None
    sampler: Sampler = "bilinear"
    level_combination: LevelCombination = "footprint"

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
        slots = int(self.weights.shape[5])
        counts = (slots,) * levels if self.points_per_level is None else tuple(int(n) for n in self.points_per_level)
        if len(counts) != levels or min(counts) <= 0 or max(counts) != slots:
            raise ValueError(
                f"points_per_level {counts} must give one positive count per level ({levels}), the largest "
                f"equal to the {slots} point slots"
            )
        self.points_per_level = counts
        if min(counts) < slots and self.weights.device.type != "meta" and bool((self.weights[..., ~self.point_mask] != 0).any()):
            raise ValueError(f"padding point slots (beyond points_per_level {counts}) must carry weight 0")
        if self.sampler not in ("bilinear", "nearest"):
            raise ValueError(f"sampler must be 'bilinear' or 'nearest', got {self.sampler!r}")
        if self.level_combination not in ("footprint", "at_points"):
            raise ValueError(f"level_combination must be 'footprint' or 'at_points', got {self.level_combination!r}")
        if self.level_combination == "at_points" and self.sampler != "bilinear":
            raise ValueError("level_combination 'at_points' is defined for the bilinear sampler only")

    @property
    def point_mask(self) -> torch.Tensor:
        """(levels, points) bool, True on the slots that hold real points (False on padding)."""
        slots = int(self.weights.shape[5])
        return torch.arange(slots)[None, :] < torch.tensor(self.points_per_level)[:, None]

    @classmethod
    def from_layers(
        cls,
        locations: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor],
        level_sizes: torch.Tensor | Sequence[Sequence[int]],
        level_strides: Sequence[int],
        *,
        points_per_level: Sequence[int] | None = None,
        sampler: Sampler = "bilinear",
    ) -> "SampledAttention":
        """Stack per-decoder-layer tensors in Deformable DETR's / HF's layout (query before head).

        locations: one (B, Q, heads, levels, points, 2) tensor per layer (`sampling_locations`);
        weights: one (B, Q, heads, levels, points) tensor per layer (softmaxed
        `attention_weights`). Stored as float32 (L, B, heads, Q, levels, points[, 2]).
        Ragged levels: pass HF v2's flat layout instead -- (B, Q, heads, sum(points_per_level)[, 2])
        per layer, levels in order -- with `points_per_level`; it is stored padded (see the class).
        """
        if len(locations) != len(weights) or not locations:
            raise ValueError(f"{len(locations)} layers of locations and {len(weights)} of weights: need the same, >= 1")
        if points_per_level is not None and weights[0].ndim == 4:
            locations = [_pad_levels(layer, points_per_level) for layer in locations]
        return cls(
            locations=torch.stack([layer.float().transpose(1, 2) for layer in locations]),
            weights=torch.stack([cls.layer_weights(layer, points_per_level) for layer in weights]),
            level_sizes=level_sizes,
            level_strides=level_strides,
            points_per_level=points_per_level,
            sampler=sampler,
        )

    @staticmethod
    def layer_weights(weights: torch.Tensor, points_per_level: Sequence[int] | None = None) -> torch.Tensor:
        """One layer's weights in HF's layout -> the stored layout (B, heads, Q, levels, points) float32.

        weights: (B, Q, heads, levels, points), or the flat (B, Q, heads, sum(points_per_level))
        when `points_per_level` is given (padded with zeros, as `from_layers` stores them).
        """
        if points_per_level is not None and weights.ndim == 4:
            weights = _pad_levels(weights, points_per_level)
        return weights.float().transpose(1, 2)

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
        cell i (query) attends to cell j (key), flattened row-major. Dense kind: over the
        record's grid (h, w) = `feature_size`. Sampled kind: over the encoder's OWN grid
        (h, w) = `encoder_self_size`, stride `encoder_self_stride` (both required then), e.g.
        the AIFI layer of RT-DETR / D-FINE on the top level; that grid's cell (y, x) covers
        input pixels [y·s, (y+1)·s) × [x·s, (x+1)·s) like every grid here. Such an encoder
        attends over padded cells too when the model takes no mask (AIFI takes none).
    encoder_self_size: (h, w) of `encoder_self`'s grid; None for the dense kind (its grid is
        the record's) and when there is no encoder_self.
    encoder_self_stride: input pixels per cell of that grid; None likewise.
    decoder_self: optional (L_dec, B, heads, Q, Q) (either kind).
    transformer_inputs: optional, the native DETR's backbone-stage output of this pass
        (`forward(..., keep_features=True)`), which the gradient methods reuse.
    kept_inputs: optional, a prompted detector's `KeptInputs` of this pass, which its token scores reuse.
    """

    decoder_cross: torch.Tensor | None = None
    feature_padding_mask: torch.Tensor
    feature_stride: int
    input_size: tuple[int, int]
    image_sizes: torch.Tensor
    encoder_self: torch.Tensor | None = None
    decoder_self: torch.Tensor | None = None
    decoder_cross_sampled: SampledAttention | None = None
    encoder_self_size: tuple[int, int] | None = None
    encoder_self_stride: int | None = None
    transformer_inputs: TransformerInputs | None = None
    kept_inputs: KeptInputs | None = None

    def __post_init__(self) -> None:
        if (self.decoder_cross is None) == (self.decoder_cross_sampled is None):
            raise ValueError("an AttentionRecord holds exactly one of decoder_cross (dense) and decoder_cross_sampled")
        sampled = self.decoder_cross_sampled
        if sampled is None:
            if self.encoder_self_size is not None or self.encoder_self_stride is not None:
                raise ValueError("encoder_self_size / encoder_self_stride are for sampled records (a dense record's "
                                 "encoder_self is over its own grid)")
            return
        self._check_encoder_grid()
        if tuple(self.feature_padding_mask.shape[-2:]) != sampled.level_sizes[0]:
            raise ValueError(
                f"feature_padding_mask {tuple(self.feature_padding_mask.shape)} must be level 0's grid "
                f"{sampled.level_sizes[0]} for sampled attention"
            )
        if int(self.feature_stride) != sampled.level_strides[0]:
            raise ValueError(f"feature_stride {self.feature_stride} must be level 0's stride {sampled.level_strides[0]}")

    def _check_encoder_grid(self) -> None:
        if self.encoder_self is None:
            if self.encoder_self_size is not None or self.encoder_self_stride is not None:
                raise ValueError("encoder_self_size / encoder_self_stride given without encoder_self")
            return
        if self.encoder_self_size is None or self.encoder_self_stride is None:
            raise ValueError(
                "encoder_self on a sampled record is dense self-attention over its OWN grid: give "
                "encoder_self_size (h, w) and encoder_self_stride"
            )
        height, width = (int(v) for v in self.encoder_self_size)
        self.encoder_self_size = (height, width)
        self.encoder_self_stride = int(self.encoder_self_stride)
        cells = height * width
        if self.encoder_self.ndim != 5 or tuple(self.encoder_self.shape[-2:]) != (cells, cells):
            raise ValueError(
                f"encoder_self must be (L_enc, B, heads, {cells}, {cells}) for its grid {self.encoder_self_size}, "
                f"got {tuple(self.encoder_self.shape)}"
            )
        if self.encoder_self_stride <= 0:
            raise ValueError(f"encoder_self_stride must be positive, got {self.encoder_self_stride}")

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
            transformer_inputs=None if self.transformer_inputs is None else self.transformer_inputs.select_image(index),
            kept_inputs=None if self.kept_inputs is None else self.kept_inputs.select_image(index),
            encoder_self_size=self.encoder_self_size,
            encoder_self_stride=self.encoder_self_stride,
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
            transformer_inputs=None if self.transformer_inputs is None else self.transformer_inputs.to(device),
            kept_inputs=None if self.kept_inputs is None else self.kept_inputs.to(device),
            encoder_self_size=self.encoder_self_size,
            encoder_self_stride=self.encoder_self_stride,
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


@dataclass(frozen=True)
class AttentionGraph:
    """The attention tensors one forward pass multiplied with, still in the autograd graph.

    Returned beside the (detached) `AttentionRecord` when a capture is asked to keep the graph
    (`HFDetector.forward(..., keep_graph=True)`), for gradients with respect to the attention.
    One tensor per layer, exactly as the model computed it (same dtype, no slicing or copy):
    cross: decoder cross-attention per decoder layer. Dense: (B, heads, Q, h*w) softmax weights
        over the record's grid (row-major, padded cells included). Sampled: the
        `attention_weights` handed to the deformable sampling core, (B, Q, heads, levels,
        points), or HF's flat (B, Q, heads, sum(points_per_level)) layout where the record's
        `points_per_level` says how it splits (`SampledAttention.layer_weights`).
    decoder_self: (B, heads, Q, Q) per decoder layer; encoder: (B, heads, h*w, h*w) per encoder
        layer (dense encoder-decoder detectors, whatever the record holds; empty otherwise).
    tokens: ViT detectors (YOLOS): (B, heads, T, T) per layer over ALL T tokens, [CLS] first,
        then the patches (row-major, the record's grid), then the `detection_tokens` detection
        tokens; `cross` / `decoder_self` / `encoder` stay empty.
    """

    cross: tuple[torch.Tensor, ...] = ()
    decoder_self: tuple[torch.Tensor, ...] = ()
    encoder: tuple[torch.Tensor, ...] = ()
    tokens: tuple[torch.Tensor, ...] = ()
    detection_tokens: int = 0


__all__ = ["AttentionGraph", "AttentionKind", "AttentionRecord", "LevelCombination", "SampledAttention", "Sampler"]
