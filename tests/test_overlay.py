"""Overlay rendering: pixel-level placement, mass contours, text scaling, determinism, validation."""
from __future__ import annotations

import hashlib
from io import BytesIO

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detection.render.colors import DEFAULT_COLORMAP, apply_colormap, class_color, text_color_on
from detection.data.image_codec import swap_red_blue
from detection.render.overlay import (check_saliency, mass_contours, mass_region, render_detection_overlay, render_overlay, render_saliency)
from detection.render.labels import draw_detections, label_size, text_style
from detection.data.image_codec import decode_image, encode_image, write_image
from detection.structures import Detections


def photo(height: int = 120, width: int = 160, seed: int = 0) -> np.ndarray:
    """A textured stand-in for a photo (mid-grey noise, so tints and boxes are measurable)."""
    rng = np.random.default_rng(seed)
    return rng.integers(90, 160, size=(height, width, 3), dtype=np.uint8)


def gaussian(height: int, width: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)


def detections(boxes, labels, scores=None, size=(120, 160), names=None) -> Detections:
    count = len(boxes)
    return Detections(
        size,
        boxes=torch.tensor(boxes, dtype=torch.float32),
        scores=torch.tensor(scores if scores is not None else [0.9] * count),
        labels=torch.tensor(labels),
        query_index=torch.arange(count),
        class_names=names or [f"c{label}" for label in labels],
    )


# -- colours ----------------------------------------------------------------------------------------
def test_colormap_is_rgb_viridis():
    ramp = np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 256)
    colours = apply_colormap(ramp)
    # viridis runs from dark purple (blue > red) to yellow (red > blue), lightness increasing
    assert colours[0, 0, 2] > colours[0, 0, 0] and colours[0, -1, 0] > colours[0, -1, 2]
    luma = colours[0].astype(float) @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luma) >= -1.0)
    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(1, 256), DEFAULT_COLORMAP)
    np.testing.assert_array_equal(colours, bgr[..., ::-1])


def test_class_colours_are_stable_and_text_contrasts():
    assert class_color(3) == class_color(3) == class_color(23)
    assert len({class_color(label) for label in range(20)}) == 20
    assert text_color_on((255, 255, 0)) == (0, 0, 0)
    assert text_color_on((20, 20, 120)) == (255, 255, 255)


def test_swap_red_blue_round_trip():
    image = photo()
    np.testing.assert_array_equal(swap_red_blue(swap_red_blue(image)), image)
    assert swap_red_blue(image)[0, 0, 0] == image[0, 0, 2]
    # every input kind (OpenCV's path and numpy's) is the same reversal of the last axis, contiguous
    rng = np.random.default_rng(1)
    for array in (image[::2, 1::3], rng.random((5, 7, 3)).astype(np.float32), rng.random((5, 7, 3)),
                  rng.integers(0, 2**16, (4, 6, 3)).astype(np.uint16), rng.integers(0, 256, (4, 6, 4), dtype=np.uint8),
                  np.zeros((0, 3, 3), np.uint8)):
        swapped = swap_red_blue(array)
        assert swapped.dtype == array.dtype and swapped.flags.c_contiguous
        np.testing.assert_array_equal(swapped, array[..., ::-1])


# -- single-detection overlay ---------------------------------------------------------------------------
def test_hottest_pixel_lies_inside_the_box_when_the_attention_does():
    image = photo()
    box = [90.0, 20.0, 140.0, 70.0]
    saliency = gaussian(120, 160, 45, 115, 8)
    out = render_detection_overlay(image, detections([box], [2]), saliency, show_box=False)
    change = np.abs(out.astype(int) - image.astype(int)).sum(axis=2)
    y, x = np.unravel_index(change.argmax(), change.shape)
    assert box[0] <= x < box[2] and box[1] <= y < box[3]
    # the hottest saliency pixel is coloured with the top of the colormap (viridis yellow)
    top = apply_colormap(np.ones((1, 1), np.float32))[0, 0].astype(float)
    expected = 0.4 * image[45, 115] + 0.6 * top
    np.testing.assert_allclose(out[45, 115], np.rint(expected), atol=1)
    # cold pixels keep the photo untouched (opacity is alpha * saliency)
    np.testing.assert_array_equal(out[110, 5], image[110, 5])


