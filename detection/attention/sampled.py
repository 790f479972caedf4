"""Sampled (multi-scale deformable) attention -> per-query maps over the finest level's cells.

`detection.attention.maps.query_cell_maps` calls this for records of the "sampled" kind; the
map then takes the same crop and the same single resize path as a dense map.

Two steps (the record's `level_combination` "footprint", the default):

1. Per level, on the level's OWN padded grid (h_l, w_l): the exact transpose of the sampling
   the model performed (`splat_on_level`). Bilinear (`F.grid_sample(..., "bilinear",
   padding_mode="zeros", align_corners=False)`): a point at normalised (x, y) has cell-centre
   coordinate (u, v) = (x·w_l − 0.5, y·h_l − 0.5); cell (⌊v⌋ + j, ⌊u⌋ + i) receives
   weight·(1 − |v − ⌊v⌋ − j|)·(1 − |u − ⌊u⌋ − i|), corners outside the grid dropped (zero
   padding). Nearest (the "discrete" decoder_method of RT-DETR v2 / D-FINE): the cell
   (clamp(int64(y·h_l + 0.5)), clamp(int64(x·w_l + 0.5))) the model indexed receives the whole
   weight (the clamp puts points outside on the border cells, as the model reads them).
   Either way sum(splat_l · f_l) == the point's contribution to the query's output for every
   value map f_l, so a level cell's value is exactly the weight with which its feature
   entered the query's output (tests prove it against Hugging Face's modules).
2. Levels are combined in input coordinates on level 0's grid (`footprint_weights`): level
   l's cell c covers input pixels [c·s_l, (c+1)·s_l) per axis (the record's cell
   convention); its weight is spread over the level-0 cells that footprint overlaps, in
   proportion to the overlap (along each axis, the overlap length over s_l; for s_l = k·s_0
   each of the k×k level-0 cells under a level-l cell gets 1/k² of it). Level 0 itself maps
   by the identity, so it stays exact; mass is conserved except for the part of a footprint
   beyond level 0's padded grid (padding, cropped anyway). A point of a coarse level thus
   lights the whole area its coarse cells summarise -- the feature it read there -- rather
   than a sharp spot; that is the honest picture, because the model cannot tell apart
   positions inside one coarse cell except through that cell's (bilinear) weight.

`level_combination` "at_points" keeps the earlier geometry: every point, whatever its
level, is splatted bilinearly at its input-pixel location directly on level 0's grid
(u = x·w_l·s_l / s_0 − 0.5; `splat_points`). That is exact on level 0 only; for coarser
levels it shows where the query looked at the finest resolution the record has, not what it
read. Weights of all levels and points add. Each (layer, head) map is made first; then heads
and layers reduce with `reduce_heads` / `reduce_layers`, as for dense attention.

Rollout is not defined for sampled attention: Chefer et al.'s rules propagate relevance
through encoder self-attention over the SAME tokens the decoder attends to, and a deformable
encoder's sampled multi-scale self-attention has no such single-grid matrix; a decoder-only
variant would be a different method under the same name, so `layers="rollout"` raises.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from detection.attention.aggregate import ROLLOUT_LAYERS, HeadChoice, LayerChoice, reduce_heads, reduce_layers
from detection.models.outputs import AttentionRecord, SampledAttention, Sampler

# Splat at most about this many float64 grid values at once (queries are chunked to fit).
_CHUNK_VALUES = 1 << 24


def target_coordinates(
    locations: torch.Tensor, level_sizes: Sequence[Sequence[int]], level_strides: Sequence[int], target_stride: int
) -> torch.Tensor:
    """(..., levels, points, 2) normalised (x, y) -> float64 target cell-centre coords (u, v).

    u = x·w_l·s_l / s_0 − 0.5 and v = y·h_l·s_l / s_0 − 0.5 for a point of level l (see the
    module docstring); target cell c has its centre at coordinate c.
    """
    sizes = torch.tensor([[w, h] for h, w in level_sizes], dtype=torch.float64)  # (levels, 2) (w, h)
    strides = torch.tensor(level_strides, dtype=torch.float64)[:, None]  # (levels, 1)
    extent = (sizes * strides)[:, None, :]  # (levels, 1, 2): padded level extent in input pixels
    pixels = locations.to(torch.float64) * extent
    return pixels / float(target_stride) - 0.5


def splat_points(
    locations: torch.Tensor,
    weights: torch.Tensor,
    level_sizes: Sequence[Sequence[int]],
    level_strides: Sequence[int],
    target_size: Sequence[int],
    target_stride: int,
) -> torch.Tensor:
    """Bilinear splat of weighted sampling points onto one grid: (..., h_0, w_0) float64.

    locations: (..., levels, points, 2) normalised (x, y) over each level's padded grid.
    weights: (..., levels, points). level_sizes: (levels, 2) (h_l, w_l); level_strides:
    (levels,) input pixels per cell. target_size: (h_0, w_0) cells of stride target_stride.
    Points outside the grid keep only their inside corners (zero padding).
    """
    target_h, target_w = (int(v) for v in target_size)
    coords = target_coordinates(locations, level_sizes, level_strides, target_stride)
    weights = weights.to(torch.float64)
    lead = tuple(weights.shape[:-2])
    rows = math.prod(lead)
    corner_x = torch.floor(coords[..., 0])
    corner_y = torch.floor(coords[..., 1])
    fraction_x = coords[..., 0] - corner_x
    fraction_y = coords[..., 1] - corner_y
    grid = torch.zeros(rows, target_h * target_w, dtype=torch.float64)
    for offset_y, share_y in ((0, 1.0 - fraction_y), (1, fraction_y)):
        for offset_x, share_x in ((0, 1.0 - fraction_x), (1, fraction_x)):
            cell_x = corner_x + offset_x
            cell_y = corner_y + offset_y
            inside = (cell_x >= 0) & (cell_x < target_w) & (cell_y >= 0) & (cell_y < target_h)
            flat = torch.where(inside, cell_y * target_w + cell_x, torch.zeros_like(cell_x)).long()
            share = torch.where(inside, weights * share_y * share_x, torch.zeros_like(weights))
            grid.scatter_add_(1, flat.reshape(rows, -1), share.reshape(rows, -1))
    return grid.reshape(*lead, target_h, target_w)


def splat_on_level(
    locations: torch.Tensor, weights: torch.Tensor, level_size: Sequence[int], sampler: Sampler = "bilinear"
) -> torch.Tensor:
    """Transpose of the model's sampling on one level's own grid: (..., h_l, w_l) float64.

    locations: (..., points, 2) normalised (x, y) over the level's padded grid; weights:
    (..., points). sampler "bilinear" (grid_sample, zeros padding, align_corners=False) or
    "nearest" (HF's discrete sampler; see the module docstring).
    """
    height, width = (int(v) for v in level_size)
    if sampler == "bilinear":
        return splat_points(locations[..., None, :, :], weights[..., None, :], ((height, width),), (1,), (height, width), 1)
    if sampler != "nearest":
        raise ValueError(f"sampler must be 'bilinear' or 'nearest', got {sampler!r}")
    # float32 arithmetic and int64 truncation exactly as multi_scale_deformable_attention_v2
    coord = (locations.float() * torch.tensor([[width, height]], device=locations.device) + 0.5).to(torch.int64)
    cell_x = coord[..., 0].clamp(0, width - 1)
    cell_y = coord[..., 1].clamp(0, height - 1)
    lead = tuple(weights.shape[:-1])
    rows = math.prod(lead)
    grid = torch.zeros(rows, height * width, dtype=torch.float64, device=weights.device)
    grid.scatter_add_(1, (cell_y * width + cell_x).reshape(rows, -1), weights.to(torch.float64).reshape(rows, -1))
    return grid.reshape(*lead, height, width)


def footprint_weights(target_cells: int, target_stride: int, level_cells: int, level_stride: int) -> torch.Tensor:
    """(target_cells, level_cells) float64: share of level cell c that falls on target cell i, one axis.

    Cell i of the target grid covers input pixels [i·s_0, (i+1)·s_0), cell c of the level
    [c·s_l, (c+1)·s_l); the share is their overlap length / s_l (identity when the grids agree).
    """
    target_low = torch.arange(target_cells, dtype=torch.float64)[:, None] * target_stride
    level_low = torch.arange(level_cells, dtype=torch.float64)[None, :] * level_stride
    overlap = torch.minimum(target_low + target_stride, level_low + level_stride) - torch.maximum(target_low, level_low)
    return overlap.clamp(min=0.0) / float(level_stride)


def spread_footprint(
    level_map: torch.Tensor, level_stride: int, target_stride: int, target_size: Sequence[int]
) -> torch.Tensor:
    """(..., h_l, w_l) level cells -> (..., h, w) target cells by `footprint_weights` (step 2).

    When s_l is a multiple k of s_0 this is a k×k block repeat divided by k² (fast, exact);
    otherwise the separable overlap matrices are applied.
    """
    height, width = (int(v) for v in target_size)
    level_h, level_w = int(level_map.shape[-2]), int(level_map.shape[-1])
    if level_stride % target_stride == 0:
        factor = level_stride // target_stride
        spread = level_map.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1) / float(factor * factor)
        spread = spread[..., :height, :width]
        missing_h, missing_w = height - int(spread.shape[-2]), width - int(spread.shape[-1])
        if missing_h > 0 or missing_w > 0:  # the level's grid ends before the target's: nothing there
            spread = torch.nn.functional.pad(spread, (0, max(0, missing_w), 0, max(0, missing_h)))
        return spread
    rows = footprint_weights(height, target_stride, level_h, level_stride)  # (h, h_l)
    cols = footprint_weights(width, target_stride, level_w, level_stride)  # (w, w_l)
    return torch.matmul(rows, torch.matmul(level_map, cols.T))


def level_splats(sampled: SampledAttention, image_index: int, query_index: torch.Tensor) -> list[torch.Tensor]:
    """Per level, the exact weights of its padded cells: [(L, heads, N, h_l, w_l) float64, ...].

    Step 1 of the module docstring: cell (y, x) of level l holds the weight with which that
    cell's value entered the chosen queries' outputs (per layer and head), whatever
    `level_combination` the maps use.
    """
    locations = sampled.locations[:, image_index][:, :, query_index].cpu()  # (L, heads, N, levels, points, 2)
    weights = sampled.weights[:, image_index][:, :, query_index].cpu()
    return [
        splat_on_level(locations[..., level, :count, :], weights[..., level, :count], size, sampled.sampler)
        for level, (size, count) in enumerate(zip(sampled.level_sizes, sampled.points_per_level))
    ]


def _level0_cells(sampled: SampledAttention, image_index: int, chosen: torch.Tensor, valid_h: int, valid_w: int) -> torch.Tensor:
    """(L, heads, n, hv, wv) float64 maps of the chosen queries on level 0's valid cells."""
    if sampled.level_combination == "at_points":
        grid = splat_points(
            sampled.locations[:, image_index][:, :, chosen].cpu(), sampled.weights[:, image_index][:, :, chosen].cpu(),
            sampled.level_sizes, sampled.level_strides, sampled.level_sizes[0], sampled.level_strides[0],
        )  # (L, heads, n, h_0, w_0)
        return grid[..., :valid_h, :valid_w]
    target_stride = sampled.level_strides[0]
    total = None
    for level, splat in enumerate(level_splats(sampled, image_index, chosen)):
        if level == 0:
            mapped = splat[..., :valid_h, :valid_w]
        else:
            mapped = spread_footprint(splat, sampled.level_strides[level], target_stride, (valid_h, valid_w))
        total = mapped if total is None else total + mapped
    return total


def sampled_cell_maps(
    sampled: SampledAttention,
    image_index: int,
    query_index: torch.Tensor,
    valid_size: Sequence[int],
    heads: HeadChoice = "mean",
    layers: LayerChoice = "last",
) -> torch.Tensor:
    """Aggregated sampled attention of the chosen queries over level 0's valid cells: (N, hv, wv).

    query_index: (N,) int64 queries, already checked to be in range. valid_size: (hv, wv), the
    unpadded top-left block of level 0's grid (cells outside it are cropped before heads and
    layers are reduced, like the dense path). Levels combine as `sampled.level_combination`
    says (module docstring). Returns float32.
    """
    if layers == ROLLOUT_LAYERS:
        raise ValueError(
            "layers='rollout' is not defined for sampled (deformable) attention: use 'last', "
            "'mean' or a layer index"
        )
    valid_h, valid_w = (int(v) for v in valid_size)
    target_h, target_w = sampled.level_sizes[0]
    layer_count, head_count = int(sampled.weights.shape[0]), int(sampled.weights.shape[2])
    if layers != "mean" and layer_count > 1:  # one layer wanted: splat only that one (validated as usual)
        picked = int(reduce_layers(torch.arange(layer_count), layers, dim=0))
        sampled = dataclasses.replace(sampled, locations=sampled.locations[picked : picked + 1],
                                      weights=sampled.weights[picked : picked + 1])
        layers, layer_count = "last", 1
    chunk = max(1, _CHUNK_VALUES // max(1, layer_count * head_count * target_h * target_w))
    maps = []
    for start in range(0, len(query_index), chunk):
        grid = _level0_cells(sampled, image_index, query_index[start : start + chunk], valid_h, valid_w)
        maps.append(reduce_layers(reduce_heads(grid, heads, dim=1), layers, dim=0))
    if not maps:  # no detections: validate the choices all the same, return (0, hv, wv)
        empty = torch.zeros(layer_count, head_count, 0, valid_h, valid_w, dtype=torch.float64)
        maps.append(reduce_layers(reduce_heads(empty, heads, dim=1), layers, dim=0))
    return torch.cat(maps, dim=0).float()


@dataclass(frozen=True)
class QueryPoints:
    """The sampling points of one query, one layer, in ORIGINAL image pixels (for the point view).

    xy: (P, 2) float64 (x, y) original-image pixel coordinates (pixel (x, y) covers [x, x+1) x
    [y, y+1)); weights: (P,) float64 attention weights; levels, heads: (P,) int64. Only real
    points with weight > 0 that fall inside the image are kept.
    """

    xy: np.ndarray
    weights: np.ndarray
    levels: np.ndarray
    heads: np.ndarray


def query_points(
    attention: AttentionRecord,
    image_index: int,
    query_index: int,
    original_size: Sequence[int],
    layer: int = -1,
    heads: Sequence[int] | None = None,
) -> QueryPoints:
    """Where one query sampled, in original-image pixels: `QueryPoints`.

    A point at normalised (x, y) on level l sits at input pixel (x·w_l·s_l, y·h_l·s_l) (the
    record's convention); for the "nearest" sampler the point shown is the centre of the cell the
    model read, ((c + 0.5)·s_l per axis). Input pixels map to original pixels by the resize
    factors (W / w_in, H / h_in) of this image (`image_sizes`), as `detection.attention.maps` does.
    layer: decoder layer (default the last); heads: head indices (default all).
    """
    sampled = attention.decoder_cross_sampled
    if sampled is None:
        raise ValueError("the point view needs a sampled (deformable) attention record")
    layer_count, head_count = int(sampled.weights.shape[0]), int(sampled.weights.shape[2])
    if not -layer_count <= layer < layer_count:
        raise ValueError(f"layer {layer} out of range for {layer_count} layers")
    chosen_heads = list(range(head_count)) if heads is None else [int(h) for h in heads]
    if any(not 0 <= h < head_count for h in chosen_heads):
        raise ValueError(f"heads {chosen_heads} out of range for {head_count} heads")
    if not 0 <= int(query_index) < sampled.num_queries:
        raise ValueError(f"query_index {query_index} out of range for {sampled.num_queries} queries")
    out_h, out_w = (int(v) for v in original_size)
    input_h, input_w = (int(v) for v in attention.image_sizes[image_index].tolist())
    locations = sampled.locations[layer, image_index, chosen_heads, int(query_index)].double().cpu()  # (h, lv, p, 2)
    weights = sampled.weights[layer, image_index, chosen_heads, int(query_index)].double().cpu()  # (h, lv, p)
    sizes = torch.tensor([[w, h] for h, w in sampled.level_sizes], dtype=torch.float64)[:, None, :]  # (lv, 1, 2)
    strides = torch.tensor(sampled.level_strides, dtype=torch.float64)[:, None, None]
    if sampled.sampler == "nearest":
        cells = (locations.float() * sizes.float() + 0.5).to(torch.int64)  # as the model indexes
        cells = torch.minimum(cells.clamp(min=0), sizes.to(torch.int64) - 1)
        pixels = (cells.double() + 0.5) * strides
    else:
        pixels = locations * sizes * strides
    scale = torch.tensor([out_w / input_w, out_h / input_h], dtype=torch.float64)
    xy = pixels * scale
    real = sampled.point_mask[None].expand_as(weights)
    inside = (xy[..., 0] >= 0) & (xy[..., 0] < out_w) & (xy[..., 1] >= 0) & (xy[..., 1] < out_h)
    keep = real & inside & (weights > 0)
    head_ids = torch.tensor(chosen_heads)[:, None, None].expand_as(weights)
    level_ids = torch.arange(len(sampled.level_sizes))[None, :, None].expand_as(weights)
    return QueryPoints(xy=xy[keep].numpy(), weights=weights[keep].numpy(), levels=level_ids[keep].numpy(),
                       heads=head_ids[keep].numpy())
