"""Sampled (multi-scale deformable) attention -> per-query maps over the finest level's cells.

`detection.attention.maps.query_cell_maps` calls this for records of the "sampled" kind; the
map then takes the same crop and the same single resize path as a dense map.

Geometry of one sampling point (conventions in `detection.models.outputs.SampledAttention`).
A point of level l at normalised (x, y) sits at input pixel (x·w_l·s_l, y·h_l·s_l) (the level's
padded grid covers [0, w_l·s_l) input pixels). The target grid is level 0's grid (h_0, w_0),
stride s_0, whose cell c has its centre at input pixel (c + 0.5)·s_0, so the point's target
cell-centre coordinate is

    u = x·w_l·s_l / s_0 − 0.5,    v = y·h_l·s_l / s_0 − 0.5.

For level 0 this is u = x·w_0 − 0.5, grid_sample's own (align_corners=False) coordinate. The
point's weight is splatted with bilinear weights onto the four cells around (u, v): cell
(⌊v⌋ + j, ⌊u⌋ + i) receives weight·(1 − |v − ⌊v⌋ − j|)·(1 − |u − ⌊u⌋ − i|), i, j ∈ {0, 1}, and
corners outside the grid are dropped (zero padding). On level 0 this is exactly the transpose
(adjoint) of `F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`:
sum(splat · f) == weight · grid_sample(f, point) for every grid f. A point of a coarser level
is placed at its input-pixel location on the finest grid (its coarse cell's footprint is not
spread), so the map says where the query looked at the finest resolution the record has.
Weights of all levels and points add. Each (layer, head) map is splatted first; then heads
and layers reduce with `reduce_heads` / `reduce_layers`, as for dense attention.

Rollout is not defined for sampled attention: Chefer et al.'s rules propagate relevance
through encoder self-attention over the SAME tokens the decoder attends to, and a deformable
encoder's sampled multi-scale self-attention has no such single-grid matrix; a decoder-only
variant would be a different method under the same name, so `layers="rollout"` raises.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from detection.attention.aggregate import HeadChoice, LayerChoice, reduce_heads, reduce_layers
from detection.models.outputs import SampledAttention

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
    unpadded top-left block of level 0's grid (cells outside it are cropped after splatting,
    before heads and layers are reduced, like the dense path). Returns float32.
    """
    if layers == "rollout":
        raise ValueError(
            "layers='rollout' is not defined for sampled (deformable) attention: use 'last', "
            "'mean' or a layer index"
        )
    valid_h, valid_w = (int(v) for v in valid_size)
    locations = sampled.locations[:, image_index].cpu()  # (L, heads, Q, levels, points, 2)
    weights = sampled.weights[:, image_index].cpu()  # (L, heads, Q, levels, points)
    target_h, target_w = sampled.level_sizes[0]
    layer_count, head_count = int(weights.shape[0]), int(weights.shape[1])
    chunk = max(1, _CHUNK_VALUES // max(1, layer_count * head_count * target_h * target_w))
    maps = []
    for start in range(0, len(query_index), chunk):
        chosen = query_index[start : start + chunk]
        grid = splat_points(
            locations[:, :, chosen], weights[:, :, chosen], sampled.level_sizes, sampled.level_strides,
            (target_h, target_w), sampled.level_strides[0],
        )  # (L, heads, n, h_0, w_0)
        grid = grid[..., :valid_h, :valid_w]
        maps.append(reduce_layers(reduce_heads(grid, heads, dim=1), layers, dim=0))
    if not maps:  # no detections: validate the choices all the same, return (0, hv, wv)
        empty = torch.zeros(layer_count, head_count, 0, valid_h, valid_w, dtype=torch.float64)
        maps.append(reduce_layers(reduce_heads(empty, heads, dim=1), layers, dim=0))
    return torch.cat(maps, dim=0).float()
