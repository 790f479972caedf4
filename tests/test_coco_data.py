"""COCO dataset: label map, crowd / degenerate / broken entries, targets, collate."""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch

from detection.data.coco import CocoDetection, LabelMap, collate, load_coco
from detection.data.transforms import EvalTransform, TrainTransform, AugmentConfig


def _write_dataset(root):
    """3 images (one without annotations, one broken file), non-contiguous category ids."""
    (root / "img").mkdir(parents=True)
    for name, (h, w) in {"a.png": (40, 60), "b.png": (50, 30)}.items():
        cv2.imwrite(str(root / "img" / name), np.full((h, w, 3), 128, np.uint8))
    (root / "img" / "broken.png").write_bytes(b"")  # zero bytes
    coco = {
        "images": [{"id": 10, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 11, "file_name": "b.png", "height": 50, "width": 30},
                   {"id": 12, "file_name": "broken.png", "height": 20, "width": 20}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 11, "name": "owl"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [6, 4, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 11, "bbox": [50, 30, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1},
            {"id": 4, "image_id": 10, "category_id": 3, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},
            {"id": 5, "image_id": 10, "category_id": 99, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 6, "image_id": 10, "category_id": 3, "bbox": [1, 1, "x", 5], "area": 25, "iscrowd": 0},
            {"id": 7, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 8, "image_id": 12, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
        ],
    }
    (root / "ann.json").write_text(json.dumps(coco))
    return root / "img", root / "ann.json"


def test_label_map_is_sorted_by_category_id(tmp_path):
    _, ann = _write_dataset(tmp_path)
    label_map = LabelMap.from_coco(load_coco(ann))
    assert label_map.category_ids == (3, 7, 11)
    assert label_map.class_names == ("dog", "cat", "owl")
    assert label_map.label(7) == 1 and label_map.label(5) is None and label_map.category_id(2) == 11
    with pytest.raises(ValueError, match="duplicate"):
        LabelMap((1, 1), ("a", "b"))


def test_targets_and_skipped_entries(tmp_path, caplog):
    images, ann = _write_dataset(tmp_path)
    with caplog.at_level(logging.INFO):
        dataset = CocoDetection(images, ann)
    log = caplog.text
    assert "annotation id 5" in log and "category_id 99" in log
    assert "annotation id 6" in log and "bbox" in log
    assert "annotation id 7" in log and "image_id 99" in log
    assert "dropped 1 degenerate" in log and dataset.num_degenerate == 1 and dataset.num_crowd == 1
    image, target = dataset[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32
    assert target["image_id"] == 10
    assert target["labels"].tolist() == [1, 2]  # cat -> 1, owl -> 2; crowd (dog) not a target
    assert target["ann_ids"].tolist() == [1, 2]
    # box 2 [50, 30, 20, 20] is clipped to the image (x1 = 60, y1 = 40) -> [50, 30, 10, 10]
    expected = torch.tensor([[(6 + 15) / 60, (4 + 10) / 40, 30 / 60, 20 / 40],
                             [55 / 60, 35 / 40, 10 / 60, 10 / 40]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["orig_size"].tolist() == [40, 60] and target["size"].tolist() == [40, 60]
    _, empty = dataset[1]
    assert empty["image_id"] == 11 and empty["boxes"].shape == (0, 4) and empty["labels"].numel() == 0


def test_broken_image_is_reported_and_replaced(tmp_path, caplog):
    images, ann = _write_dataset(tmp_path)
    dataset = CocoDetection(images, ann)
    with caplog.at_level(logging.ERROR):
        _, target = dataset[2]  # broken.png -> replaced by the next readable image (wraps to 10)
    assert "broken.png" in caplog.text and "image id 12" in caplog.text
    assert target["image_id"] == 10 and dataset.bad_images == {12}
    assert (images / "broken.png").read_bytes() == b""  # data on disk untouched


def test_size_mismatch_with_annotation_file_is_reported(tmp_path, caplog):
    images, ann = _write_dataset(tmp_path)
    cv2.imwrite(str(images / "b.png"), np.zeros((30, 50, 3), np.uint8))  # rotated vs the json
    dataset = CocoDetection(images, ann)
    with caplog.at_level(logging.ERROR):
        _, target = dataset[1]
    assert "b.png" in caplog.text and "differs" in caplog.text and target["image_id"] != 11


def test_eval_transform_targets_are_size_invariant_and_collate_pads(tmp_path):
    images, ann = _write_dataset(tmp_path)
    plain = CocoDetection(images, ann)
    resized = CocoDetection(images, ann, transform=EvalTransform(80, 100))
    img0, t0 = resized[0]
    assert img0.shape == (3, 67, 100)  # shorter side 80 would make the longer 120 > 100
    torch.testing.assert_close(t0["boxes"], plain[0][1]["boxes"], atol=2e-2, rtol=0)
    batch, mask, targets = collate([resized[0], resized[1]])
    assert batch.shape == (2, 3, 100, 100)  # (67, 100) and (100, 60)
    assert not mask[0, :67].any() and mask[0, 67:].all()
    assert [t["image_id"] for t in targets] == [10, 11]


def test_training_samples_depend_only_on_seed_epoch_index(tmp_path):
    images, ann = _write_dataset(tmp_path)
    transform = TrainTransform(AugmentConfig(scales=[30, 40, 50], max_size=80))
    a = CocoDetection(images, ann, transform=transform, seed=5)
    b = CocoDetection(images, ann, transform=transform, seed=5)
    b.set_epoch(1)
    b.set_epoch(0)
    assert torch.equal(a[0][0], b[0][0])
    outputs = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        outputs.add((tuple(a[0][0].shape), float(a[0][0].sum())))
    assert len(outputs) > 1


def _target(boxes, labels, size, seed):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "ann_ids": torch.arange(len(labels)), "size": torch.tensor(size), "seed": seed}


def test_crop_to_common_size_leaves_no_padding_and_keeps_boxes_on_their_pixels():
    from detection.data.coco import TrainCollate, crop_to_common_size

    # image 0: 40 x 60 with a bright square at x 24..36, y 16..24 (cxcywh 0.5, 0.5, 0.2, 0.2)
    # and a box at the right edge (x 54..60) that any crop narrower than 54 px loses
    image0 = torch.zeros(3, 40, 60)
    image0[:, 16:24, 24:36] = 1.0
    t0 = _target([[0.5, 0.5, 0.2, 0.2], [0.95, 0.5, 0.1, 0.2]], [0, 1], [40, 60], seed=5)
    t1 = _target([], [], [50, 30], seed=6)
    cropped = crop_to_common_size([(image0, t0), (torch.zeros(3, 50, 30), t1)], min_visibility=0.3)
    assert [tuple(im.shape) for im, _ in cropped] == [(3, 40, 30), (3, 40, 30)]
    (image, target), (_, empty) = cropped
    assert target["labels"].tolist() == [0] and target["ann_ids"].tolist() == [0]
    assert target["size"].tolist() == [40, 30] and empty["boxes"].shape == (0, 4)
    # the kept box still frames the bright pixels of the crop
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    cx, cy, w, h = (target["boxes"][0] * torch.tensor([30, 40, 30, 40])).tolist()
    assert (xs.min().item(), xs.max().item() + 1) == pytest.approx((cx - w / 2, cx + w / 2), abs=1e-4)
    assert (ys.min().item(), ys.max().item() + 1) == pytest.approx((cy - h / 2, cy + h / 2), abs=1e-4)

    batch, mask, _ = TrainCollate(common_crop_p=1.0)([(image0, t0), (torch.zeros(3, 50, 30), t1)])
    assert batch.shape == (2, 3, 40, 30) and not mask.any()
    batch, mask, _ = TrainCollate(common_crop_p=0.0)([(image0, t0), (torch.zeros(3, 50, 30), t1)])
    assert batch.shape == (2, 3, 50, 60) and mask.any()


# -- the one COCO ground-truth loader (training reads it non-strict, evaluation strict) -----
def test_dataset_and_evaluation_read_through_the_one_loader(tmp_path):
    from detection.data.ground_truth import load_coco_gt

    images, ann = _write_dataset(tmp_path)
    assert CocoDetection(images, ann).coco.dataset == load_coco_gt(ann, strict=False) == json.loads(ann.read_text())
    # what training skips one annotation at a time, evaluation refuses for the whole file
    with pytest.raises(ValueError, match="ann.json: annotation 5 refers to unknown category_id 99"):
        load_coco_gt(ann)


@pytest.mark.parametrize("mutate, field", [
    (lambda g: g["annotations"][0].pop("image_id"), r"annotations\[0\] has no 'image_id' field"),
    (lambda g: g["annotations"][1].pop("category_id"), r"annotations\[1\] has no 'category_id' field"),
    (lambda g: g["categories"][0].pop("name"), "'name'"),
    (lambda g: g["images"][0].update(id="10"), "integer 'id'"),
    (lambda g: g.pop("images"), "missing list 'images'"),
])
def test_malformed_file_names_the_file_and_the_field(tmp_path, mutate, field):
    from detection.data.ground_truth import GroundTruthError, load_coco_gt

    images, ann = _write_dataset(tmp_path)
    broken = json.loads(ann.read_text())
    mutate(broken)
    path = tmp_path / "malformed.json"
    path.write_text(json.dumps(broken))
    for strict in (False, True):
        with pytest.raises(GroundTruthError, match=field) as info:
            load_coco_gt(path, strict=strict)
        assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(ValueError, match=field):
        CocoDetection(images, path)


def test_strict_loading_names_the_evaluation_field(tmp_path):
    from detection.data.ground_truth import GroundTruthError, load_coco_gt

    _, ann = _write_dataset(tmp_path)
    broken = json.loads(ann.read_text())
    broken["annotations"] = broken["annotations"][:2]
    broken["annotations"][1].pop("area")
    broken["images"][1].pop("width")
    path = tmp_path / "no_area.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(GroundTruthError, match=r"no_area.json: image 11 needs integer 'width'"):
        load_coco_gt(path)
    broken["images"][1]["width"] = 30
    path.write_text(json.dumps(broken))
    with pytest.raises(GroundTruthError, match=r"no_area.json: annotation 2 has no 'area' field"):
        load_coco_gt(path)
    assert len(load_coco(path).dataset["annotations"]) == 2  # training does not need `area`
    with pytest.raises(GroundTruthError, match="missing.json: annotation file not found"):
        load_coco_gt(tmp_path / "missing.json", strict=False)
