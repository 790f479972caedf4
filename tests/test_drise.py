"""D-RISE (issue #13): the similarity on hand-computed values, objectness per rule, seeded masks,
pooling geometry, and a toy detector whose score depends on one known region."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detection.attention.drise_saliency import (DriseOptions, detection_similarity, downsample_factor, drise_saliency,
                                       objectness, pool_saliency, random_masks)
from detection.attention.methods import Drise, ImageInput, MethodMaps, Targets
from detection.data.preprocess import pad_batch
from detection.models.contract import PostprocessRule, PreprocessSpec

SOFTMAX = PostprocessRule.softmax_no_object()
SIGMOID = PostprocessRule.sigmoid_topk()


def test_similarity_on_hand_computed_values():
    # target: box [0, 0, 2, 2] (normalised units, any consistent frame), class 1
    target_boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target_labels = torch.tensor([1])
    # copy 0: query 0 covers half the target (IoU 2/4 / (4 + 2 - 2) = 0.5), P = (0.6, 0.8), O = 0.5
    #         query 1 is the target box exactly but all class 0: cos = 0
    # copy 1: query 0 IoU 1/7 ([1,1,3,3] vs [0,0,2,2]: inter 1, union 7), P = (0, 0.3), O = 1
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 2.0, 2.0]],
                          [[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0]]])
    probabilities = torch.tensor([[[0.6, 0.8], [0.9, 0.0]], [[0.0, 0.3], [0.5, 0.5]]])
    objectness_scores = torch.tensor([[0.5, 0.9], [1.0, 1.0]])
    weights = detection_similarity(target_boxes, target_labels, boxes, probabilities, objectness_scores)
    assert weights.shape == (1, 2)
    # copy 0: max(0.5 * 0.8 * 0.5, 1 * 0 * 0.9) = 0.2; copy 1: max(1/7 * 1 * 1, 0) = 1/7
    np.testing.assert_allclose(weights.numpy(), [[0.2, 1.0 / 7.0]], rtol=1e-6)


def test_similarity_of_two_targets_uses_each_class():
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    probabilities = torch.tensor([[[0.3, 0.4]]])  # norm 0.5: cos with class 0 = 0.6, class 1 = 0.8
    weights = detection_similarity(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([0, 1]), boxes,
                                   probabilities, torch.tensor([[0.7]]))
    np.testing.assert_allclose(weights[:, 0].numpy(), [0.6 * 0.7, 0.8 * 0.7], rtol=1e-6)


def test_objectness_is_one_minus_no_object_for_softmax_and_one_for_sigmoid():
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)]])  # softmax: 0.25, 0.25, no object 0.5
    probabilities = SOFTMAX.class_probabilities(logits)
    np.testing.assert_allclose(objectness(probabilities, SOFTMAX).numpy(), [0.5], rtol=1e-6)
    assert objectness(SIGMOID.class_probabilities(logits), SIGMOID).tolist() == [1.0]


def test_masks_are_seeded_in_range_and_drawn_consistently_in_batches():
    options = DriseOptions(num_masks=40, grid_size=4, probability=0.5, seed=3)
    first, again = random_masks((20, 30), options), random_masks((20, 30), options)
    other = random_masks((20, 30), DriseOptions(num_masks=40, grid_size=4, probability=0.5, seed=4))
    whole = first.masks(0, 40)
    assert whole.shape == (40, 20, 30) and whole.dtype == torch.float32
    assert torch.equal(whole, again.masks(0, 40)) and not torch.equal(whole, other.masks(0, 40))
    assert torch.equal(torch.cat([first.masks(0, 7), first.masks(7, 40)]), whole)
    assert float(whole.min()) >= 0.0 and float(whole.max()) <= 1.0
    # cells 5 x 8 px, shifts below one cell; grid of 4 cells kept with p = 0.5
    assert first.cell_size == (5, 8) and int(first.shifts[:, 0].max()) < 5 and int(first.shifts[:, 1].max()) < 8
    assert abs(float(first.grids.mean()) - 0.5) < 0.1


def test_a_mask_is_its_grid_upsampled_and_shifted():
    options = DriseOptions(num_masks=1, grid_size=2, probability=0.5, seed=0)
    mask_set = random_masks((4, 4), options)
    grid = mask_set.grids[0]
    upsampled = torch.nn.functional.interpolate(grid[None, None], size=(6, 6), mode="bilinear", align_corners=False)[0, 0]
    dy, dx = mask_set.shifts[0].tolist()
    assert torch.equal(mask_set.masks(0, 1)[0], upsampled[dy:dy + 4, dx:dx + 4].clamp(0.0, 1.0))


def test_pooling_averages_blocks_and_replicates_edges():
    saliency = torch.arange(9, dtype=torch.float32).reshape(1, 3, 3)
    pooled = pool_saliency(saliency, 2)
    # blocks [[0,1],[3,4]], [[2,2],[5,5]], [[6,7],[6,7]], [[8,8],[8,8]]
    np.testing.assert_allclose(pooled[0].numpy(), [[2.0, 3.5], [6.5, 8.0]])
    assert downsample_factor((800, 1066), 256) == 5 and downsample_factor((160, 160), 256) == 1


def test_stride_one_maps_at_the_original_size_are_the_identity():
    values = torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(0))
    image = MethodMaps(values, 1, (6, 8)).to_image((6, 8))
    np.testing.assert_allclose(image, values.numpy(), atol=1e-6)


class RegionDetector:
    """Softmax with no-object (DETR's rule), two queries with fixed boxes; query 0's class-1
    logit grows with the brightness of rows 0-7, columns 16-23 (the evidence), whatever its box,
    against a no-object logit 0; query 1 sees nothing."""

    preprocess_spec = PreprocessSpec.fixed(32, 32)
    postprocess_rule = SOFTMAX

    def __call__(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        evidence = images[:, :, 0:8, 16:24].mean(dim=(1, 2, 3))
        logits = torch.full((len(images), 2, 3), -6.0)
        logits[:, :, 2] = 0.0
        logits[:, 0, 1] = 12.0 * (evidence - 0.5)
        boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.1, 0.1]]).expand(len(images), 2, 4)
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_drise_on_a_toy_detector_finds_the_region_its_score_depends_on():
    detector = RegionDetector()
    image = torch.ones(3, 32, 32)
    options = DriseOptions(num_masks=400, grid_size=8, probability=0.5, seed=0, batch_size=64)
    saliency = drise_saliency(detector, image, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1]),
                              detector.preprocess_spec, detector.postprocess_rule, options)[0]
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[0:8, 16:24] = True
    peak = np.unravel_index(int(saliency.argmax()), saliency.shape)
    assert region[peak]
    # above D-RISE's offset (mean weight x p everywhere), the mass sits on the region: 1/16 of the
    # image holds over twice its share of the map's mass above its minimum (measured: 2.6 times)
    above = saliency - saliency.min()
    assert float(above[region].sum() / above.sum()) > 2 * 64 / 1024
    assert float(saliency[region].mean()) > float(saliency[~region].mean()) + 0.04
    # the method wrapper gives the same map (stride 1: the input is below 256 px) and is seeded
    images, mask = pad_batch([image])
    maps = Drise(detector, detector, options).explain(ImageInput((32, 32), images=images, padding_mask=mask),
                                                      Targets([0], [1], [[0.0, 0.0, 32.0, 32.0]]))["drise"]
    assert maps.stride == 1 and maps.input_size == (32, 32)
    assert torch.equal(maps.values[0], saliency)


def test_masked_pixels_become_black_in_the_models_input_space():
    seen = []

    def forward(images, padding_mask):
        seen.append(images.clone())
        return {"pred_logits": torch.zeros(len(images), 1, 2), "pred_boxes": torch.full((len(images), 1, 4), 0.5)}

    spec = PreprocessSpec.fixed(8, 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    options = DriseOptions(num_masks=4, grid_size=2, probability=0.5, seed=1)
    image = torch.full((3, 8, 8), 2.0)  # a normalised white pixel: (1 - 0.5) / 0.25
    drise_saliency(forward, image, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0]), spec, SIGMOID, options)
    masks = random_masks((8, 8), options).masks(0, 4)
    expected = 2.0 * masks + (-2.0) * (1.0 - masks)  # black = (0 - 0.5) / 0.25
    np.testing.assert_allclose(seen[0][:, 0].numpy(), expected.numpy(), atol=1e-6)
    # fill "mean": masked pixels take the image's mean colour, per channel (normalisation is affine)
    seen.clear()
    image = torch.stack([torch.full((8, 8), 2.0), torch.zeros(8, 8), torch.zeros(8, 8)])
    image[1, :4] = 1.0  # channel 1: half at 1, half at 0 -> mean 0.5
    drise_saliency(forward, image, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0]), spec, SIGMOID,
                   DriseOptions(num_masks=4, grid_size=2, probability=0.5, seed=1, fill="mean"))
    np.testing.assert_allclose(seen[0][:, 0].numpy(), (2.0 * masks + 2.0 * (1.0 - masks)).numpy(), atol=1e-6)
    np.testing.assert_allclose(seen[0][:, 1].numpy(), (image[1] * masks + 0.5 * (1.0 - masks)).numpy(), atol=1e-6)


def test_options_are_checked():
    with pytest.raises(ValueError, match="probability"):
        DriseOptions(probability=0.0)
    with pytest.raises(ValueError, match="num_masks"):
        DriseOptions(num_masks=0)
    with pytest.raises(ValueError, match="fill"):
        DriseOptions(fill="grey")


def test_the_run_fingerprint_names_the_fill_only_when_it_is_not_black():
    """A run folder D-RISE wrote before the fill option existed resumes: its fingerprint had no fill."""
    from detection.engine.predict_methods import ExplainOptions

    black = ExplainOptions(methods=("raw", "drise")).fingerprint()["drise"]
    assert "fill" not in black and black["num_masks"] == 1000
    mean = ExplainOptions(methods=("raw", "drise"), drise=DriseOptions(fill="mean")).fingerprint()["drise"]
    assert mean == dict(black, fill="mean")
