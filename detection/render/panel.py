"""Panel layouts: DETR-paper Fig. 6 style grids (image with boxes + one overlay per detection),
encoder self-attention at chosen points, and the generic titled grid they (and reports) use."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from detection.render.colors import DEFAULT_COLORMAP
from detection.render.labels import (ascii_text, check_detections, detection_label, draw_detections, draw_label, label_size, text_style)
from detection.render.overlay import check_saliency, render_detection_overlay, render_saliency
from detection.data.image_codec import check_image
from detection.structures import Detections

# All images are uint8 RGB. Tiles are rendered at full resolution first and only then scaled
# down for the grid (`fit_image`), so a panel shows exactly what the single overlays show.
_BACKGROUND = (255, 255, 255)
_TITLE_COLOR = (20, 20, 20)
_POINT_COLOR = (255, 0, 160)


def fit_image(image_rgb: np.ndarray, max_width: int, max_height: int | None = None) -> np.ndarray:
    """Scale a rendered image (not a saliency map) to fit max_width x max_height, keeping aspect."""
    image = check_image(image_rgb)
    height, width = image.shape[:2]
    scale = max_width / width
    if max_height is not None:
        scale = min(scale, max_height / height)
    if abs(scale - 1.0) < 1e-9:
        return image.copy()
    return resize_image(image, (max(1, int(round(height * scale))), max(1, int(round(width * scale)))))


def resize_image(image_rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An image (not a saliency map) scaled to exactly `size` (height, width)."""
    image = check_image(image_rgb)
    height, width = image.shape[:2]
    if (height, width) == (int(size[0]), int(size[1])):
        return image.copy()
    # INTER_AREA averages when shrinking (no moiré on thin box lines); linear when enlarging
    shrink = size[0] * size[1] < height * width
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def display_size(image_size: Sequence[int], long_side: int | None) -> tuple[int, int]:
    """(h, w) of an image of `image_size` (H, W) shown with its long side at most `long_side`
    pixels (never enlarged; None keeps the original size). Each side is rounded, at least 1."""
    height, width = int(image_size[0]), int(image_size[1])
    if long_side is None or max(height, width) <= int(long_side):
        return height, width
    if int(long_side) <= 0:
        raise ValueError(f"long side must be positive, got {long_side}")
    scale = int(long_side) / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def _fit_text(text: str, width: int, font_scale: float, thickness: int) -> str:
    """Shorten `text` with "..." until it fits `width` pixels in the title font."""
    text = ascii_text(text)
    while text and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)[0][0] > width:
        text = text[:-4] + "..." if len(text) > 4 else ""
    return text