def test_overlay_draws_box_in_class_colour_and_label_above():
    image = photo()
    box = [40.0, 50.0, 100.0, 110.0]
    out = render_detection_overlay(image, detections([box], [4]), np.zeros((120, 160), np.float32))
    colour = np.array(class_color(4))
    # left edge of the box is drawn at x = 40 between the corners
    assert np.abs(out[60:100, 40].astype(int) - colour).max() <= 1
    # label background sits just above the box (there is room above y = 50)
    style = text_style(120, 160)
    _, label_h = label_size("c4 0.90", style)
    np.testing.assert_array_equal(out[50 - label_h + 1, 41], colour)
    assert not np.array_equal(out[50 - label_h - 1, 41], colour)


def test_label_moves_inside_when_no_room_above_and_stays_in_image():
    image = photo()
    out = render_detection_overlay(image, detections([[150.0, 0.0, 160.0, 30.0]], [1]), np.zeros((120, 160)).astype(np.float32))
    colour = np.array(class_color(1))
    style = text_style(120, 160)
    label_w, _ = label_size("c1 0.90", style)
    # the label is shifted left so it ends at the right image edge, starting at the top row
    np.testing.assert_array_equal(out[0, 160 - label_w], colour)
    np.testing.assert_array_equal(out[0, 159], colour)


def test_contour_encloses_the_requested_mass():
    saliency = gaussian(120, 160, 60, 80, 12) + 0.5 * gaussian(120, 160, 30, 30, 5)
    saliency /= saliency.max()
    for mass in (0.3, 0.5, 0.9):
        region = mass_region(saliency, mass)
        total = saliency.sum()
        inside = saliency[region].sum()
        assert inside >= mass * total
        # smallest: dropping the weakest pixel of the region falls below the target
        assert inside - saliency[region].min() < mass * total
        assert saliency[region].min() >= saliency[~region].max()
        filled = np.zeros((120, 160), np.uint8)
        cv2.drawContours(filled, mass_contours(saliency, mass), -1, 1, thickness=cv2.FILLED)
        assert saliency[filled.astype(bool)].sum() >= mass * total
    image = photo()
    out = render_detection_overlay(image, detections([[0, 0, 5, 5]], [0]), saliency, contour_mass=0.5, show_box=False)
    contour_pixels = np.all(out >= 230, axis=2)  # white line (anti-aliased edges are lighter grey)
    assert contour_pixels.sum() > 50  # the white outline is drawn
    ys, xs = np.nonzero(contour_pixels)
    region_ys, region_xs = np.nonzero(mass_region(saliency, 0.5))
    assert ys.min() >= region_ys.min() - 3 and ys.max() <= region_ys.max() + 3
    assert xs.min() >= region_xs.min() - 3 and xs.max() <= region_xs.max() + 3


def test_mass_region_edge_cases():
    assert not mass_region(np.zeros((4, 4)), 0.5).any()
    single = np.zeros((4, 4))
    single[2, 1] = 3.0
    np.testing.assert_array_equal(np.argwhere(mass_region(single, 1.0)), [[2, 1]])
    # ties: exactly enough equal pixels, the first ones in row-major order
    flat_map = np.ones((4, 4))
    expected = np.zeros(16, dtype=bool)
    expected[:8] = True
    np.testing.assert_array_equal(mass_region(flat_map, 0.5), expected.reshape(4, 4))
    with pytest.raises(ValueError, match="contour mass"):
        mass_region(single, 0.0)


