"""The overlays of one predicted image, drawn at a display size: the image scaled down so its long
side is at most `OutputOptions.overlay_size`, each detection's map resampled straight from its cells
to that size (`attention.maps.maps_from_cells`), boxes scaled; no full-resolution map unless the
size is "original" (None).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from detection.attention.maps import DEFAULT_PERCENTILES, maps_from_cells
from detection.attention.sampled import query_points
from detection.render.overlay import encode_image, render_detection_overlay, render_overlay
from detection.render.panel import display_size, resize_image
from detection.render.points import render_points
from detection.structures import Detections

#: Default long side of written overlays in pixels (a report shows them at most this large).
DEFAULT_OVERLAY_SIZE = 1600


def overlay_layers(
    image: np.ndarray,
    detections: Detections,
    cell_maps: torch.Tensor | np.ndarray,
    feature_stride: int,
    input_size: Sequence[int],
    long_side: int | None,
    normalize: Any = "minmax",
    interpolation: Any = "bilinear",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> tuple[np.ndarray, Detections, np.ndarray]:
    """What an overlay is drawn from, at the display size (h, w) = `display_size(H, W, long_side)`:
    (image (h, w, 3) uint8, detections with boxes in display pixels, maps (N, h, w) float32).

    image: (H, W, 3) uint8 original; cell_maps: (N, hv, wv) `query_cell_maps` of `detections`
    (geometry feature_stride / input_size as in `attention.maps.cells_to_image`).
    """
    size = display_size(detections.image_size, long_side)
    shown = image if size == tuple(image.shape[:2]) else resize_image(image, size)
    maps = maps_from_cells(cell_maps, feature_stride, input_size, size, normalize, interpolation, percentiles)
    return shown, detections.resized(size), maps


def _points_overlay(image: np.ndarray, detections: Detections, k: int, attention: Any, options: Any) -> np.ndarray:
    """Detection k's sampling points (one layer: an index, else the last; heads: an index, else all),
    on `image` (the display image: points are placed at its size)."""
    layer = options.layers if isinstance(options.layers, int) else -1
    heads = [options.heads] if isinstance(options.heads, int) else None
    points = query_points(attention, 0, int(detections.query_index[k]), image.shape[:2], layer=layer, heads=heads)
    return render_points(image, points, detections[k])


def render_overlays(
    image: np.ndarray,
    detections: Detections,
    cell_maps: torch.Tensor | np.ndarray,
    geometry: dict[str, Any],
    options: Any,
    attention: Any = None,
) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """The combined overlay and the overlays of detection 0, 1, ... (rendered one at a time, as the
    iterator is consumed), at `options.overlay_size`.

    geometry: `attention.maps.map_metadata` of the image (feature_stride, input_size,
    normalize, interpolation, percentiles). options: `engine.outputs.OutputOptions`;
    overlay_style "points" draws detection overlays from `attention` (a sampled record).
    """
    shown, shown_detections, maps = overlay_layers(
        image, detections, cell_maps, geometry["feature_stride"], geometry["input_size"], options.overlay_size,
        options.normalize, geometry.get("interpolation", "bilinear"), geometry.get("percentiles", DEFAULT_PERCENTILES))
    combined = render_overlay(shown, shown_detections, maps)

    def singles() -> Iterator[np.ndarray]:
        for k in range(len(detections)):
            if options.overlay_style == "points":
                yield _points_overlay(shown, shown_detections, k, attention, options)
            else:
                yield render_detection_overlay(shown, shown_detections[k], maps[k])

    return combined, singles()


def encode_overlay(rgb: np.ndarray, image_format: str) -> bytes:
    """PNG level 1 (~5x faster to write than the default 6 for ~15 % more bytes) or JPEG 92."""
    return encode_image(rgb, f".{image_format}", jpeg_quality=92, png_compression=1)
