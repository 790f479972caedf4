"""Training-only dense encoder supervision: cell targets by hand, wrapper keeps DETR outputs."""
from __future__ import annotations

import torch

from detection.train.dense import dense_losses, dense_targets


def test_dense_targets_by_hand():
    # image 64 x 96 (h x w) inside a padded 64 x 128 batch, stride 32 -> grid 2 x 4, the last column padding
    target = {
        "size": torch.tensor([64, 96]),
        "labels": torch.tensor([2, 0]),
        # big box over the left two thirds, small box around the cell centre (16, 48) px
        "boxes": torch.tensor([[0.3, 0.5, 0.6, 1.0], [0.5, 0.25, 0.2, 0.3]]),
    }
    labels, boxes = dense_targets([target], (2, 4), stride=32, num_classes=3)
    # cell centres x = 16, 48, 80, 112 px -> 0.167, 0.5, 0.833, 1.167; y = 16, 48 -> 0.25, 0.75
    assert labels.tolist() == [[2, 0, 3, -100, 2, 2, 3, -100]]
    torch.testing.assert_close(boxes[0, 1], target["boxes"][1])  # smallest containing box wins
    torch.testing.assert_close(boxes[0, 4], target["boxes"][0])
    assert boxes[0, 2].abs().sum() == 0


def test_dense_losses_on_perfect_and_empty_predictions():
    target = {"size": torch.tensor([64, 64]), "labels": torch.tensor([1]),
              "boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5]])}
    labels, boxes = dense_targets([target], (2, 2), stride=32, num_classes=2)
    assert labels.tolist() == [[1, 2, 2, 2]]
    logits = torch.full((1, 4, 3), -20.0)
    logits[0, torch.arange(4), labels[0]] = 20.0
    outputs = {"dense_logits": logits, "dense_boxes": boxes.clone(), "dense_feature_size": (2, 2)}
    losses = dense_losses(outputs, [target], stride=32, num_classes=2)
    assert losses["loss_dense_ce"].item() < 1e-6 and abs(losses["loss_dense_box"].item()) < 1e-6
    empty = {"size": torch.tensor([64, 64]), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    outputs["dense_logits"] = torch.zeros(1, 4, 3)
    losses = dense_losses(outputs, [empty], stride=32, num_classes=2)
    assert abs(losses["loss_dense_ce"].item() - torch.log(torch.tensor(3.0)).item()) < 1e-6
    assert losses["loss_dense_box"].item() == 0.0
