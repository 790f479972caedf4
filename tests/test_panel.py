"""Panels: grid geometry, tile order and content, titles, encoder point panels, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.render.colors import apply_colormap
from detection.render.labels import draw_detections, label_size, text_style
from detection.render.overlay import render_detection_overlay
from detection.render.panel import (
    compose_grid,
    draw_points,
    fit_image,
    render_encoder_panel,
    render_panel,
)
from detection.structures import Detections

HEIGHT, WIDTH = 300, 400


def photo(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(90, 160, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def gaussian(cy: float, cx: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)


def scene():
    boxes = [[20.0, 60.0, 140.0, 180.0], [220.0, 120.0, 380.0, 280.0], [160.0, 60.0, 260.0, 120.0]]
    detections = Detections(
        (HEIGHT, WIDTH),
        boxes=torch.tensor(boxes),
        scores=torch.tensor([0.95, 0.85, 0.75]),
        labels=torch.tensor([0, 2, 4]),  # colours far from viridis yellow (see hottest)
        query_index=torch.tensor([7, 11, 42]),
        class_names=["cat", "dog", "a class name far too long to fit in a small tile title"],
    )
    maps = np.stack([gaussian(120, 80, 14), gaussian(200, 300, 20), gaussian(95, 210, 10)])
    return photo(), detections, maps


def hottest(tile: np.ndarray) -> tuple[int, int]:
    """(y, x) of the pixel closest in colour to the top of the colormap."""
    top = apply_colormap(np.ones((1, 1), np.float32))[0, 0].astype(int)
    distance = np.abs(tile.astype(int) - top).sum(axis=2)
    y, x = np.unravel_index(distance.argmin(), distance.shape)
    return int(y), int(x)


def grid_cell(sheet: np.ndarray, index: int, columns: int, tile_width: int, tile_height: int, title_height: int, gap: int = 8):
    """The tile image area of cell `index` in a compose_grid sheet."""
    cell_height = tile_height + title_height
    top = gap + (index // columns) * (cell_height + gap) + title_height
    left = gap + (index % columns) * (tile_width + gap)
    return sheet[top : top + tile_height, left : left + tile_width]


def test_fit_image_keeps_aspect_and_copies():
    image = photo()
    small = fit_image(image, 100)
    assert small.shape == (75, 100, 3)
    assert fit_image(image, 800, max_height=60).shape == (60, 80, 3)
    same = fit_image(image, WIDTH)
    np.testing.assert_array_equal(same, image)
    assert same is not image


def test_render_panel_layout_and_tile_contents():
    image, detections, maps = scene()
    tile_width = 200
    panel = render_panel(image, detections, maps, columns=2, tile_width=tile_width)
    title_height = label_size("Hg", text_style(tile_width * 3 // 4, tile_width))[1]
    tile_height = 150  # 300 x 400 scaled to width 200
    gap = 8
    assert panel.shape == (gap + 2 * (tile_height + title_height + gap), gap + 2 * (tile_width + gap), 3)
    # first tile: the image with all boxes, drawn for display at tile width, then scaled
    first = grid_cell(panel, 0, 2, tile_width, tile_height, title_height)
    np.testing.assert_array_equal(first, fit_image(draw_detections(image, detections, display_width=tile_width), tile_width))
    # tile k + 1 is detection k's overlay, drawn for display at tile width, then scaled
    for index in range(len(detections)):
        tile = grid_cell(panel, index + 1, 2, tile_width, tile_height, title_height)
        expected = render_detection_overlay(image, detections[index], maps[index], display_width=tile_width)
        np.testing.assert_array_equal(tile, fit_image(expected, tile_width))
        # and its hottest colour (closest to the top of the colormap) lies in box k, scaled by 0.5
        y, x = hottest(tile)
        box = detections.boxes[index].tolist()
        assert box[0] / 2 <= x <= box[2] / 2 and box[1] / 2 <= y <= box[3] / 2
    # the title bars carry dark text; the gaps between tiles stay white (long titles are cut)
    title_bar = panel[gap : gap + title_height, gap : gap + tile_width]
    assert (title_bar.sum(axis=2) < 200).any()
    np.testing.assert_array_equal(panel[:, gap + tile_width : 2 * gap + tile_width], 255)
    np.testing.assert_array_equal(panel[:, -gap:], 255)


def test_render_panel_is_deterministic_and_validates():
    image, detections, maps = scene()
    np.testing.assert_array_equal(
        render_panel(image, detections, maps, contour_mass=0.5), render_panel(image.copy(), detections, maps.copy(), contour_mass=0.5)
    )
    with pytest.raises(ValueError, match=r"maps must be \(N=3"):
        render_panel(image, detections, maps[:2])
    with pytest.raises(ValueError, match="normalise"):
        render_panel(image, detections, maps * 5)


def test_compose_grid_errors_and_default_columns():
    tile = photo()
    assert compose_grid([tile] * 6, tile_width=50).shape[1] == 8 + 4 * (50 + 8)
    with pytest.raises(ValueError, match="at least one tile"):
        compose_grid([])
    with pytest.raises(ValueError, match="2 titles for 1 tiles"):
        compose_grid([tile], ["a", "b"])
    with pytest.raises(ValueError, match="columns"):
        compose_grid([tile], columns=0)


def test_draw_points_marks_the_point():
    image = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    marked = draw_points(image, np.array([[50.0, 60.0]]))
    np.testing.assert_array_equal(marked[50, 60], (255, 0, 160))
    np.testing.assert_array_equal(marked[10, 180], (128, 128, 128))


def test_render_encoder_panel():
    image = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    points = np.array([[60.0, 80.0], [240.0, 320.0]])
    maps = np.stack([gaussian(240, 320, 20), gaussian(60, 80, 20)])  # each point looks at the other
    tile_width = 200
    panel = render_encoder_panel(image, points, maps, direction="incoming", columns=3, tile_width=tile_width)
    title_height = label_size("Hg", text_style(tile_width * 3 // 4, tile_width))[1]
    overview = grid_cell(panel, 0, 3, tile_width, 150, title_height)
    for y, x in points / 2:  # markers at both points in the overview (tiles are scaled by 0.5)
        assert np.abs(overview[int(y), int(x)].astype(int) - (255, 0, 160)).sum() < 60
    for index, (target_y, target_x) in enumerate([(120, 160), (30, 40)]):
        tile = grid_cell(panel, index + 1, 3, tile_width, 150, title_height)
        y, x = hottest(tile)
        assert abs(y - target_y) <= 2 and abs(x - target_x) <= 2
        # the tile's own point is marked too
        point_y, point_x = points[index] / 2
        assert np.abs(tile[int(point_y), int(point_x)].astype(int) - (255, 0, 160)).sum() < 60
    with pytest.raises(ValueError, match=r"maps must be \(P=2"):
        render_encoder_panel(image, points, maps[:1])
