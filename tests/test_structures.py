import numpy as np
import pytest
import torch

from detection.structures import Detections


def _dets():
    return Detections(
        (100, 200),
        boxes=torch.tensor([[0, 0, 10, 10], [5, 5, 50, 60], [1, 2, 3, 4]], dtype=torch.float64),
        scores=torch.tensor([0.9, 0.5, 0.8]),
        labels=torch.tensor([1, 2, 1]),
        query_index=torch.tensor([7, 3, 42]),
        class_names=["cat", "dog", "cat"],
        maps=np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5),
    )


def test_boxes_are_float32_n_by_4_and_empty_reshaped():
    det = _dets()
    assert det.boxes.dtype == torch.float32 and det.boxes.shape == (3, 4)
    empty = Detections((10, 10), boxes=[])
    assert empty.boxes.shape == (0, 4) and len(empty) == 0


def test_mask_indexing_applies_to_every_field():
    det = _dets()
    kept = det[det.scores > 0.7]
    assert len(kept) == 2
    assert kept.query_index.tolist() == [7, 42]
    assert kept.class_names == ["cat", "cat"]
    np.testing.assert_array_equal(kept.maps, det.maps[[0, 2]])
    assert kept.image_size == (100, 200)


def test_int_and_order_indexing():
    det = _dets()
    one = det[-1]
    assert len(one) == 1 and one.query_index.tolist() == [42] and one.class_names == ["cat"]
    order = torch.argsort(det.scores, descending=True)
    assert det[order].query_index.tolist() == [7, 42, 3]
    with pytest.raises(IndexError):
        det[3]


def test_length_mismatch_is_refused():
    det = _dets()
    with pytest.raises(ValueError, match="length 2"):
        det.scores = torch.zeros(2)


def test_empty_factory_has_standard_fields():
    det = Detections.empty((5, 6))
    assert len(det) == 0 and det.has("query_index") and det.labels.dtype == torch.int64
