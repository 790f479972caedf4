"""Augmentation keeps boxes on their objects; validation transform == the inference rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.data.preprocess import image_to_input, resized_size
from detection.data.transforms import AugmentConfig, EvalTransform, TrainTransform, build_transform

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _rectangles_image():
    """Filled rectangles of distinct pure colours on black; boxes in COCO xywh pixels."""
    image = np.zeros((150, 190, 3), dtype=np.uint8)
    boxes = np.array([[10, 12, 50, 30], [100, 20, 70, 60], [30, 90, 40, 50], [150, 110, 35, 35]], np.float32)
    for (x, y, w, h), colour in zip(boxes.astype(int), COLOURS):
        image[y:y + h, x:x + w] = colour
    return image, boxes


def _colour_box(image_chw: torch.Tensor, colour) -> np.ndarray | None:
    """xywh of the pixels closest to `colour` (the rectangle as it was resampled)."""
    pixels = image_chw.permute(1, 2, 0).numpy() * 255
    inside = np.abs(pixels - np.array(colour, np.float32)).max(axis=2) < 100
    ys, xs = np.nonzero(inside)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()], np.float32)


@pytest.mark.parametrize("flips", [(0.5, 0.5), (0.0, 0.0)])
def test_boxes_follow_the_drawn_rectangles(flips):
    image, boxes = _rectangles_image()
    config = AugmentConfig(hflip=flips[0], vflip=flips[1], color_jitter={},
                           crop={"p": 0.7, "max_fraction": 0.5}, scales=[96, 128, 160], max_size=200,
                           min_visibility=0.2)
    transform = TrainTransform(config)
    kept_total = 0
    for seed in range(30):
        tensor, out_boxes, labels, kept = transform(image, boxes, np.arange(4), seed=seed)
        assert tensor.dtype == torch.float32 and 0.0 <= tensor.min() and tensor.max() <= 1.0
        assert labels.tolist() == kept.tolist()
        for box, index in zip(out_boxes, kept):
            found = _colour_box(tensor, COLOURS[index])
            assert found is not None
            # resampling blurs each edge by < 1 output pixel
            assert np.abs(found - box).max() <= 1.5, (seed, index, found, box)
            kept_total += 1
    assert kept_total > 60


def test_without_crop_no_box_is_dropped():
    image, boxes = _rectangles_image()
    transform = TrainTransform(AugmentConfig(hflip=0.5, vflip=0.5, crop={}, scales=[80, 120], max_size=150))
    for seed in range(10):
        _, out_boxes, labels, kept = transform(image, boxes, np.arange(4), seed=seed)
        assert kept.tolist() == [0, 1, 2, 3] and len(out_boxes) == 4


def test_output_size_follows_the_detr_resize_rule_and_seed_is_deterministic():
    image, boxes = _rectangles_image()
    config = AugmentConfig(hflip=0.5, color_jitter={"p": 1.0, "brightness": 0.3}, crop={}, scales=[64, 100],
                           max_size=110)
    transform = TrainTransform(config)
    sizes = set()
    for seed in range(12):
        tensor, *_ = transform(image, boxes, np.arange(4), seed=seed)
        sizes.add(tuple(tensor.shape[1:]))
        again, *_ = transform(image, boxes, np.arange(4), seed=seed)
        assert torch.equal(tensor, again)
    assert sizes == {resized_size(150, 190, 64, 110), resized_size(150, 190, 100, 110)}


def test_eval_transform_is_the_inference_rule():
    image, boxes = _rectangles_image()
    transform = build_transform(None, train=False, min_size=120, max_size=140)
    assert isinstance(transform, EvalTransform)
    tensor, out_boxes, labels, kept = transform(image, boxes, np.arange(4))
    assert torch.equal(tensor, image_to_input(image, 120, 140))
    sx, sy = tensor.shape[2] / 190, tensor.shape[1] / 150
    np.testing.assert_allclose(out_boxes, boxes * np.array([sx, sy, sx, sy]), rtol=1e-6)
    for box, index in zip(out_boxes, kept):
        assert np.abs(_colour_box(tensor, COLOURS[index]) - box).max() <= 1.5


def test_unknown_augment_key_is_an_error():
    with pytest.raises(ValueError, match="unknown augment keys"):
        AugmentConfig.from_dict({"scale": [100]})
    with pytest.raises(ValueError, match="at least one"):
        AugmentConfig.from_dict({"scales": []})
