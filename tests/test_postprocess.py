"""postprocess(): hand-made logits/boxes -> Detections in original pixels with query index."""
from __future__ import annotations

import math

import pytest
import torch

from detection.postprocess import postprocess


def _logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(probabilities))


def test_scores_labels_boxes_and_query_index() -> None:
    names = ["cat", "dog"]
    # image 0: 3 queries; image 1: 3 queries. Classes: cat, dog, no-object.
    logits = torch.stack([
        _logits_for([[0.05, 0.05, 0.90],    # q0: no object
                     [0.10, 0.80, 0.10],    # q1: dog 0.8
                     [0.95, 0.03, 0.02]]),  # q2: cat 0.95
        _logits_for([[0.70, 0.20, 0.10],    # q0: cat 0.7 (not > 0.7)
                     [0.20, 0.75, 0.05],    # q1: dog 0.75
                     [0.30, 0.30, 0.40]]),  # q2: below threshold
    ])
    boxes = torch.tensor([
        [[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.25, 1.0, 0.5]],
        [[0.5, 0.5, 1.0, 1.0], [0.1, 0.2, 0.2, 0.4], [0.5, 0.5, 0.5, 0.5]],
    ])
    dets = postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(200, 400), (50, 100)], names,
                       score_threshold=0.7)
    assert len(dets) == 2
    first, second = dets
    assert first.image_size == (200, 400)
    assert first.query_index.tolist() == [2, 1]  # sorted by score
    assert first.labels.tolist() == [0, 1]
    assert first.class_names == ["cat", "dog"]
    torch.testing.assert_close(first.scores, torch.tensor([0.95, 0.80]))
    # q2: cxcywh (0.5, 0.25, 1.0, 0.5) -> xyxy (0, 0, 1, 0.5) * (W=400, H=200)
    torch.testing.assert_close(first.boxes, torch.tensor([[0.0, 0.0, 400.0, 100.0], [0.0, 0.0, 200.0, 200.0]]))
    assert first.boxes.dtype == torch.float32 and first.query_index.dtype == torch.int64
    assert second.query_index.tolist() == [1]
    torch.testing.assert_close(second.boxes, torch.tensor([[0.0, 0.0, 20.0, 20.0]]))
    assert second.class_names == ["dog"]


def test_no_object_class_is_dropped_not_renormalised() -> None:
    # cat 0.5, dog 0.1, no-object 0.4: score is 0.5 (softmax over all C+1, then drop last)
    logits = _logits_for([[0.5, 0.1, 0.4]])[None]
    boxes = torch.full((1, 1, 4), 0.5)
    det = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 10]]),
                      ["cat", "dog"], score_threshold=0.3)[0]
    assert det.scores.item() == pytest.approx(0.5, abs=1e-6)
    assert det.labels.tolist() == [0]


def test_empty_and_invalid_inputs() -> None:
    logits = torch.zeros(1, 4, 3)  # uniform: every score 1/3
    boxes = torch.full((1, 4, 4), 0.5)
    det = postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(10, 20)], ["a", "b"], 0.9)[0]
    assert len(det) == 0 and det.boxes.shape == (0, 4) and det.class_names == []
    with pytest.raises(ValueError, match="class names"):
        postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(10, 20)], ["a"], 0.5)
    with pytest.raises(ValueError, match="original sizes"):
        postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(10, 20), (5, 5)], ["a", "b"], 0.5)


def test_matches_model_output_end_to_end() -> None:
    """Boxes scale with the ORIGINAL size: the same normalised box maps to both images."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4) * 3
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    sizes = [(480, 640), (100, 300)]
    dets = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes, ["a", "b", "c"], 0.0)
    for i, det in enumerate(dets):
        assert len(det) == 5
        q = det.query_index
        cx, cy, w, h = boxes[i, q].unbind(-1)
        height, width = sizes[i]
        expected = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                                (cx + w / 2) * width, (cy + h / 2) * height], -1)
        torch.testing.assert_close(det.boxes, expected)
        probs = logits[i].softmax(-1)[:, :-1]
        torch.testing.assert_close(det.scores, probs[q].max(-1).values)
        assert torch.all(det.scores[:-1] >= det.scores[1:])
        assert not math.isnan(float(det.scores.sum()))
