"""Saliency overlays with OpenCV: colormap blends and mass contours on uint8 RGB images, with the
boxes and labels of `render.labels` (inputs never modified; the same input gives the same bytes)."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from detection.data.image_codec import check_image
from detection.render.colors import DEFAULT_COLORMAP, apply_colormap, class_color
from detection.render.labels import TextStyle, check_detections, draw_boxes_and_labels, text_style
from detection.structures import Detections

# Contract: image uint8 (H, W, 3) RGB; saliency float (H, W) in [0, 1] in the same pixels (see
# `detection.attention.maps`); `Detections` whose `image_size` is (H, W). Readability: the colour
# is blended with a per-pixel opacity alpha * saliency, so cold regions show the untouched photo
# and only attended regions are coloured. Text and line sizes scale with the image's shorter side
# (`text_style`), and every label sits on a filled box in the class colour.
# float16 storage rounds 1.0 to within 1e-3; tolerate that much outside [0, 1] and clip
_RANGE_TOLERANCE = 1e-3


# -- validation -----------------------------------------------------------------------------------


def check_saliency(saliency: np.ndarray, image_shape: Sequence[int], name: str = "saliency") -> np.ndarray:
    """Return `saliency` as float32 (..., H, W) in [0, 1], or raise ValueError naming the problem.

    The input is never changed; a float32 input already in [0, 1] is returned as it is (no copy).
    """
    saliency = np.asarray(saliency)
    if saliency.shape[-2:] != tuple(image_shape[:2]):
        raise ValueError(f"{name} has spatial shape {saliency.shape[-2:]}, the image is {tuple(image_shape[:2])}")
    if not np.issubdtype(saliency.dtype, np.floating):
        raise ValueError(f"{name} must be floating point in [0, 1], got {saliency.dtype}")
    saliency = saliency.astype(np.float32, copy=False)
    if not saliency.size:
        return saliency
    low, high = saliency.min(), saliency.max()  # NaN anywhere makes both NaN; infinities show here too
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must lie in [0, 1] (got [{low:.4g}, {high:.4g}]); "
            "normalise with detection.attention.aggregate.normalize_maps"
        )
    return np.clip(saliency, 0.0, 1.0) if low < 0 or high > 1 else saliency


# -- saliency ------------------------------------------------------------------------------------
def mass_region(saliency: np.ndarray, mass: float) -> np.ndarray:
    """Smallest set of pixels holding at least `mass` (0 < mass <= 1) of the map's total: bool (H, W).

    Pixels are taken hottest first (ties in row-major order, so the result is deterministic).
    An all-zero map gives an empty region.
    """
    if not 0.0 < float(mass) <= 1.0:
        raise ValueError(f"contour mass must be in (0, 1], got {mass}")
    flat = np.asarray(saliency, dtype=np.float64).reshape(-1)
    if flat.size and flat.min() < 0:
        raise ValueError("mass_region needs a non-negative map")
    total = flat.sum()
    if total <= 0:
        return np.zeros(np.shape(saliency), dtype=bool)
    # k = how many of the hottest pixels reach the target mass (sorted values only; an argsort
    # of every pixel is several times slower on megapixel maps)
    descending = np.sort(flat)[::-1]
    cumulative = np.cumsum(descending)
    count = min(int(np.searchsorted(cumulative, float(mass) * total, side="left")) + 1, flat.size)
    threshold = descending[count - 1]
    region = flat > threshold
    # pixels equal to the threshold: take just enough of them, first in row-major order
    ties = np.flatnonzero(flat == threshold)[: count - int(region.sum())]
    region[ties] = True
    return region.reshape(np.shape(saliency))


def mass_contours(saliency: np.ndarray, mass: float) -> list[np.ndarray]:
    """Outer contours (OpenCV point arrays) of `mass_region(saliency, mass)`."""
    region = mass_region(saliency, mass).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours)


def _draw_contours(image: np.ndarray, contours: list[np.ndarray], color: tuple[int, int, int], style: TextStyle) -> None:
    # a dark halo under the coloured line keeps it visible on light and dark backgrounds alike
    cv2.drawContours(image, contours, -1, (0, 0, 0), style.line_width + 2, cv2.LINE_AA)
    cv2.drawContours(image, contours, -1, color, style.line_width, cv2.LINE_AA)


#: Pixels blended at once: the float32 temporaries stay a few MB whatever the image size.
_BLEND_BAND_PIXELS = 1 << 18


def _blend(image: np.ndarray, color_layer: np.ndarray, opacity: np.ndarray) -> np.ndarray:
    """image·(1 − opacity) + color_layer·opacity per pixel, rounded; opacity (H, W) in [0, 1]."""
    out = np.empty_like(image)
    rows = max(1, _BLEND_BAND_PIXELS // max(1, image.shape[1]))
    for top in range(0, image.shape[0], rows):
        band = slice(top, top + rows)
        # the same float32 operations as image·(1 − w) + color·w, band by band (each pixel is its own)
        weight = opacity[band, :, None].astype(np.float32)
        mixed = image[band].astype(np.float32)
        mixed *= 1.0 - weight
        tint = color_layer[band].astype(np.float32)
        tint *= weight
        mixed += tint
        np.rint(mixed, out=mixed)
        np.clip(mixed, 0, 255, out=mixed)
        np.copyto(out[band], mixed, casting="unsafe")
    return out


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return float(alpha)


def render_saliency(
    image_rgb: np.ndarray,
    saliency: np.ndarray,
    colormap: int = DEFAULT_COLORMAP,
    alpha: float = 0.6,
    contour_mass: float | None = None,
    display_width: int | None = None,
) -> np.ndarray:
    """A (H, W) saliency in [0, 1] blended over the image through `colormap`, no boxes.

    Opacity is alpha·saliency per pixel; contour_mass (e.g. 0.5) outlines in white the smallest
    region holding that share of the map's mass.
    """
    image = check_image(image_rgb)
    saliency = check_saliency(saliency, image.shape)
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be (H, W), got {saliency.shape}")
    out = _blend(image, apply_colormap(saliency, colormap), _check_alpha(alpha) * saliency)
    if contour_mass is not None:
        style = text_style(*image.shape[:2], display_width)
        _draw_contours(out, mass_contours(saliency, contour_mass), (255, 255, 255), style)
    return out


def render_detection_overlay(
    image_rgb: np.ndarray,
    detections: Detections,
    saliency: np.ndarray,
    colormap: int = DEFAULT_COLORMAP,
    alpha: float = 0.6,
    contour_mass: float | None = None,
    show_box: bool = True,
    show_label: bool = True,
    display_width: int | None = None,
) -> np.ndarray:
    """One detection's saliency (`render_saliency`) with its box, label and optional contour.

    detections: exactly one detection (e.g. `detections[k]`). saliency: (H, W) in [0, 1].
    alpha: opacity of the colour where saliency is 1 (opacity is alpha·saliency per pixel).
    contour_mass: e.g. 0.5 draws the outline of the smallest region holding 50% of the map.
    """
    image = check_image(image_rgb)
    check_detections(detections, image.shape)
    if len(detections) != 1:
        raise ValueError(f"render_detection_overlay draws one detection, got {len(detections)} (use detections[k])")
    out = render_saliency(image, saliency, colormap, alpha, contour_mass, display_width)
    if show_box:
        draw_boxes_and_labels(out, detections, text_style(*image.shape[:2], display_width), show_label, True)
    return out


def render_overlay(
    image_rgb: np.ndarray,
    detections: Detections,
    maps: np.ndarray | None,
    alpha: float = 0.6,
    contour_mass: float | None = None,
    show_boxes: bool = True,
    show_labels: bool = True,
    display_width: int | None = None,
) -> np.ndarray:
    """All detections of an image: per-pixel max of their maps, each tinted by its class colour.

    maps: (N, H, W) in [0, 1] matching `detections`, or None for boxes and labels only. Where
    detection k has the largest value m at a pixel, that pixel is blended with class_color of
    k's label at opacity alpha·m. contour_mass outlines each map's mass region in its colour.
    """
    image = check_image(image_rgb)
    check_detections(detections, image.shape)
    strongest = None
    contours: list[list[np.ndarray]] = []
    if maps is not None:
        maps = check_saliency(maps, image.shape, "maps")
        if maps.ndim != 3 or len(maps) != len(detections):
            raise ValueError(f"maps must be (N={len(detections)}, H, W), got {maps.shape}")
        if len(maps):
            strongest = strongest_map(maps)
        if contour_mass is not None:
            contours = [mass_contours(saliency, contour_mass) for saliency in maps]
    return draw_combined(image, detections, strongest, contours, alpha, show_boxes, show_labels, display_width)


def draw_combined(
    image: np.ndarray,
    detections: Detections,
    strongest: tuple[np.ndarray, np.ndarray] | None,
    contours: Sequence[list[np.ndarray]] = (),
    alpha: float = 0.6,
    show_boxes: bool = True,
    show_labels: bool = True,
    display_width: int | None = None,
) -> np.ndarray:
    """The one drawing of a combined overlay (`render_overlay` from full maps, and
    `render.cell_overlays.render_overlays` from cells chunk by chunk): the blend of the per-pixel
    strongest map (`strongest_map`: (strongest, owner) or None), then each detection's mass
    contours (`contours[k]`, in its class colour), then boxes and labels."""
    out = render_overlay_from_max(image, detections, *(strongest or (None, None)), alpha, show_boxes=False)
    if contours:
        style = text_style(*image.shape[:2], display_width)
        for outline, label in zip(contours, np.asarray(detections.labels).reshape(-1)):
            _draw_contours(out, outline, class_color(int(label)), style)
    if show_boxes:
        draw_boxes_and_labels(out, detections, text_style(*image.shape[:2], display_width), show_labels, True)
    return out


def strongest_map(maps: np.ndarray, previous: tuple[np.ndarray, np.ndarray] | None = None,
                  offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the largest value of (n, H, W) maps and the index (+ offset) of the first map
    holding it, merged into `previous` (strongest, owner) of earlier maps (earlier ones win ties;
    `previous`'s arrays are updated in place and returned). Folding the maps of N detections chunk
    by chunk gives exactly (maps.max(0), maps.argmax(0))."""
    strongest = maps.max(axis=0)
    # argmax along the first axis, as each map's equality to the maximum: last map first, so the
    # first map holding it wins (a few times faster than numpy's argmax over a strided axis)
    owner = np.zeros(strongest.shape, np.int32)  # half of numpy's default index type: N < 2**31
    for index in range(len(maps) - 1, -1, -1):
        np.copyto(owner, index, where=maps[index] == strongest)
    owner += offset
    if previous is None:
        return strongest, owner
    better = strongest > previous[0]
    np.copyto(previous[0], strongest, where=better)
    np.copyto(previous[1], owner, where=better)
    return previous


def render_overlay_from_max(
    image_rgb: np.ndarray,
    detections: Detections,
    strongest: np.ndarray | None,
    owner: np.ndarray | None,
    alpha: float = 0.6,
    show_boxes: bool = True,
    show_labels: bool = True,
    display_width: int | None = None,
) -> np.ndarray:
    """`render_overlay` (no contours) from the per-pixel maximum of the maps: strongest (H, W) in
    [0, 1] and owner (H, W) int, the detection holding it (`strongest_map`); None: boxes only. The
    N maps need never be held at once."""
    image = check_image(image_rgb)
    check_detections(detections, image.shape)
    out = image.copy()
    if strongest is not None and owner is not None and len(detections):
        strongest = check_saliency(strongest, image.shape, "strongest map")
        labels = np.asarray(detections.labels).reshape(-1)
        palette = np.array([class_color(int(label)) for label in labels], dtype=np.uint8)
        out = _blend(image, palette[owner], _check_alpha(alpha) * strongest)
    if show_boxes:
        draw_boxes_and_labels(out, detections, text_style(*image.shape[:2], display_width), show_labels, True)
    return out


# -- files ------------------------------------------------------------------------------------------


