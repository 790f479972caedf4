"""Explanation methods behind one interface (issue #13): each method's maps equal the library
function it wraps (whose rules are tested in test_aggregate / test_gradient_maps: finite
differences, a transcription of Chefer et al.'s rules), refusals name the family and the methods
that apply."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.attention.gradients import attn_grad_maps, relevance_maps
from detection.attention.maps import detection_maps
from detection.attention.methods import (METHODS, AttentionRollout, AttnGrad, ImageInput, MethodMaps,
                                         MethodNotApplicable, RawAttention, Relevance, Targets, applicable_methods,
                                         check_methods, parse_methods)
from detection.data.preprocess import pad_batch
from detection.models.hf.families import FAMILIES
from detection.models.registry import build_model

QUERIES = [0, 3, 7]
LABELS = [1, 2, 0]
BOXES = [[0.0, 0.0, 40.0, 30.0], [10.0, 20.0, 90.0, 60.0], [50.0, 5.0, 120.0, 90.0]]
ORIGINAL = (150, 200)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("detr-tiny").eval()
    images, mask = pad_batch([torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))])
    with torch.no_grad():
        record = model(images, mask, cross_attention=True, encoder_attention=True,
                       decoder_self_attention=True)["attention"]
    image = ImageInput(ORIGINAL, attention=record, images=images, padding_mask=mask)
    return model, image, Targets(QUERIES, LABELS, BOXES)


def test_raw_and_rollout_are_todays_maps_exactly(setup):
    _, image, targets = setup
    maps = {**RawAttention(("last", "mean", 1), ("mean", "max", 0)).explain(image, targets),
            **AttentionRollout(("mean", "max")).explain(image, targets)}
    assert list(maps) == ["last/mean", "last/max", "last/0", "mean/mean", "mean/max", "mean/0", "1/mean", "1/max",
                          "1/0", "rollout/mean", "rollout/max"]
    for choice, cells in maps.items():
        layers, heads = choice.split("/")
        expected = detection_maps(image.attention, 0, QUERIES, ORIGINAL, heads=heads, layers=layers, normalize=None)
        np.testing.assert_array_equal(cells.to_image(ORIGINAL), expected)


def test_gradient_methods_are_the_gradient_functions(setup):
    model, image, targets = setup
    grad = AttnGrad(model, ("last", "mean")).explain(image, targets)
    relevance = Relevance(model).explain(image, targets)
    assert list(grad) == ["attn-grad/last", "attn-grad/mean"] and list(relevance) == ["relevance"]
    for layers in ("last", "mean"):
        expected = attn_grad_maps(model, image.images, image.padding_mask, 0, QUERIES, LABELS, layers=layers)
        torch.testing.assert_close(grad[f"attn-grad/{layers}"].values, expected.detach(), rtol=1e-5, atol=1e-7)
    expected = relevance_maps(model, image.images, image.padding_mask, 0, QUERIES, LABELS)
    torch.testing.assert_close(relevance["relevance"].values, expected.detach(), rtol=1e-5, atol=1e-7)
    # over the valid feature cells of the 96 x 128 input (stride 32): 3 x 4, ready for cells_to_image
    assert relevance["relevance"].stride == 32 and relevance["relevance"].input_size == (96, 128)
    assert relevance["relevance"].values.shape == (3, 3, 4) and float(relevance["relevance"].values.min()) >= 0.0


def test_attn_grad_refuses_rollout():
    with pytest.raises(ValueError, match="relevance"):
        AttnGrad(None, ("rollout",))


class _HFStandIn:
    """A wrapped Hugging Face detector as the methods see it: what the contract declares of its family."""

    gradient_capture = "graph"

    def __init__(self, model_type: str) -> None:
        self.family = FAMILIES[model_type]
        self.family_name, self.attention_kind = self.family.title, self.family.attention


def test_every_method_applies_to_the_native_detr(setup):
    model, _, _ = setup
    assert applicable_methods(model) == list(METHODS) == ["raw", "rollout", "attn-grad", "relevance", "drise",
                                                                       "in-box"]
    check_methods(list(METHODS), model)


def test_a_method_that_does_not_apply_is_refused_naming_the_family_and_what_applies():
    for family in ("yolos", "conditional_detr", "dab-detr", "table-transformer"):  # dense: every method
        assert applicable_methods(_HFStandIn(family)) == list(METHODS)
    for family in ("deformable_detr", "rt_detr", "rt_detr_v2", "d_fine", "rf_detr", "deimv2",
                   "lw_detr"):  # sampled: no rollout, relevance
        assert applicable_methods(_HFStandIn(family)) == ["raw", "attn-grad", "drise", "in-box"]
    detector = _HFStandIn("deformable_detr")
    for name in ("relevance", "rollout"):
        with pytest.raises(MethodNotApplicable) as error:
            check_methods(["raw", name], detector)
        message = str(error.value)
        assert f"{name!r} does not apply to the Deformable DETR family" in message
        assert message.endswith("methods that apply: raw, attn-grad, drise, in-box")
    check_methods(["raw", "attn-grad", "drise"], detector)
    with pytest.raises(MethodNotApplicable, match="'relevance' does not apply to the object family"):
        check_methods(["relevance"], object())  # neither the native DETR nor a wrapped family


def test_parse_methods_keeps_order_and_refuses_unknown_names():
    assert parse_methods("relevance, raw,relevance") == ["relevance", "raw"]
    with pytest.raises(ValueError, match="gradcam"):
        parse_methods("raw,gradcam")


def test_targets_and_maps_check_their_inputs():
    with pytest.raises(ValueError, match="one of each"):
        Targets([0, 1], [0], [[0, 0, 1, 1]])
    maps = MethodMaps(torch.ones(1, 2, 2, requires_grad=True) * 2, 4, (8, 7))
    assert not maps.values.requires_grad and maps.geometry() == {"stride": 4, "input_size": [8, 7], "grid_size": [2, 2]}
