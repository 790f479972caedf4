"""Point view of deformable attention: one query's sampling points as dots on the original image.

As in the Deformable DETR paper's figure: each sampling point is a dot at the place it read,
its AREA proportional to its attention weight (relative to the heaviest point drawn) and its
colour that of its feature level (level 0, the finest, first). Points come from
`detection.attention.sampled.query_points` (original-image pixels); this module only draws.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from detection.attention.sampled import QueryPoints
from detection.render.colors import class_color
from detection.render.labels import check_detections, draw_detections
from detection.data.image_codec import check_image
from detection.structures import Detections

# sub-pixel dot centres: OpenCV takes fixed-point coordinates with this many fractional bits
_SHIFT = 4


def level_color(level: int) -> tuple[int, int, int]:
    """RGB colour of a feature level in the point view (the stable palette: blue, orange, green, red...)."""
    return class_color(level)


def dot_radii(weights: np.ndarray, max_radius: float) -> np.ndarray:
    """(P,) radii in pixels: area proportional to weight, the heaviest point `max_radius`, none under 1 px."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size == 0:
        return np.zeros(0)
    return np.maximum(1.0, max_radius * np.sqrt(weights / weights.max()))


def render_points(
    image_rgb: np.ndarray,
    points: QueryPoints,
    detections: Detections | None = None,
    max_radius: float | None = None,
    levels: Sequence[int] | None = None,
) -> np.ndarray:
    """The image with `points` drawn as dots (largest first, so small ones stay visible).

    points: from `query_points(...)` for the image's original size. detections: optionally the
    one detection (`detections[k]`) whose query the points belong to; its box is drawn too.
    max_radius: radius of the heaviest dot, default 2% of the shorter side (>= 3 px).
    levels: draw only these levels (default all).
    """
    image = check_image(image_rgb).copy()
    height, width = image.shape[:2]
    if detections is not None:
        check_detections(detections, image.shape)
        if len(detections) != 1:
            raise ValueError(f"render_points draws the points of one detection, got {len(detections)}")
        image = draw_detections(image, detections)
    radius_max = max(3.0, 0.02 * min(height, width)) if max_radius is None else float(max_radius)
    keep = np.ones(len(points.weights), dtype=bool) if levels is None else np.isin(points.levels, list(levels))
    xy, weights, point_levels = points.xy[keep], points.weights[keep], points.levels[keep]
    radii = dot_radii(weights, radius_max)
    scale = 1 << _SHIFT
    for index in np.argsort(-weights, kind="stable"):
        x, y = xy[index]
        # pixel (i, j) covers [i, i+1): its centre, where OpenCV puts integer coordinates, is i + 0.5
        centre = (int(round((x - 0.5) * scale)), int(round((y - 0.5) * scale)))
        radius = int(round(radii[index] * scale))
        color = level_color(int(point_levels[index]))
        cv2.circle(image, centre, radius, color, thickness=cv2.FILLED, lineType=cv2.LINE_AA, shift=_SHIFT)
        if radii[index] >= 3:  # a thin dark rim keeps dots readable on any background
            outline = max(1, int(math.ceil(radii[index] / 8)))
            cv2.circle(image, centre, radius, (0, 0, 0), thickness=outline, lineType=cv2.LINE_AA, shift=_SHIFT)
    return image


__all__ = ["dot_radii", "level_color", "render_points"]
