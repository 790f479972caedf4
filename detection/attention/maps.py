"""Attention -> saliency maps in original-image pixels: the ONLY place a map is resized.

Geometry (see `detection/models/outputs.py` for the record's conventions; for sampled attention
the grid is the finest level's, onto which `detection.attention.sampled` splats the points):

1. Crop padding. The valid feature cells of image b are the top-left (hv, wv) block where
   `feature_padding_mask[b]` is False (checked to be such a block). Everything else is dropped
   BEFORE any aggregation, so an image inside a padded batch gives exactly the map it gives alone.
2. True stride. Valid cell (y, x) covers input pixels [y·s, (y+1)·s) × [x·s, (x+1)·s); the cells
   cover [0, hv·s) × [0, wv·s), which may extend past the pre-padding input size (h_in, w_in)
   (`image_sizes[b]`); that overhang is cropped.
3. Original size. Input pixels map linearly to original pixels (scale H/h_in, W/w_in per axis).

Interpolation. "bilinear" (default) treats each cell value as a sample at the cell's centre
((y + 0.5)·s, (x + 0.5)·s) in input pixels and interpolates linearly between centres, holding
the border value beyond the outer centres -- exactly `F.interpolate(..., "bilinear",
align_corners=False)` from (hv, wv) to (hv·s, wv·s) followed by the crop and the resize to (H, W),
except that the composed coordinate map is sampled ONCE per original pixel (pixel centres at
+0.5), so no second interpolation blurs the map. "nearest" paints each cell as a flat block
(useful to see cells, and for exact geometry tests).
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

from detection.attention.aggregate import (
    ROLLOUT_LAYERS,
    HeadChoice,
    LayerChoice,
    NormalizeChoice,
    decoder_rollout,
    encoder_rollout,
    normalize_maps,
    reduce_heads,
    reduce_layers,
    self_relevance,
)
from detection.attention.sampled import sampled_cell_maps
from detection.models.outputs import AttentionRecord

Interpolation = Literal["bilinear", "nearest"]
DEFAULT_PERCENTILES = (1.0, 99.0)


# -- geometry -----------------------------------------------------------------------------
def valid_feature_size(feature_padding_mask: torch.Tensor) -> tuple[int, int]:
    """(hv, wv) of the unpadded top-left block of one (h, w) feature padding mask (True = pad)."""
    if feature_padding_mask.ndim != 2:
        raise ValueError(f"feature padding mask must be (h, w), got {tuple(feature_padding_mask.shape)}")
    valid = ~feature_padding_mask.bool().cpu()
    rows = int(valid.any(dim=1).sum())
    cols = int(valid.any(dim=0).sum())
    expected = torch.zeros_like(valid)
    expected[:rows, :cols] = True
    if rows == 0 or cols == 0 or not torch.equal(valid, expected):
        raise ValueError(
            "feature padding mask is not a top-left block of valid cells "
            f"(valid rows {rows}, cols {cols}); padding must be at the bottom/right"
        )
    return rows, cols


def image_geometry(attention: AttentionRecord, image_index: int) -> tuple[int, int, int, int]:
    """(hv, wv, h_in, w_in) of one image, validated against the stride (level 0's if sampled)."""
    batch = attention.batch_size
    if not 0 <= int(image_index) < batch:
        raise ValueError(f"image_index {image_index} out of range for a batch of {batch}")
    stride = int(attention.feature_stride)
    if stride <= 0:
        raise ValueError(f"feature_stride must be positive, got {attention.feature_stride}")
    valid_h, valid_w = valid_feature_size(attention.feature_padding_mask[image_index])
    input_h, input_w = (int(v) for v in attention.image_sizes[image_index].tolist())
    if input_h <= 0 or input_w <= 0:
        raise ValueError(f"image_sizes[{image_index}] must be positive, got {(input_h, input_w)}")
    if valid_h * stride < input_h or valid_w * stride < input_w:
        raise ValueError(
            f"valid feature cells ({valid_h}, {valid_w}) x stride {stride} cover less than the "
            f"input size ({input_h}, {input_w}) of image {image_index}: record is inconsistent"
        )
    return valid_h, valid_w, input_h, input_w


def valid_flat_indices(feature_size: tuple[int, int], valid_h: int, valid_w: int) -> torch.Tensor:
    """Row-major flat indices (into h*w) of the valid (hv, wv) block."""
    _, width = feature_size
    rows = torch.arange(valid_h).unsqueeze(1) * width
    return (rows + torch.arange(valid_w).unsqueeze(0)).reshape(-1)


def _axis_weights(
    out_len: int, input_len: int, cells: int, stride: int, interpolation: Interpolation
) -> np.ndarray:
    """(out_len, cells) float32 weights: original pixel p <- feature cells, along one axis.

    Original pixel centre p + 0.5 sits at input coordinate (p + 0.5)·input_len/out_len.
    """
    centres = (np.arange(out_len, dtype=np.float64) + 0.5) * (input_len / out_len)
    weights = np.zeros((out_len, cells), dtype=np.float64)
    rows = np.arange(out_len)
    if interpolation == "nearest":
        index = np.minimum(np.floor(centres / stride).astype(np.int64), cells - 1)
        weights[rows, index] = 1.0
    elif interpolation == "bilinear":
        position = centres / stride - 0.5  # in cell-centre units: cell c has its centre at c
        lower = np.floor(position)
        fraction = position - lower
        lower = lower.astype(np.int64)
        np.add.at(weights, (rows, np.clip(lower, 0, cells - 1)), 1.0 - fraction)
        np.add.at(weights, (rows, np.clip(lower + 1, 0, cells - 1)), fraction)
    else:
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    return weights.astype(np.float32)


def check_size(size: Sequence[int], name: str) -> tuple[int, int]:
    if len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
        raise ValueError(f"{name} must be a positive (height, width), got {tuple(size)}")
    return int(size[0]), int(size[1])


def cells_to_image(
    cell_maps: torch.Tensor | np.ndarray,
    feature_stride: int,
    input_size: Sequence[int],
    original_size: Sequence[int],
    interpolation: Interpolation = "bilinear",
) -> np.ndarray:
    """Map (N, hv, wv) maps over VALID feature cells to (N, H, W) float32 original pixels.

    input_size: (h_in, w_in) pre-padding input size; hv·stride >= h_in and wv·stride >= w_in.
    original_size: (H, W) of the original image. See the module docstring for the geometry.
    """
    maps = cell_maps.detach().float().cpu().numpy() if isinstance(cell_maps, torch.Tensor) else cell_maps
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"cell maps must be (N, hv, wv), got shape {maps.shape}")
    input_h, input_w = check_size(input_size, "input_size")
    out_h, out_w = check_size(original_size, "original_size")
    _, valid_h, valid_w = maps.shape
    if valid_h * feature_stride < input_h or valid_w * feature_stride < input_w:
        raise ValueError(
            f"cells ({valid_h}, {valid_w}) x stride {feature_stride} do not cover input size {(input_h, input_w)}"
        )
    rows = _axis_weights(out_h, input_h, valid_h, feature_stride, interpolation)
    cols = _axis_weights(out_w, input_w, valid_w, feature_stride, interpolation)
    # separable resampling (H, hv) @ (N, hv, wv) @ (wv, W), the small product first; torch's
    # matmul runs on torch's own thread pool (numpy's OpenBLAS threads fight it: 5-20x slower)
    rows_t, cols_t = torch.from_numpy(rows), torch.from_numpy(cols)
    return torch.matmul(rows_t, torch.matmul(torch.from_numpy(np.ascontiguousarray(maps)), cols_t.T)).numpy()