def compose_grid(
    tiles: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    columns: int | None = None,
    tile_width: int = 400,
    gap: int = 8,
) -> np.ndarray:
    """Lay tiles out row by row on a white sheet, each scaled to `tile_width`, titled above.

    columns: tiles per row (default: up to 4). Titles that do not fit are shortened with "...".
    Returns uint8 RGB (H, W, 3).
    """
    if not tiles:
        raise ValueError("compose_grid needs at least one tile")
    if titles is not None and len(titles) != len(tiles):
        raise ValueError(f"{len(titles)} titles for {len(tiles)} tiles")
    if tile_width < 16:
        raise ValueError(f"tile_width must be at least 16 px, got {tile_width}")
    columns = min(len(tiles), 4) if columns is None else int(columns)
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    fitted = [fit_image(tile, tile_width) for tile in tiles]
    style = text_style(tile_width * 3 // 4, tile_width)
    title_height = label_size("Hg", style)[1] if titles is not None else 0
    cell_height = max(tile.shape[0] for tile in fitted) + title_height
    rows = (len(fitted) + columns - 1) // columns
    sheet = np.full(
        (gap + rows * (cell_height + gap), gap + columns * (tile_width + gap), 3), _BACKGROUND, dtype=np.uint8
    )
    for index, tile in enumerate(fitted):
        top = gap + (index // columns) * (cell_height + gap)
        left = gap + (index % columns) * (tile_width + gap)
        if titles is not None:
            text = _fit_text(titles[index], tile_width - 2 * style.padding, style.font_scale, style.thickness)
            (_, text_h), _ = cv2.getTextSize(text or " ", cv2.FONT_HERSHEY_SIMPLEX, style.font_scale, style.thickness)
            origin = (left + style.padding, top + style.padding + text_h)
            cv2.putText(sheet, text, origin, cv2.FONT_HERSHEY_SIMPLEX, style.font_scale, _TITLE_COLOR, style.thickness, cv2.LINE_AA)
        sheet[top + title_height : top + title_height + tile.shape[0], left : left + tile.shape[1]] = tile
    return sheet


def render_panel(
    image_rgb: np.ndarray,
    detections: Detections,
    maps: np.ndarray,
    columns: int | None = None,
    tile_width: int = 400,
    colormap: int = DEFAULT_COLORMAP,
    alpha: float = 0.6,
    contour_mass: float | None = None,
    title: str | None = None,
) -> np.ndarray:
    """DETR-paper Fig. 6 style grid: the image with all boxes, then one overlay per detection.

    maps: (N, H, W) in [0, 1], one per detection (from `detection.attention.maps.detection_maps`).
    Tile titles: `title` (default "N detections") for the first tile, then
    "#k <class> <score> q<query>" per detection.
    """
    image = check_image(image_rgb)
    check_detections(detections, image.shape)
    maps = check_saliency(maps, image.shape, "maps")
    if maps.ndim != 3 or len(maps) != len(detections):
        raise ValueError(f"maps must be (N={len(detections)}, H, W), got {maps.shape}")
    tiles = [draw_detections(image, detections, display_width=tile_width)]
    titles = [title if title is not None else f"{len(detections)} detections"]
    for index in range(len(detections)):
        tiles.append(
            render_detection_overlay(
                image, detections[index], maps[index], colormap, alpha, contour_mass, display_width=tile_width
            )
        )
        query = f" q{int(detections.query_index[index])}" if detections.has("query_index") else ""
        titles.append(f"#{index} {detection_label(detections, index)}{query}")
    return compose_grid(tiles, titles, columns, tile_width)


def draw_points(
    image_rgb: np.ndarray,
    points: np.ndarray,
    numbers: Sequence[int] | None = None,
    display_width: int | None = None,
) -> np.ndarray:
    """Markers (cross + number) at (P, 2) points (y, x) in pixels of the image."""
    out = check_image(image_rgb).copy()
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    style = text_style(*out.shape[:2], display_width)
    size = max(7, 6 * style.line_width + 4)
    for index, (y, x) in enumerate(points):
        centre = (int(round(x)), int(round(y)))
        # white halo under the magenta cross: visible on any background
        cv2.drawMarker(out, centre, (255, 255, 255), cv2.MARKER_CROSS, size + 4, style.line_width + 2, cv2.LINE_8)
        cv2.drawMarker(out, centre, _POINT_COLOR, cv2.MARKER_CROSS, size, style.line_width, cv2.LINE_8)
        if numbers is not None:
            draw_label(out, str(numbers[index]), centre[0] + size // 2 + 1, centre[1] + size // 2 + 1, _POINT_COLOR, style)
    return out


def render_encoder_panel(
    image_rgb: np.ndarray,
    points: Sequence[Sequence[float]] | np.ndarray,
    maps: np.ndarray,
    direction: str = "outgoing",
    columns: int | None = None,
    tile_width: int = 400,
    colormap: int = DEFAULT_COLORMAP,
    alpha: float = 0.6,
) -> np.ndarray:
    """Encoder self-attention at chosen points: the image with numbered markers, then one map
    per point with its marker (maps from `detection.attention.maps.encoder_point_maps`).

    points: (P, 2) (y, x) original pixels; maps: (P, H, W) in [0, 1]; direction is for titles
    ("outgoing": where the point looks; "incoming": what looks at it).
    """
    image = check_image(image_rgb)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    maps = check_saliency(maps, image.shape, "maps")
    if maps.ndim != 3 or len(maps) != len(points):
        raise ValueError(f"maps must be (P={len(points)}, H, W), got {maps.shape}")
    numbers = list(range(len(points)))
    tiles = [draw_points(image, points, numbers, tile_width)]
    titles = [f"{len(points)} points"]
    verb = {"outgoing": "looks at", "incoming": "looked at by"}.get(direction, direction)
    for index, (point, saliency) in enumerate(zip(points, maps)):
        tiles.append(draw_points(render_saliency(image, saliency, colormap, alpha), point[None], [index], tile_width))
        titles.append(f"point {index} ({int(point[0])}, {int(point[1])}) {verb}")
    return compose_grid(tiles, titles, columns, tile_width)
