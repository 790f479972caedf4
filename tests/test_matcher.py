"""Hungarian matcher: cost matrix by hand, optimality against brute force, empty targets."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from box_reference import giou_by_hand
from detection.train.matcher import HungarianMatcher, matching_cost


def test_cost_matrix_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0]])  # 2 classes + no-object
    pred = torch.tensor([[0.5, 0.5, 0.4, 0.2]])
    tgt = torch.tensor([[0.55, 0.45, 0.3, 0.3]])
    cost = matching_cost(logits, pred, torch.tensor([1]), tgt, cost_class=1.5, cost_bbox=5.0, cost_giou=2.0)
    e = [math.exp(v) for v in (2.0, 0.5, -1.0)]
    prob1 = e[1] / sum(e)
    l1 = 0.05 + 0.05 + 0.1 + 0.1
    expected = -1.5 * prob1 + 5.0 * l1 - 2.0 * giou_by_hand(pred[0].tolist(), tgt[0].tolist())
    assert cost.shape == (1, 1)
    assert cost.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost over all injective maps target -> query."""
    num_queries, num_targets = cost.shape
    best = math.inf
    for queries in itertools.permutations(range(num_queries), num_targets):
        best = min(best, sum(cost[q, t].item() for t, q in enumerate(queries)))
    return best


def test_matches_brute_force_on_small_random_cases():
    generator = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    for trial in range(25):
        num_queries = int(torch.randint(1, 6, (1,), generator=generator))
        num_targets = int(torch.randint(0, num_queries + 1, (1,), generator=generator))
        logits = torch.randn(1, num_queries, 4, generator=generator)
        boxes = torch.rand(1, num_queries, 4, generator=generator) * 0.5 + 0.2
        target = {"labels": torch.randint(0, 3, (num_targets,), generator=generator),
                  "boxes": torch.rand(num_targets, 4, generator=generator) * 0.5 + 0.2}
        (pred_idx, tgt_idx), = matcher({"pred_logits": logits, "pred_boxes": boxes}, [target])
        assert len(pred_idx) == len(tgt_idx) == num_targets
        assert len(set(pred_idx.tolist())) == num_targets and sorted(tgt_idx.tolist()) == list(range(num_targets))
        if num_targets == 0:
            continue
        cost = matching_cost(logits[0], boxes[0], target["labels"], target["boxes"])
        total = cost[pred_idx, tgt_idx].sum().item()
        assert abs(total - _brute_force(cost)) < 1e-5, f"trial {trial}: not optimal"


def test_recovers_a_permutation_and_handles_empty_targets():
    targets_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.2], [0.5, 0.8, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 2])
    order = torch.tensor([2, 0, 1])  # query q predicts target order[q]
    boxes = torch.zeros(1, 5, 4)
    boxes[0, :3] = targets_boxes[order]
    boxes[0, 3:] = torch.tensor([0.5, 0.5, 0.9, 0.9])
    logits = torch.full((1, 5, 4), -5.0)
    logits[0, torch.arange(3), labels[order]] = 5.0
    logits[0, 3:, 3] = 5.0
    outputs = {"pred_logits": torch.cat([logits, logits]), "pred_boxes": torch.cat([boxes, boxes])}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    matches = HungarianMatcher()(outputs, [{"labels": labels, "boxes": targets_boxes}, empty])
    pred_idx, tgt_idx = matches[0]
    assert pred_idx.tolist() == [0, 1, 2]
    assert tgt_idx.tolist() == order.tolist()
    assert matches[1][0].numel() == 0 and matches[1][1].numel() == 0
    assert matches[1][0].dtype == torch.int64