def test_rendering_is_deterministic_bytes():
    image = photo(seed=3)
    dets = detections([[10, 10, 80, 90], [60, 30, 150, 110]], [1, 7], [0.8, 0.95])
    maps = np.stack([gaussian(120, 160, 50, 45, 10), gaussian(120, 160, 70, 100, 15)])
    digests = {
        hashlib.sha256(encode_image(render_overlay(image, dets, maps, contour_mass=0.5))).hexdigest() for _ in range(3)
    }
    assert len(digests) == 1
    first = render_detection_overlay(image, dets[1], maps[1], contour_mass=0.7)
    np.testing.assert_array_equal(first, render_detection_overlay(image.copy(), dets[1], maps[1].copy(), contour_mass=0.7))


# -- combined overlay ----------------------------------------------------------------------------------
def test_combined_overlay_tints_each_region_with_its_class_colour():
    image = np.full((120, 160, 3), 128, np.uint8)
    dets = detections([[10, 10, 70, 90], [90, 20, 150, 100]], [1, 7])
    maps = np.stack([gaussian(120, 160, 50, 40, 8), gaussian(120, 160, 60, 120, 8)])
    out = render_overlay(image, dets, maps, alpha=0.6, show_boxes=False)
    for (cy, cx), label in (((50, 40), 1), ((60, 120), 7)):
        expected = np.rint(0.4 * 128 + 0.6 * np.array(class_color(label)))
        np.testing.assert_allclose(out[cy, cx], expected, atol=1)
    # far from both maps the image is (almost) untouched
    assert np.abs(out[115, 80].astype(int) - 128).max() <= 1
    # per-pixel max: where map 0 dominates, the colour is pulled toward class 1 only
    toward_1 = np.array(class_color(1)) - 128
    change = out[50, 30].astype(int) - 128
    assert np.dot(change, toward_1) > 0


def test_combined_overlay_without_maps_and_without_detections():
    image = photo()
    dets = detections([[10, 10, 70, 90]], [5])
    np.testing.assert_array_equal(render_overlay(image, dets, None), draw_detections(image, dets))
    empty = Detections.empty((120, 160))
    np.testing.assert_array_equal(render_overlay(image, empty, np.zeros((0, 120, 160), np.float32)), image)


