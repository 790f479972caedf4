"""Point view: planted sampling points land where they should in original pixels, dots sized by weight."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.attention.sampled import query_points
from detection.models.outputs import AttentionRecord, SampledAttention
from detection.render.points import dot_radii, level_color, render_points
from detection.structures import Detections

STRIDES = (8, 16)
SIZES = ((6, 8), (3, 4))  # a 48 x 64 padded batch
IMAGE = (40, 56)  # image 0's input size; its original image is twice as large
ORIGINAL = (80, 112)


def record(points, sampler="bilinear", heads=2, points_per_level=(3, 2)):
    """points: [(head, level, slot, x_input_px, y_input_px, weight)] for query 1 of the last layer."""
    locations = torch.zeros(2, 1, heads, 3, 2, 3, 2)
    weights = torch.zeros(2, 1, heads, 3, 2, 3)
    for head, level, slot, x_px, y_px, weight in points:
        (height, width), stride = SIZES[level], STRIDES[level]
        locations[-1, 0, head, 1, level, slot] = torch.tensor([x_px / (width * stride), y_px / (height * stride)])
        weights[-1, 0, head, 1, level, slot] = weight
    sampled = SampledAttention(locations=locations, weights=weights, level_sizes=SIZES, level_strides=STRIDES,
                               points_per_level=points_per_level, sampler=sampler)
    mask = torch.ones(1, *SIZES[0], dtype=torch.bool)
    mask[0, :5, :7] = False
    return AttentionRecord(decoder_cross_sampled=sampled, feature_padding_mask=mask, feature_stride=8,
                           input_size=(48, 64), image_sizes=torch.tensor([IMAGE]))


def test_query_points_are_the_planted_points_in_original_pixels():
    planted = record([
        (0, 0, 0, 20.0, 12.0, 0.6),  # -> original (40, 24)
        (1, 1, 0, 36.0, 28.0, 0.15),  # level 1 -> original (72, 56)
        (1, 0, 1, 60.0, 12.0, 0.25),  # input x 60 >= 56: in the padding, dropped
    ])
    points = query_points(planted, 0, 1, ORIGINAL)
    np.testing.assert_allclose(points.xy, [[40.0, 24.0], [72.0, 56.0]], atol=1e-5)
    np.testing.assert_allclose(points.weights, [0.6, 0.15], atol=1e-7)
    assert points.levels.tolist() == [0, 1] and points.heads.tolist() == [0, 1]
    only_head_1 = query_points(planted, 0, 1, ORIGINAL, heads=[1])
    assert only_head_1.heads.tolist() == [1] and only_head_1.levels.tolist() == [1]
    assert len(query_points(planted, 0, 1, ORIGINAL, layer=0).weights) == 0  # layer 0 holds no weight
    with pytest.raises(ValueError, match="layer 2 out of range"):
        query_points(planted, 0, 1, ORIGINAL, layer=2)
    with pytest.raises(ValueError, match="heads"):
        query_points(planted, 0, 1, ORIGINAL, heads=[2])


def test_discrete_sampler_points_sit_at_the_centre_of_the_cell_the_model_read():
    # input x 27.9 on stride 8 (w 8): int(27.9/8 + 0.5) = 3 -> cell centre x 28; y 3.0 -> row 0 (centre 4)
    points = query_points(record([(0, 0, 0, 27.9, 3.0, 1.0)], sampler="nearest"), 0, 1, ORIGINAL)
    np.testing.assert_allclose(points.xy, [[56.0, 8.0]])


def test_render_points_draws_level_coloured_dots_with_area_proportional_to_weight():
    planted = record([(0, 0, 0, 20.0, 12.0, 0.6), (1, 1, 0, 36.0, 28.0, 0.15)])
    points = query_points(planted, 0, 1, ORIGINAL)
    grey = np.full((*ORIGINAL, 3), 128, dtype=np.uint8)
    image = render_points(grey, points, max_radius=8)
    assert image.shape == grey.shape and np.array_equal(grey, np.full_like(grey, 128))  # input untouched
    # dot centres (40, 24) and (72, 56) are pixel corners: the four pixels around each hold the colour
    for (x, y), level in (((40, 24), 0), ((72, 56), 1)):
        for row in (y - 1, y):
            for col in (x - 1, x):
                assert tuple(image[row, col]) == level_color(level), (row, col)
    assert tuple(image[70, 10]) == (128, 128, 128)  # far from both dots
    changed = np.any(image != grey, axis=-1)
    area0, area1 = changed[10:40, 25:55].sum(), changed[45:70, 60:85].sum()  # one dot in each window
    assert changed.sum() == area0 + area1
    # weights 0.6 : 0.15 -> radii 8 and 4 (areas 4 : 1); anti-aliasing adds about one pixel of rim
    for area, radius in ((area0, 8.0), (area1, 4.0)):
        assert abs(np.sqrt(area / np.pi) - (radius + 1.0)) < 0.75, (area, radius)
    np.testing.assert_allclose(dot_radii(np.array([0.6, 0.15, 0.0]), 8.0), [8.0, 4.0, 1.0])
    only_level_1 = render_points(grey, points, max_radius=8, levels=[1])
    assert tuple(only_level_1[24, 40]) == (128, 128, 128) and tuple(only_level_1[56, 72]) == level_color(1)


def test_render_points_draws_the_detection_box_when_given():
    points = query_points(record([(0, 0, 0, 20.0, 12.0, 1.0)]), 0, 1, ORIGINAL)
    detection = Detections(image_size=ORIGINAL, boxes=np.array([[10.0, 10.0, 60.0, 50.0]], dtype=np.float32),
                           scores=np.array([0.9], dtype=np.float32), labels=np.array([2]),
                           query_index=np.array([1]), class_names=["c"])
    grey = np.full((*ORIGINAL, 3), 128, dtype=np.uint8)
    with_box = render_points(grey, points, detection, max_radius=4)
    assert not np.array_equal(with_box[45:50, 10:12], grey[45:50, 10:12])  # the box's left edge
    with pytest.raises(ValueError, match="one detection"):
        render_points(grey, points, Detections(image_size=ORIGINAL, boxes=np.zeros((0, 4), np.float32),
                                               scores=np.zeros(0, np.float32), labels=np.zeros(0, np.int64),
                                               query_index=np.zeros(0, np.int64), class_names=[]))
