"""Set criterion against hand-computed values: weighted CE, L1, GIoU, aux losses, empty targets."""
from __future__ import annotations

import math

import pytest
import torch

from detection.train.losses import SetCriterion
from box_reference import giou_by_hand
from detection.train.matcher import HungarianMatcher


def _log_softmax(row, index):
    return row[index] - math.log(sum(math.exp(v) for v in row))


def _case():
    """Two images, two queries each, 2 classes (+ no-object). Image 0 has one target that
    query 1 clearly matches; image 1 has no target."""
    logits = torch.tensor([[[0.2, 0.1, 1.5], [0.3, 2.0, -0.5]],
                           [[1.0, -1.0, 0.0], [0.0, 0.5, 0.25]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.52, 0.48, 0.3, 0.22]],
                          [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.25, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return logits, boxes, targets


def test_losses_match_hand_computed_values():
    logits, boxes, targets = _case()
    eos = 0.1
    criterion = SetCriterion(2, HungarianMatcher(), eos_coef=eos)
    total, losses = criterion({"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}, targets)

    # CE: image 0 query 1 -> class 1, every other query -> no-object (index 2, weight eos);
    # PyTorch's weighted mean divides by the sum of the weights of the targets.
    terms = [(1.0, -_log_softmax(logits[0, 1].tolist(), 1))]
    terms += [(eos, -_log_softmax(logits[b, q].tolist(), 2)) for b, q in ((0, 0), (1, 0), (1, 1))]
    ce = sum(w * v for w, v in terms) / sum(w for w, _ in terms)
    l1 = 0.02 + 0.02 + 0.05 + 0.02  # one target box in the batch -> divide by 1
    giou = 1 - giou_by_hand(boxes[0, 1].tolist(), targets[0]["boxes"][0].tolist())
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(giou, rel=1e-5)
    assert total.item() == pytest.approx(1.0 * ce + 5.0 * l1 + 2.0 * giou, rel=1e-5)


def test_box_losses_are_divided_by_the_number_of_targets():
    logits, boxes, targets = _case()
    # same target twice in image 0 (two queries), none in image 1: 2 boxes in the batch
    targets[0] = {"labels": torch.tensor([1, 0]),
                  "boxes": torch.tensor([[0.5, 0.5, 0.25, 0.2], [0.2, 0.2, 0.1, 0.1]])}
    criterion = SetCriterion(2, HungarianMatcher(), eos_coef=0.1)
    _, losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    # query 0 predicts the second target exactly -> contributes 0; query 1 as before
    assert losses["loss_bbox"].item() == pytest.approx((0.02 + 0.02 + 0.05 + 0.02) / 2, rel=1e-5)


def test_aux_losses_are_computed_per_layer_and_weighted():
    logits, boxes, targets = _case()
    criterion = SetCriterion(2, HungarianMatcher(), eos_coef=0.1,
                             weight_dict={"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0})
    aux = {"pred_logits": logits.flip(1), "pred_boxes": boxes.flip(1)}
    total, losses = criterion({"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [aux]}, targets)
    _, aux_alone = criterion(aux, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[f"{name}_0"].item() == pytest.approx(aux_alone[name].item(), rel=1e-6)
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0}
    expected = sum(weights[k.rstrip("_0")] * v.item() for k, v in losses.items())
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_no_targets_at_all_gives_zero_box_loss_and_a_gradient():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    boxes = torch.rand(2, 3, 4, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    criterion = SetCriterion(3, HungarianMatcher(), eos_coef=0.1)
    total, losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, [empty, empty])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    expected_ce = -torch.log_softmax(logits.detach(), -1)[..., 3].mean()
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    total.backward()
    assert logits.grad is not None and boxes.grad is not None