# -- text size ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("height, width", [(48, 64), (480, 640), (3000, 4000), (4000, 300)])
def test_text_scales_with_image_size(height, width):
    style = text_style(height, width)
    _, label_h = label_size("person 0.99", style)
    shorter = min(height, width)
    assert label_h >= 10  # never below legibility
    if shorter >= 400:
        assert 0.03 * shorter <= label_h <= 0.08 * shorter
    assert style.line_width >= 1 and style.line_width <= max(1, shorter // 100)


def test_non_ascii_class_names_are_drawn_without_crashing():
    image = photo()
    out = draw_detections(image, detections([[10, 40, 60, 90]], [0], names=["Straßenbahn ✓"]))
    assert not np.array_equal(out, image)


# -- validation ------------------------------------------------------------------------------------
def test_validation_errors_are_clear():
    image = photo()
    dets = detections([[10, 10, 50, 50]], [0])
    with pytest.raises(ValueError, match="uint8"):
        render_detection_overlay(image.astype(np.float32), dets, np.zeros((120, 160), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        render_detection_overlay(image[..., 0], dets, np.zeros((120, 160), np.float32))
    with pytest.raises(ValueError, match="spatial shape"):
        render_detection_overlay(image, dets, np.zeros((60, 80), np.float32))
    with pytest.raises(ValueError, match="normalise"):
        render_detection_overlay(image, dets, np.full((120, 160), 3.0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        render_detection_overlay(image, dets, np.full((120, 160), np.nan, np.float32))
    for bad in (np.nan, np.inf, -np.inf):  # one bad pixel among valid ones
        saliency = np.full((120, 160), 0.5, np.float32)
        saliency[7, 9] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            render_detection_overlay(image, dets, saliency)
    with pytest.raises(ValueError, match="one detection"):
        render_detection_overlay(image, detections([[0, 0, 5, 5]] * 2, [0, 1]), np.zeros((120, 160), np.float32))
    with pytest.raises(ValueError, match="image of size"):
        render_overlay(photo(60, 80), dets, None)
    with pytest.raises(ValueError, match=r"maps must be \(N=1"):
        render_overlay(image, dets, np.zeros((2, 120, 160), np.float32))
    with pytest.raises(ValueError, match="alpha"):
        render_overlay(image, dets, np.zeros((1, 120, 160), np.float32), alpha=1.5)


# -- files ----------------------------------------------------------------------------------------
def test_png_and_jpeg_round_trip(tmp_path):
    image = photo()
    write_image(tmp_path / "a.png", image)
    np.testing.assert_array_equal(decode_image((tmp_path / "a.png").read_bytes()), image)
    write_image(tmp_path / "a.jpg", np.full((32, 32, 3), (200, 30, 10), np.uint8), jpeg_quality=95)
    decoded = decode_image((tmp_path / "a.jpg").read_bytes())
    assert np.abs(decoded.astype(int) - [200, 30, 10]).max() <= 6  # RGB order survives
    with pytest.raises(ValueError, match=".png or .jpg"):
        encode_image(image, ".gif")
    with pytest.raises(ValueError, match="decodable"):
        decode_image(b"nope")


def test_fast_png_is_lossless_and_read_back_by_opencv_and_pil():
    # a rendered overlay (flat tints, text, a photo under them) and pure noise: both round-trip
    image = render_overlay(photo(121, 163, seed=3), detections([[10, 20, 90, 100]], [2], size=(121, 163)),
                           gaussian(121, 163, 60, 50, 15)[None])
    for pixels in (image, np.random.default_rng(4).integers(0, 256, (37, 53, 3), dtype=np.uint8)):
        data = encode_image(pixels, ".png", png_compression="fast")
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        np.testing.assert_array_equal(decode_image(data), pixels)
        with Image.open(BytesIO(data)) as opened:
            assert opened.format == "PNG" and opened.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(opened), pixels)
        # the same pixels as the level-1 file, in other bytes
        np.testing.assert_array_equal(decode_image(encode_image(pixels, ".png", png_compression=1)), pixels)
        assert data != encode_image(pixels, ".png", png_compression=1)


def test_check_saliency_never_changes_its_input_and_copies_only_to_clip():
    inside = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert check_saliency(inside, (3, 4)) is inside  # already float32 in [0, 1]
    rounded = inside.copy()
    rounded[0, 0], rounded[2, 3] = -4e-4, 1 + 4e-4  # float16 storage rounding, within tolerance
    kept = rounded.copy()
    clipped = check_saliency(rounded, (3, 4))
    np.testing.assert_array_equal(rounded, kept)
    np.testing.assert_array_equal(clipped, np.clip(kept, 0, 1))
    doubles = inside.astype(np.float64)
    assert check_saliency(doubles, (3, 4)).dtype == np.float32


def _blend_reference(image, color_layer, opacity):
    """The blend as one whole-image float32 expression (what overlays were before the bands)."""
    weight = opacity[..., None].astype(np.float32)
    mixed = image.astype(np.float32) * (1.0 - weight) + color_layer.astype(np.float32) * weight
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def test_blend_in_bands_equals_the_whole_image_expression(monkeypatch):
    import detection.render.overlay as overlay

    rng = np.random.default_rng(6)
    image, colour = (rng.integers(0, 256, (97, 61, 3), dtype=np.uint8) for _ in range(2))
    opacity = rng.random((97, 61)).astype(np.float32) * 0.6
    opacity[:5], opacity[-5:] = 0.0, 0.6  # edges of the range, and a last band shorter than the others
    whole = _blend_reference(image, colour, opacity)
    monkeypatch.setattr(overlay, "_BLEND_BAND_PIXELS", 61 * 8)  # 13 bands of 8 rows, the last of 1
    np.testing.assert_array_equal(overlay._blend(image, colour, opacity), whole)
    saliency = gaussian(97, 61, 40, 30, 12)
    expected = _blend_reference(image, apply_colormap(saliency), 0.6 * saliency)
    np.testing.assert_array_equal(render_saliency(image, saliency), expected)
