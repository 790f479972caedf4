"""Precision-recall plots drawn with OpenCV (no matplotlib): RGB uint8 images.

Curve i gets `class_color(i)`, the same palette as the overlays.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from detection.render.colors import class_color


def draw_pr_plot(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str, size: tuple[int, int] = (520, 720)) -> np.ndarray:
    """RGB uint8 (H, W, 3) plot of precision (y) against recall (x), both in [0, 1].

    curves: (label, recall (R,), precision (R,)); points with precision < 0 (undefined) are skipped.
    """
    height, width = size
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, width - 20, 40, height - 60
    font = cv2.FONT_HERSHEY_SIMPLEX

    def to_px(x: float, y: float) -> tuple[int, int]:
        return int(round(left + x * (right - left))), int(round(bottom - y * (bottom - top)))

    for tick in np.linspace(0, 1, 6):
        x, _ = to_px(tick, 0)
        _, y = to_px(0, tick)
        cv2.line(canvas, (x, top), (x, bottom), (225, 225, 225), 1)
        cv2.line(canvas, (left, y), (right, y), (225, 225, 225), 1)
        cv2.putText(canvas, f"{tick:.1f}", (x - 12, bottom + 20), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(canvas, f"{tick:.1f}", (left - 38, y + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (left, top), (right, bottom), (0, 0, 0), 1)
    cv2.putText(canvas, "recall", ((left + right) // 2 - 25, height - 20), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "precision", (5, top - 12), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, title, (left + 90, top - 12), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    for index, (label, recall, precision) in enumerate(curves):
        colour = class_color(index)
        valid = np.asarray(precision) >= 0
        points = np.array([to_px(r, p) for r, p in zip(np.asarray(recall)[valid], np.asarray(precision)[valid])], np.int32)
        if len(points) >= 2:
            cv2.polylines(canvas, [points.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
    # legend bottom-left (low recall, low precision: the corner PR curves rarely visit), boxed
    if curves:
        legend_top = bottom - 10 - 20 * len(curves)
        cv2.rectangle(canvas, (left + 8, legend_top - 8), (left + 300, bottom - 6), (255, 255, 255), -1)
        cv2.rectangle(canvas, (left + 8, legend_top - 8), (left + 300, bottom - 6), (160, 160, 160), 1)
        for index, (label, _, _) in enumerate(curves):
            colour = class_color(index)
            legend_y = legend_top + 12 + 20 * index
            cv2.line(canvas, (left + 16, legend_y - 5), (left + 41, legend_y - 5), colour, 3)
            cv2.putText(canvas, label[:34], (left + 48, legend_y), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas
