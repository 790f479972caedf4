"""The one safe image loader: any still image file -> RGB uint8 (H, W, 3) as a viewer shows it.

Every image that enters the package comes through `load_image`, so every consumer sees the
same pixels and the same coordinate frame:

* EXIF orientation is applied explicitly (`PIL.ImageOps.exif_transpose`), so boxes in
  "original-image pixels" are in the frame a photo viewer (and `cv2.imread`) displays;
  `original_size` is (height, width) AFTER the rotation.
* Modes are converted to RGB uint8: 1/L/P/CMYK/YCbCr/LAB/HSV via PIL; 16-bit and 32-bit
  integer grey (I;16*, I) scaled by 1/257 (65535 -> 255); float grey (F) read as [0, 1];
  images with alpha (RGBA, LA, PA, P with a transparent colour) are composited on WHITE,
  the way a document viewer shows them (dropping alpha would expose whatever colour the
  transparent pixels happen to store, often black).
* Decompression bombs are refused: the pixel count is read from the header by
  `Image.open` (which does not decode) and checked against `max_pixels` BEFORE `load()`.
  PIL's own hard cap (2 x `PIL.Image.MAX_IMAGE_PIXELS`, about 179 MP by default) applies as
  well and is reported the same way.
* Zero-byte, truncated, corrupt and non-image files raise `ImageLoadError(path, reason)`.
  Truncated files are never half-loaded: this module never sets
  `ImageFile.LOAD_TRUNCATED_IMAGES` (and refuses to run if someone else did).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# 8192 x 8192: far above what DETR's resize rule (shorter side 800, longer <= 1333) can use,
# far below the memory a hostile header can ask for (a 100 000 x 100 000 PNG = 30 GB RGB).
DEFAULT_MAX_PIXELS = 8192 * 8192

# Extensions treated as still images when a folder or glob is expanded (lower case).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
     ".pgm", ".pbm", ".pnm", ".jfif", ".dib", ".tga", ".ico", ".jp2"}
)

_EXIF_ORIENTATION_TAG = 0x0112


class ImageLoadError(ValueError):
    """An image file that cannot be used; `path` and `reason` are kept for error reports."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (ImageLoadError, (self.path, self.reason))


@dataclass
class LoadedImage:
    """A decoded image.

    rgb: uint8 (H, W, 3), RGB, C-contiguous, writable, EXIF orientation applied.
    path: the file it came from.
    original_size: (H, W) of `rgb` (after EXIF rotation): the frame boxes are reported in.
    exif_orientation: EXIF orientation tag that was applied (1 = none; 0 = no/unreadable EXIF).
    source_mode: PIL mode of the file before conversion (e.g. "CMYK", "I;16", "RGBA").
    source_format: PIL format name (e.g. "JPEG", "PNG").
    """

    rgb: np.ndarray
    path: Path
    original_size: tuple[int, int]
    exif_orientation: int = 1
    source_mode: str = "RGB"
    source_format: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, without decoding pixels. size is (H, W) after EXIF rotation."""

    path: Path
    original_size: tuple[int, int]
    exif_orientation: int
    source_mode: str
    source_format: str


def _check_file(path: Path) -> None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except OSError as err:
        raise ImageLoadError(path, f"cannot stat file: {err.strerror or err}") from None
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file")
    if stat.st_size == 0:
        raise ImageLoadError(path, "zero-byte file")


def _exif_orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        value = int(value)
    except Exception:  # corrupt EXIF block: viewers ignore it, so do we (recorded as 0)
        return 0
    return value if 1 <= value <= 8 else 1


def _open(path: Path, max_pixels: int | None) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before any decoding."""
    _check_file(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): truncated files "
            "would load silently; set it back to False"
        )
    try:
        with warnings.catch_warnings():
            # Our own limit below is the policy; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(path, f"refused as a possible decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (unrecognised or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageLoadError(path, f"cannot read image header: {err}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ImageLoadError(path, f"invalid image size {width}x{height} in header")
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageLoadError(
            path,
            f"refused as a possible decompression bomb: {width}x{height} = {width * height} "
            f"pixels exceeds the limit of {max_pixels} (max_pixels)",
        )
    return image


def read_header(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Size (after EXIF rotation), mode and format from the header; no pixel is decoded.

    Raises ImageLoadError for the same header-level problems as `load_image` (missing,
    zero-byte, non-image, over the pixel limit). Truncated pixel data is only found by
    `load_image`.
    """
    path = Path(path)
    image = _open(path, max_pixels)
    try:
        orientation = _exif_orientation(image)
        width, height = image.size
        if orientation in (5, 6, 7, 8):  # transposing orientations swap the axes
            width, height = height, width
        return ImageHeader(path, (height, width), orientation, image.mode, image.format or "")
    finally:
        image.close()


def _to_rgb_uint8(image: Image.Image, notes: list[str]) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, 3) RGB. Alpha is composited on white."""
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    elif mode == "P":
        image = image.convert("RGB")
        mode = "RGB"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply first
            image = image.convert("RGBA" if mode == "RGBa" else "LA")
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        # composite on white: out = a * colour + (1 - a) * 255
        out = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        notes.append("alpha composited on white")
        return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        notes.append(f"{mode} scaled by 1/257 to 8 bits")
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        notes.append("float image read as [0, 1]")
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode != "RGB":
        image = image.convert("RGB")
    array = np.array(image)  # a writable copy (np.asarray of a PIL image is read-only)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"unsupported pixel layout after conversion: {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """An in-memory PIL image -> uint8 (H, W, 3) RGB, as `load_image` gives for a file of it:
    EXIF orientation applied, then the same mode rules (alpha on white, 16-bit scaled, ...).
    Raises ValueError or OSError when the mode cannot be converted."""
    return _to_rgb_uint8(ImageOps.exif_transpose(image), [])


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode one image file safely.

    Args:
        path: image file (any PIL-readable still format; the first frame of animations).
        max_pixels: refuse images whose header declares more pixels than this, before any
            pixel is decoded. None disables this check (PIL's own hard cap still applies).

    Returns:
        LoadedImage with rgb uint8 (H, W, 3) in display orientation (EXIF applied).

    Raises:
        ImageLoadError(path, reason) for missing, zero-byte, non-image, over-limit,
        truncated or corrupt files.
    """
    path = Path(path)
    image = opened = _open(path, max_pixels)
    notes: list[str] = []
    try:
        source_mode, source_format = image.mode, image.format or ""
        orientation = _exif_orientation(image)
        try:
            image.load()  # decodes; raises OSError on truncated data
        except Image.DecompressionBombError as err:
            raise ImageLoadError(path, f"refused as a possible decompression bomb: {err}") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
            raise ImageLoadError(path, f"truncated or corrupt image data: {err}") from None
        if orientation > 1:
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as err:  # noqa: BLE001 - a broken EXIF block must name the file
                raise ImageLoadError(path, f"cannot apply EXIF orientation {orientation}: {err}") from None
            notes.append(f"EXIF orientation {orientation} applied")
        try:
            rgb = _to_rgb_uint8(image, notes)
        except (OSError, ValueError) as err:
            raise ImageLoadError(path, f"cannot convert mode {source_mode} to RGB: {err}") from None
    finally:
        if image is not opened:
            image.close()
        opened.close()
    height, width = rgb.shape[:2]
    return LoadedImage(
        rgb=rgb,
        path=path,
        original_size=(height, width),
        exif_orientation=orientation,
        source_mode=source_mode,
        source_format=source_format,
        notes=notes,
    )


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the extension is a known still-image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
