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


def _sigmoid_logits(probabilities: list[list[float]]) -> torch.Tensor:
    return torch.logit(torch.tensor(probabilities, dtype=torch.float64)).float()


def test_sigmoid_topk_one_query_gives_several_detections() -> None:
    from detection.models.contract import PostprocessRule

    names = ["cat", "dog", "bird"]
    # 3 queries x 3 classes, sigmoid probabilities chosen by hand
    logits = _sigmoid_logits([[0.90, 0.80, 0.10],    # q0: cat 0.9 AND dog 0.8
                              [0.20, 0.30, 0.95],    # q1: bird 0.95
                              [0.60, 0.05, 0.05]])[None]  # q2: cat 0.6
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]])
    det = postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(100, 200)], names,
                      score_threshold=0.5, rule=PostprocessRule.sigmoid_topk(top_k=10))[0]
    assert det.query_index.tolist() == [1, 0, 0, 2]
    assert det.labels.tolist() == [2, 0, 1, 0]
    assert det.class_names == ["bird", "cat", "dog", "cat"]
    torch.testing.assert_close(det.scores, torch.tensor([0.95, 0.90, 0.80, 0.60]))
    # q0's two detections share its box: cxcywh (0.5, 0.5, 0.2, 0.2) * (W=200, H=100)
    torch.testing.assert_close(det.boxes[1:3], torch.tensor([[80.0, 40.0, 120.0, 60.0]] * 2))
    torch.testing.assert_close(det.boxes[0], torch.tensor([0.0, 0.0, 100.0, 50.0]))
    assert det.boxes.dtype == torch.float32 and det.query_index.dtype == torch.int64


def test_sigmoid_topk_ties_threshold_and_top_k_cut() -> None:
    from detection.models.contract import PostprocessRule

    names = ["a", "b"]
    logits = _sigmoid_logits([[0.7, 0.7],     # q0: a 0.7, b 0.7 (tie within a query)
                              [0.7, 0.4],     # q1: a 0.7 (tie across queries)
                              [0.5, 0.9]])[None]  # q2: b 0.9; a 0.5 equals the threshold
    boxes = torch.full((1, 3, 4), 0.5)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    everything = postprocess(outputs, [(10, 10)], names, 0.5, PostprocessRule.sigmoid_topk(top_k=6))[0]
    # ties keep (query, class) order; 0.5 is not > 0.5, 0.4 is below
    assert list(zip(everything.query_index.tolist(), everything.labels.tolist())) == [(2, 1), (0, 0), (0, 1), (1, 0)]
    cut = postprocess(outputs, [(10, 10)], names, 0.5, PostprocessRule.sigmoid_topk(top_k=3))[0]
    assert list(zip(cut.query_index.tolist(), cut.labels.tolist())) == [(2, 1), (0, 0), (0, 1)]
    # top_k is taken before the threshold: the 2 best pairs, then only those above 0.8
    high = postprocess(outputs, [(10, 10)], names, 0.8, PostprocessRule.sigmoid_topk(top_k=2))[0]
    assert high.query_index.tolist() == [2] and high.labels.tolist() == [1]
    none = postprocess(outputs, [(10, 10)], names, 0.95, PostprocessRule.sigmoid_topk())[0]
    assert len(none) == 0 and none.boxes.shape == (0, 4) and none.class_names == []


def test_sigmoid_topk_has_no_no_object_class() -> None:
    from detection.models.contract import PostprocessRule

    logits = torch.zeros(1, 2, 3)
    boxes = torch.full((1, 2, 4), 0.5)
    with pytest.raises(ValueError, match="2 class names for 3 classes$"):
        postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(4, 4)], ["a", "b"], 0.1,
                    PostprocessRule.sigmoid_topk())
    with pytest.raises(ValueError, match="top_k"):
        PostprocessRule.sigmoid_topk(top_k=0)


def test_explicit_softmax_rule_is_the_default() -> None:
    from detection.models.contract import PostprocessRule

    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 6, 4) * 3, "pred_boxes": torch.rand(2, 6, 4)}
    sizes = [(30, 40), (50, 20)]
    default = postprocess(outputs, sizes, ["a", "b", "c"], 0.2)
    explicit = postprocess(outputs, sizes, ["a", "b", "c"], 0.2, PostprocessRule.softmax_no_object())
    for a, b in zip(default, explicit):
        for name in ("boxes", "scores", "labels", "query_index"):
            assert torch.equal(a.get(name), b.get(name))
        assert a.class_names == b.class_names