def image_to_cells(
    image_maps: np.ndarray,
    feature_stride: int,
    input_size: Sequence[int],
    grid_size: Sequence[int],
) -> np.ndarray:
    """(N, H, W) original-pixel maps -> (N, hv, wv) float32 means over each cell's pixels (the pooling
    that `cells_to_image` inverts): original pixel p belongs to the cell its centre falls in, as in
    `cells_to_image`'s "nearest" weights; a cell no pixel centre falls in gets 0."""
    maps = np.asarray(image_maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"image maps must be (N, H, W), got shape {maps.shape}")
    out_h, out_w = maps.shape[1:]
    input_h, input_w = check_size(input_size, "input_size")
    valid_h, valid_w = check_size(grid_size, "grid_size")
    rows = torch.from_numpy(_axis_weights(out_h, input_h, valid_h, feature_stride, "nearest"))  # (H, hv)
    cols = torch.from_numpy(_axis_weights(out_w, input_w, valid_w, feature_stride, "nearest"))  # (W, wv)
    sums = torch.matmul(rows.T, torch.matmul(torch.from_numpy(np.ascontiguousarray(maps)), cols))
    counts = torch.outer(rows.sum(dim=0), cols.sum(dim=0))
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums)).numpy()


def image_points_to_cells(
    points: Sequence[Sequence[float]] | np.ndarray,
    original_size: Sequence[int],
    input_size: Sequence[int],
    feature_stride: int,
    valid_size: Sequence[int],
) -> np.ndarray:
    """(P, 2) original-pixel points (y, x) -> (P, 2) int64 valid feature cells (row, col).

    A point is in pixel units of the original image (pixel (y, x) covers [y, y+1) x [x, x+1)).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    out_h, out_w = check_size(original_size, "original_size")
    input_h, input_w = check_size(input_size, "input_size")
    inside = (points[:, 0] >= 0) & (points[:, 0] < out_h) & (points[:, 1] >= 0) & (points[:, 1] < out_w)
    if not inside.all():
        bad = points[~inside][0].tolist()
        raise ValueError(f"point (y, x) = {bad} lies outside the original image of size {(out_h, out_w)}")
    input_y = points[:, 0] * (input_h / out_h)
    input_x = points[:, 1] * (input_w / out_w)
    row = np.minimum(np.floor(input_y / feature_stride).astype(np.int64), int(valid_size[0]) - 1)
    col = np.minimum(np.floor(input_x / feature_stride).astype(np.int64), int(valid_size[1]) - 1)
    return np.stack([row, col], axis=1)


# -- decoder cross-attention per detection ---------------------------------------------------
def _check_queries(query_index: torch.Tensor | Sequence[int], num_queries: int) -> torch.Tensor:
    index = torch.as_tensor(query_index, dtype=torch.int64).reshape(-1).cpu()
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= num_queries):
        raise ValueError(f"query_index values must lie in [0, {num_queries}), got {index.tolist()}")
    return index


def query_cell_maps(
    attention: AttentionRecord,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    heads: HeadChoice = "mean",
    layers: LayerChoice = "last",
) -> torch.Tensor:
    """Aggregated cross-attention of the chosen queries over the valid cells: (N, hv, wv) float32.

    THE function from either kind of record to per-query cell maps. This is the
    feature-resolution map (e.g. for Chefer et al.'s segmentation protocol); `detection_maps`
    maps it to image pixels. Dense kind: layers="rollout" uses `decoder_rollout` with the
    record's decoder self-attention and encoder self-attention (via `self_relevance`) when the
    record carries them, and plain cross-attention terms otherwise. Sampled kind: the points
    are splatted onto the finest level's grid (`detection.attention.sampled`; no rollout).
    """
    valid_h, valid_w, _, _ = image_geometry(attention, image_index)
    if attention.kind == "sampled":
        index = _check_queries(query_index, attention.num_queries)
        return sampled_cell_maps(attention.decoder_cross_sampled, image_index, index, (valid_h, valid_w), heads, layers)
    cross = attention.decoder_cross[:, image_index]  # (L, heads, Q, h, w)
    if cross.ndim != 5:
        raise ValueError(f"decoder_cross must be (L, B, heads, Q, h, w), got {tuple(attention.decoder_cross.shape)}")
    index = _check_queries(query_index, int(cross.shape[2]))
    if layers != ROLLOUT_LAYERS:  # only the chosen queries' maps are needed: select before copying to float32
        selected = cross[:, :, index.to(cross.device)][..., :valid_h, :valid_w].float().cpu()  # (L, heads, N, hv, wv)
        return reduce_layers(reduce_heads(selected, heads, dim=1), layers, dim=0).float()
    cross = cross[..., :valid_h, :valid_w].float().cpu()
    layer_count, _, query_count = cross.shape[:3]
    cross_flat = reduce_heads(cross.reshape(layer_count, cross.shape[1], query_count, -1), heads, dim=1)
    decoder_self = None
    if attention.decoder_self is not None:
        decoder_self = reduce_heads(attention.decoder_self[:, image_index].float().cpu(), heads, dim=1)
    encoder_relevance = None
    if attention.encoder_self is not None:
        encoder_relevance = self_relevance(_valid_encoder_attention(attention, image_index, heads, valid_h, valid_w))
    relevance = decoder_rollout(cross_flat, decoder_self, encoder_relevance)  # (Q, hv*wv)
    return relevance[index].reshape(len(index), valid_h, valid_w).float()


def detection_maps(
    attention: AttentionRecord,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    original_size: Sequence[int],
    heads: HeadChoice = "mean",
    layers: LayerChoice = "last",
    normalize: NormalizeChoice = "minmax",
    interpolation: Interpolation = "bilinear",
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> np.ndarray:
    """Per-detection saliency in original-image pixels: (N, H, W) float32.

    attention: record of a (padded) batch, either kind (dense or sampled); image_index picks
    the image. Cells come from `query_cell_maps`, pixels from `cells_to_image`.
    query_index: (N,) decoder query of each detection (`Detections.query_index`).
    original_size: (H, W) of the original image (`Detections.image_size`).
    heads / layers: see `detection.attention.aggregate`; normalize: per map, after mapping.
    """
    cells = query_cell_maps(attention, image_index, query_index, heads=heads, layers=layers)
    _, _, input_h, input_w = image_geometry(attention, image_index)
    return maps_from_cells(cells, attention.feature_stride, (input_h, input_w), original_size,
                           normalize, interpolation, percentiles)


def maps_from_cells(
    cell_maps: torch.Tensor | np.ndarray,
    feature_stride: int,
    input_size: Sequence[int],
    size: Sequence[int],
    normalize: NormalizeChoice = "minmax",
    interpolation: Interpolation = "bilinear",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """(N, hv, wv) cell maps -> (N, h, w) float32 saliency at any pixel size, normalised per map.

    The one way a cell map becomes a displayed / exported map: `cells_to_image` to `size`, then
    `normalize_maps` (normalisation after resizing). `size` is the original image size (H, W)
    or any other (h, w) of the same image (a display size): original pixels scale linearly to it,
    so the same cells give the map `detection_maps` gives at (H, W) and its exact resampling at
    (h, w) -- with no full-resolution map in between.
    """
    maps = cells_to_image(cell_maps, feature_stride, input_size, size, interpolation)
    # cells_to_image made `maps`: normalised in place, no second image-size buffer
    return normalize_maps(maps, normalize, (float(percentiles[0]), float(percentiles[1])), copy=False)


# -- encoder self-attention at points -------------------------------------------------------
def _valid_encoder_attention(
    attention: AttentionRecord, image_index: int, heads: HeadChoice, valid_h: int, valid_w: int
) -> torch.Tensor:
    """(L, K, K) head-aggregated encoder self-attention restricted to the valid cells."""
    if attention.kind == "sampled":
        raise ValueError("encoder self-attention maps need a dense record; this record's attention is sampled (deformable)")
    if attention.encoder_self is None:
        raise ValueError("the attention record has no encoder self-attention (run the model with encoder_attention=True)")
    encoder = attention.encoder_self[:, image_index].float().cpu()  # (L, heads, h*w, h*w)
    feature_size = attention.feature_size
    cells = feature_size[0] * feature_size[1]
    if encoder.ndim != 4 or encoder.shape[-1] != cells or encoder.shape[-2] != cells:
        raise ValueError(
            f"encoder_self must be (L, B, heads, {cells}, {cells}) for feature size {feature_size}, "
            f"got {tuple(attention.encoder_self.shape)}"
        )
    flat = valid_flat_indices(feature_size, valid_h, valid_w)
    encoder = encoder[:, :, flat][:, :, :, flat]
    return reduce_heads(encoder, heads, dim=1)


def encoder_point_maps(
    attention: AttentionRecord,
    image_index: int,
    points: Sequence[Sequence[float]] | np.ndarray,
    original_size: Sequence[int],
    direction: Literal["outgoing", "incoming"] = "outgoing",
    heads: HeadChoice = "mean",
    layers: LayerChoice = "last",
    normalize: NormalizeChoice = "minmax",
    interpolation: Interpolation = "bilinear",
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> np.ndarray:
    """Encoder self-attention at original-image points (y, x): (P, H, W) float32.

    direction "outgoing": where the point's feature cell looks (its ROW of the attention matrix,
    a distribution over keys). "incoming": which cells look at it (its COLUMN; not a
    distribution, so normalise). layers "rollout" uses Abnar & Zuidema's `encoder_rollout`.
    """
    valid_h, valid_w, input_h, input_w = image_geometry(attention, image_index)
    encoder = _valid_encoder_attention(attention, image_index, heads, valid_h, valid_w)  # (L, K, K)
    matrix = encoder_rollout(encoder) if layers == ROLLOUT_LAYERS else reduce_layers(encoder, layers, dim=0)
    cells = image_points_to_cells(points, original_size, (input_h, input_w), attention.feature_stride, (valid_h, valid_w))
    flat = torch.as_tensor(cells[:, 0] * valid_w + cells[:, 1])
    if direction == "outgoing":
        selected = matrix[flat]
    elif direction == "incoming":
        selected = matrix[:, flat].T
    else:
        raise ValueError(f"direction must be 'outgoing' or 'incoming', got {direction!r}")
    cell_maps = selected.reshape(len(flat), valid_h, valid_w)
    return maps_from_cells(cell_maps, attention.feature_stride, (input_h, input_w), original_size, normalize,
                           interpolation, percentiles)
