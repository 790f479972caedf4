"""Inference preprocessing: the one resize rule and the one batch padder.

Images here are RGB. Model inputs are float32 in [0, 1], (3, h, w); the model itself
normalises (mean/std buffers) and zeroes padding, so nothing else may normalise.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch


def resized_size(height: int, width: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """(new_height, new_width) under DETR's rule: shorter side -> min_size, longer <= max_size.

    Identical to facebookresearch/detr `datasets/transforms.get_size_with_aspect_ratio`.
    """
    size = min_size
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def image_to_input(image_rgb: np.ndarray, min_size: int, max_size: int | None) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, h, w) in [0, 1], resized by `resized_size`."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W, 3) RGB, got {image_rgb.dtype} {image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    new_h, new_w = resized_size(height, width, min_size, max_size)
    if (new_h, new_w) != (height, width):
        image_rgb = cv2.resize(image_rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    image_rgb = np.ascontiguousarray(image_rgb)
    if not image_rgb.flags.writeable:  # torch.from_numpy warns on read-only buffers (e.g. PIL's)
        image_rgb = image_rgb.copy()
    tensor = torch.from_numpy(image_rgb).permute(2, 0, 1)
    return tensor.float().div_(255.0)


def pad_batch(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (3, h_i, w_i) tensors to a (B, 3, H, W) batch at the bottom/right.

    Returns (images, padding_mask) with padding_mask (B, H, W) bool, True on padding.
    Padded pixels are 0 here; the model zeroes them again after normalisation.
    """
    if len(images) == 0:
        raise ValueError("pad_batch needs at least one image")
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        mask[i, : im.shape[-2], : im.shape[-1]] = False
    return batch, mask
