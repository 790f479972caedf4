"""D-RISE against a reference: xaitk-saliency's DRISEScoring (0.15) on the same toy detector, masks and
targets. Skipped when xaitk-saliency is not installed (it pulls scikit-learn and scikit-image, so it is
not in [dev]: `pip install xaitk-saliency==0.15.0`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.attention.drise_saliency import DriseOptions, drise_saliency, objectness, random_masks
from detection.boxes import cxcywh_to_xyxy
from detection.models.contract import PostprocessRule, PreprocessSpec

xaitk_scoring = pytest.importorskip("xaitk_saliency.impls.gen_detector_prop_sal.drise_scoring")

# xaitk's IoU counts boxes in whole pixels (+1 on each side's length); boxes in units this large make
# that +1 negligible (relative 1e-6), so the two IoUs agree
_XAITK_UNITS = 1e6


class ToyDetector:
    """DETR's rule (softmax with no-object), three queries over two classes: query 0 sees class 1 in
    rows 0-7 x cols 16-23 and its box shrinks towards that region with the evidence; query 1 sees class
    0 in rows 20-31; query 2 sees nothing."""

    preprocess_spec = PreprocessSpec.fixed(32, 32)
    postprocess_rule = PostprocessRule.softmax_no_object()

    def __call__(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        first = images[:, :, 0:8, 16:24].mean(dim=(1, 2, 3))
        second = images[:, :, 20:32, :].mean(dim=(1, 2, 3))
        logits = torch.zeros((len(images), 3, 3))
        logits[:, 0, 1] = 8.0 * (first - 0.3)
        logits[:, 1, 0] = 6.0 * (second - 0.4)
        logits[:, 2, 2] = 3.0
        boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.5, 0.8, 1.0, 0.4], [0.1, 0.1, 0.1, 0.1]]).repeat(len(images), 1, 1)
        boxes[:, 0, 0] = 0.5 + 0.1 * first  # towards columns 16-23 ...
        boxes[:, 0, 2] = 1.0 - 0.6 * first  # ... and narrower
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_drise_equals_xaitk_drise_scoring_up_to_its_max_abs_scale():
    detector = ToyDetector()
    rule = detector.postprocess_rule
    options = DriseOptions(num_masks=120, grid_size=4, probability=0.5, seed=3, batch_size=32)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5
    targets = torch.tensor([[0.4, 0.0, 0.8, 0.5], [0.0, 0.6, 1.0, 1.0]])
    labels = torch.tensor([1, 0])
    outputs = []

    def recording(images, padding_mask):
        out = detector(images, padding_mask)
        outputs.append(out)
        return out

    ours = drise_saliency(recording, image, targets, labels, detector.preprocess_spec, rule, options).double().numpy()

    # the same masks and the same detections, in xaitk's (4 box + 1 objectness + C classes) vectors
    masks = random_masks((32, 32), options).masks(0, options.num_masks).double().numpy()
    logits = torch.cat([o["pred_logits"] for o in outputs])
    probabilities = rule.class_probabilities(logits).double()
    perturbed = torch.cat([cxcywh_to_xyxy(torch.cat([o["pred_boxes"] for o in outputs]).double()) * _XAITK_UNITS,
                           objectness(probabilities, rule)[..., None], probabilities], dim=-1).numpy()
    reference = torch.cat([targets.double() * _XAITK_UNITS, torch.ones(2, 1, dtype=torch.float64),
                           torch.nn.functional.one_hot(labels, 2).double()], dim=-1).numpy()
    theirs = xaitk_scoring.DRISEScoring().generate(reference, perturbed, masks)

    assert theirs.shape == ours.shape == (2, 32, 32)
    scaled = ours / np.abs(ours).reshape(2, -1).max(axis=1)[:, None, None]
    np.testing.assert_allclose(scaled, theirs, rtol=1e-5, atol=1e-6)
    # the maps differ between targets: not a test of two constants
    assert np.abs(theirs[0] - theirs[1]).max() > 0.05
