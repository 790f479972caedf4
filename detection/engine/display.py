"""The pictures a predict run's writers draw on, made where the image is decoded (a decoding
worker): the overlay base at the display size and the viewer's JPEG instead of the full-resolution pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detection.runfolder.grids import VIEWER_IMAGE_SIDE
from detection.render.cell_overlays import DEFAULT_OVERLAY_SIZE, overlay_base
from detection.data.image_codec import encode_image
from detection.render.panel import fit_image


@dataclass(frozen=True)
class DisplaySpec:
    """What to make from each decoded image for the writers.

    overlays: the overlay base, the image with its long side scaled down to `overlay_size`
        pixels (None: the original image; `render.cell_overlays.overlay_base`).
    viewer_jpeg: the viewer's image (`viewer_image_jpeg`).
    """

    overlays: bool = False
    overlay_size: int | None = DEFAULT_OVERLAY_SIZE
    viewer_jpeg: bool = False

    def __post_init__(self) -> None:
        if self.overlay_size is not None and int(self.overlay_size) <= 0:
            raise ValueError(f"overlay size must be a positive number of pixels or None, got {self.overlay_size}")


@dataclass
class DisplayImages:
    """What `DisplaySpec` asked for, of one image.

    overlay: uint8 (h, w, 3) RGB, the decoded image at `display_size((H, W), overlay_size)`.
    viewer_jpeg: JPEG bytes of the image with its long side at most VIEWER_IMAGE_SIDE.
    """

    overlay: np.ndarray | None = None
    viewer_jpeg: bytes | None = None


def viewer_image_jpeg(image: np.ndarray) -> bytes:
    """The image as the viewer shows it: longest side at most VIEWER_IMAGE_SIDE, JPEG quality 90."""
    height, width = image.shape[:2]
    scale = min(1.0, VIEWER_IMAGE_SIDE / max(height, width))
    if scale < 1.0:
        image = fit_image(image, max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    return encode_image(image, ".jpg", jpeg_quality=90)


def make_display_images(rgb: np.ndarray, spec: DisplaySpec) -> DisplayImages:
    """The display images of one decoded uint8 (H, W, 3) RGB image (EXIF applied)."""
    return DisplayImages(overlay=overlay_base(rgb, spec.overlay_size) if spec.overlays else None,
                         viewer_jpeg=viewer_image_jpeg(rgb) if spec.viewer_jpeg else None)
