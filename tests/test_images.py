"""The safe loader against a corpus the tests generate: every mode, bombs, corrupt files, EXIF."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from detection.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    is_image_path,
    load_image,
    read_header,
)


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB but whose data is a few bytes only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# -- modes --------------------------------------------------------------------------------
def test_rgb_png_is_exact(tmp_path: Path) -> None:
    rgb = _rng().integers(0, 256, (13, 17, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.flags.c_contiguous and loaded.rgb.flags.writeable
    np.testing.assert_array_equal(loaded.rgb, rgb)
    assert loaded.original_size == (13, 17)
    assert loaded.source_format == "PNG"


def test_grayscale_replicated_to_three_channels(tmp_path: Path) -> None:
    grey = _rng().integers(0, 256, (9, 11), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.source_mode == "L"
    np.testing.assert_array_equal(loaded.rgb, np.repeat(grey[..., None], 3, axis=2))


def test_one_bit_image(tmp_path: Path) -> None:
    bits = _rng().integers(0, 2, (8, 8)).astype(bool)
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    loaded = load_image(tmp_path / "b.png")
    np.testing.assert_array_equal(loaded.rgb[..., 0], np.where(bits, 255, 0).astype(np.uint8))
    np.testing.assert_array_equal(loaded.rgb[..., 0], loaded.rgb[..., 2])


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = _rng().integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # fully transparent: must be white whatever colour it stores
    rgba[0, 1, 3] = 255  # opaque: must be its colour
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    loaded = load_image(tmp_path / "t.png")
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    expected = np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    np.testing.assert_array_equal(loaded.rgb, expected)
    np.testing.assert_array_equal(loaded.rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(loaded.rgb[0, 1], rgba[0, 1, :3])


def test_la_composited_on_white(tmp_path: Path) -> None:
    la = _rng().integers(0, 256, (4, 4, 2), dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png")
    alpha = la[..., 1].astype(np.float64) / 255.0
    expected = np.rint(la[..., 0] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(loaded.rgb[..., channel], expected)


def test_palette_and_palette_with_transparency(tmp_path: Path) -> None:
    rgb = _rng().integers(0, 256, (10, 12, 3), dtype=np.uint8)
    palette_image = Image.fromarray(rgb).quantize(colors=16)
    palette_image.save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert loaded.source_mode == "P"
    np.testing.assert_array_equal(loaded.rgb, np.asarray(palette_image.convert("RGB")))

    transparent_index = int(np.asarray(palette_image)[0, 0])
    palette_image.save(tmp_path / "pt.png", transparency=transparent_index)
    loaded_t = load_image(tmp_path / "pt.png")
    index_map = np.asarray(palette_image)
    assert (loaded_t.rgb[index_map == transparent_index] == 255).all()
    opaque = index_map != transparent_index
    np.testing.assert_array_equal(loaded_t.rgb[opaque], np.asarray(palette_image.convert("RGB"))[opaque])


def test_cmyk_jpeg_converted(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "c.jpg", quality=100)
    loaded = load_image(tmp_path / "c.jpg")
    assert loaded.source_mode == "CMYK"
    red = loaded.rgb.reshape(-1, 3).mean(axis=0)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_sixteen_bit_grey_scaled(tmp_path: Path) -> None:
    grey16 = _rng().integers(0, 65536, (7, 9), dtype=np.uint16)
    grey16[0, 0], grey16[0, 1] = 65535, 0
    assert cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    loaded = load_image(tmp_path / "g16.png")
    assert loaded.source_mode.startswith("I")
    expected = np.rint(grey16 / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(loaded.rgb[..., 1], expected)
    assert loaded.rgb[0, 0, 0] == 255 and loaded.rgb[0, 1, 0] == 0


def test_sixteen_bit_rgb_png(tmp_path: Path) -> None:
    bgr16 = _rng().integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "c16.png"), bgr16)
    loaded = load_image(tmp_path / "c16.png")
    expected = (bgr16[..., ::-1] / 257.0)
    assert np.abs(loaded.rgb.astype(np.float64) - expected).max() <= 1.0


def test_one_by_one(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    loaded = load_image(tmp_path / "one.png")
    assert loaded.rgb.shape == (1, 1, 3)
    np.testing.assert_array_equal(loaded.rgb[0, 0], [10, 20, 30])


def test_unicode_path(tmp_path: Path) -> None:
    folder = tmp_path / "фото 写真"
    folder.mkdir()
    path = folder / "ñandú é.jpg"
    Image.new("RGB", (4, 3), (0, 0, 255)).save(path)
    loaded = load_image(path)
    assert loaded.original_size == (3, 4) and loaded.path == path
    assert read_header(path).original_size == (3, 4)


# -- bad files ----------------------------------------------------------------------------
def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "empty.jpg")
    assert "zero-byte" in info.value.reason and info.value.path.endswith("empty.jpg")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


def test_non_image_file(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not a JPEG\n")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(tmp_path / "notes.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    rgb = _rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(path)
    # the header alone is intact: read_header does not decode and so does not notice
    assert read_header(path).original_size == (64, 64)


def test_loader_refuses_when_truncated_loading_enabled_globally(tmp_path: Path, monkeypatch) -> None:
    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(tmp_path / "ok.png")


def test_bomb_refused_from_header_before_decoding(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(5000, 4000))  # 20 MP declared, 60 bytes of data

    def must_not_decode(self, *args, **kwargs):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", must_not_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=10_000_000)
    assert "decompression bomb" in info.value.reason and "5000x4000" in info.value.reason
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        read_header(path, max_pixels=10_000_000)
    # under the limit the header is accepted (the data is then found truncated, not a bomb)
    assert read_header(path, max_pixels=None).original_size == (4000, 5000)


def test_huge_dimension_header_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(100_000, 100_000))  # 10^10 pixels: above PIL's hard cap too
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path, max_pixels=None)  # PIL's own cap still refuses, reported the same way
    path2 = tmp_path / "big.png"
    side = int(DEFAULT_MAX_PIXELS ** 0.5) + 1
    path2.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        load_image(path2)


def test_error_is_picklable_value_error() -> None:
    import pickle

    err = ImageLoadError("/x/y.png", "zero-byte file")
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, ValueError) and copy.path == "/x/y.png" and copy.reason == "zero-byte file"
    assert str(copy) == "/x/y.png: zero-byte file"


# -- EXIF orientation ---------------------------------------------------------------------
def _marker_image() -> np.ndarray:
    """Display-frame image 60x90 (H x W): a red block at the top-left, blue bottom-right."""
    image = np.full((60, 90, 3), 128, np.uint8)
    image[5:20, 5:30] = (255, 0, 0)
    image[40:55, 60:85] = (0, 0, 255)
    return image


# EXIF orientation o: the stored pixels are the display image transformed by the INVERSE of
# what a viewer applies. PIL's Image.transpose ops applied to the display image give storage.
_STORE_OPS = {
    1: [],
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],  # viewer rotates 90 CW (PIL ROTATE_270) to undo
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(tmp_path: Path, orientation: int) -> None:
    display = _marker_image()
    stored = Image.fromarray(display)
    for op in _STORE_OPS[orientation]:
        stored = stored.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)

    loaded = load_image(path)
    assert loaded.original_size == (60, 90)
    assert loaded.exif_orientation == orientation
    assert read_header(path).original_size == (60, 90)
    # the red block is where the display frame has it: a box drawn there aligns
    assert np.abs(loaded.rgb.astype(int) - display.astype(int)).mean() < 4
    red_block = loaded.rgb[5:20, 5:30].reshape(-1, 3).mean(axis=0)
    assert red_block[0] > 220 and red_block[2] < 40
    # cv2.imread applies EXIF too: the two loaders agree (up to JPEG decoder rounding)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert np.abs(bgr[..., ::-1].astype(int) - loaded.rgb.astype(int)).max() <= 3


def test_is_image_path() -> None:
    assert is_image_path("a/b/C.JPG") and is_image_path("x.webp")
    assert not is_image_path("movie.mp4") and not is_image_path("list.txt")
