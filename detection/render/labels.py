"""Boxes and labels drawn on uint8 RGB images: text sizes that scale with the image, a label on a
filled box in the class colour, and the box outlines of detections."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from detection.data.image_codec import check_image
from detection.render.colors import class_color, text_color_on
from detection.structures import Detections

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def check_detections(detections: Detections, image_shape: Sequence[int]) -> None:
    if tuple(detections.image_size) != tuple(image_shape[:2]):
        raise ValueError(
            f"detections are for an image of size {detections.image_size}, the image is {tuple(image_shape[:2])}"
        )


@dataclass(frozen=True)
class TextStyle:
    """Sizes for one image: Hershey font scale and thickness, box line width, label padding (px)."""

    font_scale: float
    thickness: int
    line_width: int
    padding: int


def text_style(height: int, width: int, display_width: int | None = None) -> TextStyle:
    """Text about 3% of the shorter side tall (never under 10 px), lines ~0.4% of it (>= 1 px).

    display_width: the width the image will be SHOWN at (e.g. a panel tile). Sizes are then
    chosen for the displayed image and scaled up by width / display_width, so text drawn on a
    large image that is later shrunk still reads at >= 10 px.
    """
    zoom = max(1.0, int(width) / display_width) if display_width else 1.0
    shorter = min(int(height), int(width)) / zoom
    text_height = max(10.0, 0.03 * shorter) * zoom
    # FONT_HERSHEY_SIMPLEX capitals are 22 px tall at scale 1
    scale = text_height / 22.0
    return TextStyle(
        font_scale=scale,
        thickness=max(1, int(round(scale * 1.6))),
        line_width=max(1, int(round(max(1.0, shorter / 250.0) * zoom))),
        padding=max(2, int(round(text_height * 0.3))),
    )


def ascii_text(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only; anything else becomes '?'."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in str(text))


def label_size(text: str, style: TextStyle) -> tuple[int, int]:
    """(width, height) in pixels of a drawn label including its padded background box."""
    (text_w, text_h), baseline = cv2.getTextSize(ascii_text(text), _FONT, style.font_scale, style.thickness)
    return text_w + 2 * style.padding, text_h + baseline + 2 * style.padding


def draw_label(
    image: np.ndarray, text: str, x: int, y: int, background: tuple[int, int, int], style: TextStyle
) -> tuple[int, int, int, int]:
    """Draw `text` on a filled box whose top-left is (x, y), shifted to stay inside the image.

    Modifies `image` in place; returns the box (x0, y0, x1, y1) actually used (exclusive ends).
    """
    text = ascii_text(text)
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, style.font_scale, style.thickness)
    box_w, box_h = label_size(text, style)
    height, width = image.shape[:2]
    x = int(min(max(0, x), max(0, width - box_w)))
    y = int(min(max(0, y), max(0, height - box_h)))
    cv2.rectangle(image, (x, y), (x + box_w - 1, y + box_h - 1), background, thickness=cv2.FILLED)
    origin = (x + style.padding, y + style.padding + text_h)
    cv2.putText(image, text, origin, _FONT, style.font_scale, text_color_on(background), style.thickness, cv2.LINE_AA)
    return x, y, x + box_w, y + box_h


def detection_label(detections: Detections, index: int, show_score: bool = True) -> str:
    """"<class name> <score>" of detection `index` (falls back to "class <label>")."""
    if detections.has("class_names"):
        name = str(detections.class_names[index])
    else:
        name = f"class {int(detections.labels[index])}"
    if show_score and detections.has("scores"):
        return f"{name} {float(detections.scores[index]):.2f}"
    return name


def _pixel_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """xyxy (continuous pixels) -> inclusive integer corners clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    left = int(np.clip(np.floor(x0), 0, width - 1))
    top = int(np.clip(np.floor(y0), 0, height - 1))
    right = int(np.clip(np.ceil(x1) - 1, left, width - 1))
    bottom = int(np.clip(np.ceil(y1) - 1, top, height - 1))
    return left, top, right, bottom


def draw_boxes_and_labels(
    image: np.ndarray, detections: Detections, style: TextStyle, show_labels: bool, show_scores: bool
) -> None:
    """Boxes first, then labels (highest score drawn last, so on top). In place."""
    height, width = image.shape[:2]
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
    colors = [class_color(int(label)) for label in np.asarray(detections.labels).reshape(-1)]
    corners = [_pixel_box(box, height, width) for box in boxes]
    for (left, top, right, bottom), color in zip(corners, colors):
        # axis-aligned: no anti-aliasing needed, and edges keep the exact class colour
        cv2.rectangle(image, (left, top), (right, bottom), color, style.line_width, cv2.LINE_8)
    if not show_labels:
        return
    scores = np.asarray(detections.scores).reshape(-1) if detections.has("scores") else np.zeros(len(corners))
    for index in np.argsort(scores, kind="stable"):
        left, top, _, _ = corners[index]
        text = detection_label(detections, int(index), show_scores)
        _, box_h = label_size(text, style)
        # above the box when there is room, else just inside its top edge
        label_top = top - box_h if top - box_h >= 0 else top
        draw_label(image, text, left, label_top, colors[index], style)


def draw_detections(
    image_rgb: np.ndarray,
    detections: Detections,
    show_labels: bool = True,
    show_scores: bool = True,
    display_width: int | None = None,
) -> np.ndarray:
    """Image with each detection's box in its class colour and a "<class> <score>" label.

    display_width: see `text_style` (for images shown smaller than they are, e.g. in panels).
    """
    image = check_image(image_rgb).copy()
    check_detections(detections, image.shape)
    draw_boxes_and_labels(image, detections, text_style(*image.shape[:2], display_width), show_labels, show_scores)
    return image


