"""Inference preprocessing: a detector's PreprocessSpec applied to an image, and the batch padder.

Images here are RGB; inputs are float32 (3, h, w), in [0, 1] unless the spec normalises
(DETR normalises inside the model and zeroes padding there, so its spec does not).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from detection.models.contract import PreprocessSpec


_CV2_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def _as_spec(spec: PreprocessSpec | int | None, max_size: int | None) -> PreprocessSpec:
    """A PreprocessSpec, or DETR's shortest-edge rule from the older (min_size, max_size) form."""
    if isinstance(spec, PreprocessSpec):
        if max_size is not None:
            raise ValueError("give a PreprocessSpec or (min_size, max_size), not both")
        return spec
    if spec is None:
        raise ValueError("need a PreprocessSpec or min_size")
    return PreprocessSpec.shortest_edge(spec, max_size)


def _shortest_edge_size(height: int, width: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    # facebookresearch/detr `datasets/transforms.get_size_with_aspect_ratio`, rounding included
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


def _hf_shortest_edge_size(height: int, width: int, min_size: int, max_size: int | None,
                           yolos: bool) -> tuple[int, int]:
    # transformers `image_transforms.get_size_with_aspect_ratio` (yolos=False) and
    # `models/yolos/image_processing_yolos.get_size_with_aspect_ratio_yolos` (yolos=True)
    size, raw_size = min_size, None
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            raw_size = max_size * short / long
            size = int(round(raw_size))
    scale_from = raw_size if raw_size is not None else size
    already = (height <= width and height == size) or (width <= height and width == size)
    if already and not (yolos and width < height):
        new_h, new_w = height, width
    elif width < height:
        new_h, new_w = int(scale_from * height / width), size
    else:
        new_h, new_w = size, int(scale_from * width / height)
    if yolos:
        new_h, new_w = new_h - new_h % 16, new_w - new_w % 16
    return new_h, new_w


def resized_size(height: int, width: int, min_size: PreprocessSpec | int | None = None,
                 max_size: int | None = None) -> tuple[int, int]:
    """(new_height, new_width) of a (height, width) image under a resize rule.

    min_size: a PreprocessSpec (its resize rule is used), or, as before, DETR's shortest-edge
    size together with `max_size`: shorter side -> min_size, longer <= max_size, identical to
    facebookresearch/detr `datasets/transforms.get_size_with_aspect_ratio`.
    """
    spec = _as_spec(min_size, max_size)
    if spec.resize == "none":
        return height, width
    if spec.resize == "fixed":
        return int(spec.fixed_size[0]), int(spec.fixed_size[1])
    if spec.resize == "longest_edge":
        scale = spec.max_size / max(height, width)
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    if spec.size_rounding == "detr":
        return _shortest_edge_size(height, width, spec.min_size, spec.max_size)
    return _hf_shortest_edge_size(height, width, spec.min_size, spec.max_size, spec.size_rounding == "yolos")


def image_to_input(image_rgb: np.ndarray, min_size: PreprocessSpec | int | None = None,
                   max_size: int | None = None) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, h, w) model input, resized by `resized_size`.

    min_size: a PreprocessSpec, or (as before) DETR's (min_size, max_size) pair, which is
    `PreprocessSpec.shortest_edge(min_size, max_size)`. Values are in [0, 1] unless the spec
    has mean/std, then (x - mean) / std. Resize method: see PreprocessSpec.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W, 3) RGB, got {image_rgb.dtype} {image_rgb.shape}")
    spec = _as_spec(min_size, max_size)
    height, width = image_rgb.shape[:2]
    new_h, new_w = resized_size(height, width, spec)
    resize = (new_h, new_w) != (height, width)
    backend = spec.resize_backend
    if backend == "torchvision":
        return _torchvision_input(image_rgb, spec, (new_h, new_w) if resize else None)
    if resize and backend == "opencv":
        image_rgb = cv2.resize(image_rgb, (new_w, new_h), interpolation=_CV2_INTERPOLATION[spec.interpolation])
    image_rgb = np.ascontiguousarray(image_rgb)
    if not image_rgb.flags.writeable:  # torch.from_numpy warns on read-only buffers (e.g. PIL's)
        image_rgb = image_rgb.copy()
    tensor = torch.from_numpy(image_rgb).permute(2, 0, 1)
    tensor = tensor.float().div_(255.0)
    if resize and backend == "torch":
        tensor = F.interpolate(tensor[None], size=(new_h, new_w), mode=spec.interpolation,
                               align_corners=False, antialias=spec.antialias)[0]
    return _normalise(tensor, spec)


def _normalise(tensor: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    if spec.mean is not None:
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
        tensor = (tensor - mean) / std
    return tensor


def _torchvision_input(image_rgb: np.ndarray, spec: PreprocessSpec, size: tuple[int, int] | None) -> torch.Tensor:
    """transformers' torchvision processors: resize the uint8 tensor, then / 255, normalise.
    "nearest" is torchvision's NEAREST_EXACT (pixel centres, PIL's nearest), as transformers maps it."""
    tensor = torch.from_numpy(np.array(image_rgb, copy=True)).permute(2, 0, 1).contiguous()
    if size is not None:
        mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                "nearest": InterpolationMode.NEAREST_EXACT}[spec.interpolation]
        tensor = tvF.resize(tensor, list(size), interpolation=mode, antialias=spec.antialias)
    return _normalise(tensor.float().div_(255.0), spec)


def pad_batch(images: Sequence[torch.Tensor], size_divisibility: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (3, h_i, w_i) tensors to a (B, 3, H, W) batch at the bottom/right.

    H, W: the largest height and width, rounded up to a multiple of size_divisibility
    (a PreprocessSpec's). Returns (images, padding_mask) with padding_mask (B, H, W) bool,
    True on padding. Padded pixels are 0 here; DETR zeroes them again after normalisation.
    """
    if len(images) == 0:
        raise ValueError("pad_batch needs at least one image")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    height = -(-max(int(im.shape[-2]) for im in images) // size_divisibility) * size_divisibility
    width = -(-max(int(im.shape[-1]) for im in images) // size_divisibility) * size_divisibility
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        mask[i, : im.shape[-2], : im.shape[-1]] = False
    return batch, mask
