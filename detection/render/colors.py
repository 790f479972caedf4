"""Colours for rendering: stable class colours and colormaps (RGB out; OpenCV's BGR crossed
through `data.image_codec.swap_red_blue`, the package's one swap)."""
from __future__ import annotations

import cv2
import numpy as np

from detection.data.image_codec import swap_red_blue

# Default colormap: viridis is perceptually uniform (equal steps in saliency look like equal
# steps in colour), its lightness rises monotonically (order survives grey-scale printing) and it
# stays readable for colour-blind viewers. TURBO/JET have false edges where hue changes fast.
DEFAULT_COLORMAP = cv2.COLORMAP_VIRIDIS

# Class palette: 20 distinct, saturated colours (tab10 + darker/lighter companions), RGB.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (0, 72, 186), (255, 191, 0), (0, 128, 128), (128, 0, 64), (95, 158, 60),
    (220, 20, 140), (70, 50, 160), (180, 120, 0), (0, 160, 100), (200, 70, 70),
)


def class_color(label: int) -> tuple[int, int, int]:
    """Stable RGB colour of a model label index (the same label always gets the same colour)."""
    return _PALETTE[int(label) % len(_PALETTE)]


def text_color_on(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `background` (Rec. 709 luma)."""
    red, green, blue = background
    luma = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def apply_colormap(saliency: np.ndarray, colormap: int = DEFAULT_COLORMAP) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W, 3) uint8 RGB through an OpenCV colormap."""
    levels = np.multiply(saliency, 255.0)
    np.rint(levels, out=levels)
    np.clip(levels, 0, 255, out=levels)
    levels = levels.astype(np.uint8)
    return swap_red_blue(cv2.applyColorMap(levels, colormap))
