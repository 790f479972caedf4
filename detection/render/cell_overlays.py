"""The overlay renderer of predict and the API: an image's overlays drawn from its detections'
cell maps at a display size, chunk by chunk (memory independent of the number of detections)."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from detection.attention.maps import DEFAULT_PERCENTILES, maps_from_cells
from detection.attention.sampled import query_points
from detection.render.overlay import (check_saliency, draw_combined, mass_contours, render_detection_overlay, strongest_map)
from detection.data.image_codec import encode_image
from detection.render.panel import display_size, resize_image
from detection.render.points import render_points
from detection.structures import Detections

#: Default long side of written overlays in pixels (a report shows them at most this large).
DEFAULT_OVERLAY_SIZE = 1600


def _points_overlay(image: np.ndarray, detections: Detections, k: int, attention: Any, options: Any) -> np.ndarray:
    """Detection k's sampling points (one layer: an index, else the last; heads: an index, else all),
    on `image` (the display image: points are placed at its size)."""
    layer = options.layers if isinstance(options.layers, int) else -1
    heads = [options.heads] if isinstance(options.heads, int) else None
    points = query_points(attention, 0, int(detections.query_index[k]), image.shape[:2], layer=layer, heads=heads)
    return render_points(image, points, detections[k])


#: Float32 map pixels made at once while drawing overlays (16 MB): maps come in chunks of
#: detections, so memory does not grow with the number of detections.
MAP_PIXELS_PER_CHUNK = 1 << 22


def overlay_base(image: np.ndarray, overlay_size: int | None) -> np.ndarray:
    """The image overlays of `overlay_size` are drawn on: uint8 (H, W, 3) RGB scaled down so its long
    side is at most `overlay_size` pixels (`render.panel.display_size`, `resize_image`); the image
    itself when it is no larger (or overlay_size is None)."""
    size = display_size(image.shape[:2], overlay_size)
    return image if size == tuple(image.shape[:2]) else resize_image(image, size)


def render_overlays(
    image: np.ndarray,
    detections: Detections,
    cell_maps: torch.Tensor | np.ndarray,
    geometry: dict[str, Any],
    options: Any,
    attention: Any = None,
    per_detection: bool = True,
    style: dict[str, Any] | None = None,
) -> Iterator[tuple[int | None, np.ndarray]]:
    """The overlays of one image at `options.overlay_size`, one at a time: (k, overlay of
    detection k) for k = 0, 1, ... (unless per_detection is False), then (None, the combined overlay).

    image: uint8 RGB, the original image (`detections.image_size`) or its `overlay_base`;
    geometry: how the cells map to pixels (feature_stride, input_size; interpolation and
    percentiles when not the defaults, as `runfolder.maps_npz.map_metadata` gives them); options:
    overlay_size, normalize, overlay_style ("points" draws detection overlays from `attention`, a
    sampled record), layers / heads (`engine.image_files.OutputOptions`); style: the combined
    overlay's drawing options (`render.overlay.draw_combined`: alpha, contour_mass, show_boxes,
    show_labels, display_width). The maps are made MAP_PIXELS_PER_CHUNK pixels at a time; the
    combined overlay folds their per-pixel maximum (`strongest_map`), so it equals `render_overlay`
    of all maps.
    """
    size = display_size(detections.image_size, options.overlay_size)
    if tuple(image.shape[:2]) == size:
        shown = image  # already the overlay base (made in a decoding worker: `engine.display`)
    elif tuple(image.shape[:2]) == tuple(detections.image_size):
        shown = overlay_base(image, options.overlay_size)
    else:
        raise ValueError(f"the image is {tuple(image.shape[:2])}: neither the detections' image size "
                         f"{tuple(detections.image_size)} nor the overlay size {size}")
    style = dict(style or {})
    contour_mass = style.pop("contour_mass", None)
    contours: list[list[np.ndarray]] = []
    shown_detections = detections.resized(size)
    chunk = max(1, MAP_PIXELS_PER_CHUNK // (size[0] * size[1]))
    strongest = None
    for start in range(0, len(detections), chunk):
        maps = maps_from_cells(cell_maps[start : start + chunk], geometry["feature_stride"], geometry["input_size"],
                               size, options.normalize, geometry.get("interpolation", "bilinear"),
                               geometry.get("percentiles", DEFAULT_PERCENTILES))
        maps = check_saliency(maps, size, "maps")
        strongest = strongest_map(maps, strongest, offset=start)
        if contour_mass is not None:
            contours += [mass_contours(saliency, contour_mass) for saliency in maps]
        for offset, saliency in enumerate(maps if per_detection else ()):
            k = start + offset
            if options.overlay_style == "points":
                yield k, _points_overlay(shown, shown_detections, k, attention, options)
            else:
                yield k, render_detection_overlay(shown, shown_detections[k], saliency)
        del maps
    yield None, draw_combined(shown, shown_detections, strongest, contours, **style)


def encode_overlay(rgb: np.ndarray, image_format: str) -> bytes:
    """Lossless PNG encoded fast (`render.overlay.fast_png_params`) or JPEG 92."""
    return encode_image(rgb, f".{image_format}", jpeg_quality=92, png_compression="fast")
