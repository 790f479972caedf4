"""Faithfulness metrics on hand-made maps with known answers."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detection.attention import metrics as M
from detection.attention.matching import annotation_region, box_mask, match_detections
from detection.attention.perturbation import perturbation_curve


def _gt_dataset(size=(60, 80), objects=()):
    """COCO dict with one image; objects: (category_id, [x, y, w, h], segmentation|None)."""
    height, width = size
    annotations = []
    for k, (cat, bbox, seg) in enumerate(objects, start=1):
        ann = {"id": k, "image_id": 1, "category_id": cat, "bbox": list(bbox), "area": bbox[2] * bbox[3], "iscrowd": 0}
        if seg is not None:
            ann["segmentation"] = seg
        annotations.append(ann)
    return {
        "images": [{"id": 1, "width": width, "height": height, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}],
        "annotations": annotations,
    }


def test_box_mask_pixel_centres():
    region = box_mask((2, 1, 5, 3), (6, 8))
    expected = np.zeros((6, 8), bool)
    expected[1:3, 2:5] = True  # centres 1.5, 2.5 in y; 2.5, 3.5, 4.5 in x
    np.testing.assert_array_equal(region, expected)
    # a sliver with no pixel centre keeps the pixel under its centre
    sliver = box_mask((3.1, 2.1, 3.3, 2.2), (6, 8))
    assert sliver.sum() == 1 and sliver[2, 3]


def test_pointing_game_delta_inside_and_outside():
    region = box_mask((10, 10, 30, 20), (40, 50))
    delta = np.zeros((40, 50), np.float32)
    delta[15, 20] = 1.0
    assert M.pointing_game(delta, region) == 1.0
    outside = np.zeros((40, 50), np.float32)
    outside[35, 45] = 1.0
    assert M.pointing_game(outside, region) == 0.0
    # flat map points nowhere
    assert M.pointing_game(np.ones((40, 50)), region) == 0.0
    # 3 px from the box edge: a miss, a hit with tolerance 3
    near = np.zeros((40, 50), np.float32)
    near[15, 32] = 1.0  # pixel centre x = 32.5, box edge at 30
    assert M.pointing_game(near, region) == 0.0
    assert M.pointing_game(near, region, tolerance=3) == 1.0


def test_pointing_game_plateau_majority():
    region = np.zeros((10, 10), bool)
    region[:, :5] = True
    plateau = np.zeros((10, 10))
    plateau[0, 3:6] = 1.0  # two maximal pixels inside, one outside
    assert M.pointing_game(plateau, region) == 1.0
    plateau[0, 6:8] = 1.0  # now 2 inside, 3 outside
    assert M.pointing_game(plateau, region) == 0.0


def test_energy_uniform_map_equals_area_ratio():
    size = (40, 50)
    region = box_mask((10, 10, 30, 20), size)
    assert M.energy_pointing_game(np.full(size, 0.3), region) == pytest.approx(region.sum() / (40 * 50))
    assert region.sum() == 20 * 10


def test_energy_concentrated_and_negative_parts():
    size = (20, 20)
    region = box_mask((0, 0, 10, 10), size)
    saliency = np.zeros(size)
    saliency[:10, :10] = 3.0
    saliency[15, 15] = 100.0
    assert M.energy_pointing_game(saliency, region) == pytest.approx(300 / 400)
    # negative values are clipped, not subtracted
    saliency[18, 18] = -1000.0
    assert M.energy_pointing_game(saliency, region) == pytest.approx(300 / 400)
    assert M.energy_pointing_game(np.zeros(size), region) == 0.0


def test_otsu_recovers_two_level_region_and_mask_ap_is_one():
    size = (60, 80)
    region = np.zeros(size, bool)
    region[12:40, 20:61] = True
    # noisy two-level map: Otsu must put the threshold between the levels
    rng = np.random.default_rng(0)
    saliency = np.where(region, 0.8, 0.1) + rng.uniform(0, 0.05, size)
    mask = M.explanation_mask(saliency)
    np.testing.assert_array_equal(mask, region)
    gt_rle = M.encode_mask(region)
    dataset = _gt_dataset(size, [(1, [20, 12, 41, 28], gt_rle)])
    result = [{"image_id": 1, "category_id": 1, "segmentation": M.encode_mask(mask), "score": 0.9}]
    scores = M.mask_ap(dataset, result, [1], [1, 2])
    assert scores["mask_ap"] == pytest.approx(1.0)
    assert scores["mask_ap_standard"] == pytest.approx(1.0)
    # category 2 has no GT: COCO leaves it out of the mean (-1), it does not count as 0


def test_mask_ap_of_half_overlapping_mask():
    size = (40, 40)
    region = np.zeros(size, bool)
    region[0:20, 0:20] = True
    shifted = np.zeros(size, bool)
    shifted[0:20, 10:30] = True  # IoU = 200 / 600 = 1/3
    dataset = _gt_dataset(size, [(1, [0, 0, 20, 20], M.encode_mask(region))])
    result = [{"image_id": 1, "category_id": 1, "segmentation": M.encode_mask(shifted), "score": 0.5}]
    scores = M.mask_ap(dataset, result, [1], [1])
    # matched at IoU thresholds 0.2, 0.25, 0.3 (3 of 16) with precision 1 -> AP 3/16
    assert scores["mask_ap"] == pytest.approx(3 / 16)
    assert scores["mask_ap_standard"] == 0.0
    assert scores["mask_ap50"] == 0.0


def test_mask_ap_empty_results_and_box_only_gt():
    dataset = _gt_dataset((30, 30), [(1, [5, 5, 10, 10], None)])
    assert M.mask_ap(dataset, [], [1], [1]) == {"mask_ap": 0.0, "mask_ap_standard": 0.0, "mask_ap50": 0.0}
    # GT without segmentation: the box is the mask, so a box-shaped explanation scores 1
    exact = [{"image_id": 1, "category_id": 1, "segmentation": M.encode_mask(box_mask((5, 5, 15, 15), (30, 30))), "score": 1.0}]
    assert M.mask_ap(dataset, exact, [1], [1])["mask_ap"] == pytest.approx(1.0)
    # no GT in the evaluated categories: -1 (COCO's "undefined")
    assert M.mask_ap(dataset, exact, [1], [2])["mask_ap"] == -1.0


def test_explanation_mask_flat_map_is_empty():
    assert not M.explanation_mask(np.full((5, 5), 2.0)).any()


def test_encode_mask_round_trip():
    rng = np.random.default_rng(1)
    mask = rng.uniform(size=(13, 17)) > 0.5
    rle = M.encode_mask(mask)
    assert isinstance(rle["counts"], str)
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_annotation_region_polygon_and_box():
    ann = {"bbox": [2, 2, 4, 4], "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}
    polygon = annotation_region(ann, (10, 10))
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 10, 10))).astype(bool)
    np.testing.assert_array_equal(polygon, expected)
    box_only = annotation_region({"bbox": [2, 2, 4, 4]}, (10, 10))
    np.testing.assert_array_equal(box_only, box_mask((2, 2, 6, 6), (10, 10)))


def test_gaussian_baseline_peaks_at_box_centre_and_is_zero_outside():
    gauss = M.gaussian_box_map((10, 20, 30, 40), (50, 60), sigma_fraction=0.25)
    assert gauss.dtype == np.float32
    y, x = np.unravel_index(np.argmax(gauss), gauss.shape)
    assert (y, x) in {(29, 19), (29, 20), (30, 19), (30, 20)}
    assert gauss[~box_mask((10, 20, 30, 40), (50, 60))].max() == 0.0
    # one sigma (5 px) right of the centre: exp(-1/2) of the peak value at that row
    centre_row = gauss[29]
    assert centre_row[24] / centre_row[19] == pytest.approx(np.exp(-0.5 * ((24.5 - 20) / 5) ** 2) / np.exp(-0.5 * ((19.5 - 20) / 5) ** 2), rel=1e-5)


def test_match_detections_greedy_by_score_same_class():
    gt_boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], float)
    gt_cats = np.array([1, 1, 2])
    det_boxes = np.array(
        [
            [0, 0, 10, 10],  # low score, perfect box for GT 0
            [1, 1, 10, 10],  # high score, also overlaps GT 0 -> takes it first
            [20, 20, 30, 30],  # class 2: must not match GT 1 (class 1)
            [0, 0, 10, 10],  # class 2 -> GT 2
        ],
        float,
    )
    scores = np.array([0.3, 0.9, 0.8, 0.5])
    cats = np.array([1, 1, 2, 2])
    matched = match_detections(det_boxes, scores, cats, gt_boxes, gt_cats)
    np.testing.assert_array_equal(matched, [-1, 0, -1, 2])
    # crowd GT is never matched; IoU below the threshold is not a match
    matched = match_detections(det_boxes[:1], scores[:1], cats[:1], gt_boxes[:1], gt_cats[:1], np.array([True]))
    np.testing.assert_array_equal(matched, [-1])
    far = np.array([[5, 5, 15, 15]], float)  # IoU with GT 0 = 25/175
    assert match_detections(far, [1.0], [1], gt_boxes, gt_cats)[0] == -1


def _box_score_fn(region):
    """Toy detector: score = mean brightness inside the object region / 255."""

    def score(batch):
        return batch[:, region].mean(axis=(1, 2)) / 255.0

    return score


def test_deletion_and_insertion_closed_form():
    size = (20, 20)
    region = np.zeros(size, bool)
    region[5:10, 5:10] = True  # area fraction a = 25 / 400
    image = np.where(region[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    a = region.mean()
    fill = np.round(255 * a) / 255  # mean-colour substrate, as a score
    good = region.astype(np.float64) + np.linspace(0, 1e-3, 400).reshape(size)  # region first
    deletion = perturbation_curve(image, good, _box_score_fn(region), "deletion", steps=16, batch_size=5)
    insertion = perturbation_curve(image, good, _box_score_fn(region), "insertion", steps=16, batch_size=5)
    # steps of 1/16 = 25 pixels: the whole region is removed / inserted after the first step
    np.testing.assert_allclose(deletion.scores, [1.0] + [fill] * 16)
    np.testing.assert_allclose(insertion.scores, [fill] + [1.0] * 16)
    step = 1 / 16
    assert deletion.auc == pytest.approx(step * (1 + fill) / 2 + fill * (1 - step))
    assert insertion.auc == pytest.approx(step * (1 + fill) / 2 + 1.0 * (1 - step))
    # a map that ranks the object last deletes it last: worse (higher) deletion AUC
    bad = 1.0 - good
    assert perturbation_curve(image, bad, _box_score_fn(region), "deletion", steps=16).auc > deletion.auc + 0.5


def test_perturbation_curve_blur_and_errors():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    curve = perturbation_curve(image, rng.uniform(size=(16, 16)), lambda b: b.mean(axis=(1, 2, 3)), "insertion", steps=4, substrate="blur")
    assert curve.scores[-1] == pytest.approx(image.mean())
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(image, np.zeros((16, 16)), lambda b: b[:, 0, 0, 0], "sideways")
    with pytest.raises(ValueError, match="does not match"):
        perturbation_curve(image, np.zeros((8, 8)), lambda b: b[:, 0, 0, 0])


def test_accumulator_hand_made_image():
    size = (40, 40)
    dataset = _gt_dataset(size, [(1, [0, 0, 20, 20], None), (2, [20, 20, 20, 20], None)])
    det_boxes = np.array([[0, 0, 20, 20], [20, 20, 40, 40], [0, 20, 10, 30]], float)
    scores = np.array([0.9, 0.8, 0.7])
    cats = np.array([1, 2, 1])  # third detection matches nothing
    inside = np.zeros((3, *size), np.float32)
    inside[0, :20, :20] = 1.0
    inside[0, 5, 5] = 2.0
    inside[1, 20:, 20:] = 1.0
    inside[1, 30, 30] = 2.0
    uniform = np.ones((3, *size), np.float32)
    acc = M.FaithfulnessAccumulator(choices=["inside", "uniform"])
    matched = acc.add_image(1, size, det_boxes, scores, cats, {"inside": inside, "uniform": uniform}, dataset["annotations"])
    np.testing.assert_array_equal(matched, [0, 1, -1])
    summary = acc.summarize(dataset, [1], [1, 2])
    assert summary["inside"]["pointing_game"] == 1.0
    assert summary["inside"]["energy_pointing_game"] == pytest.approx(1.0)
    assert summary["uniform"]["pointing_game"] == 0.0
    assert summary["uniform"]["energy_pointing_game"] == pytest.approx(0.25)
    assert summary[M.GAUSSIAN_BASELINE]["pointing_game"] == 1.0
    assert summary["inside"]["mask_ap"] == pytest.approx(1.0)  # Otsu gives the box exactly
    assert summary["uniform"]["mask_ap"] == 0.0
    assert summary["inside"]["num_matched"] == 2 and summary["inside"]["num_detections"] == 3
    assert summary["inside"]["deletion_auc"] is None
    # sharding: two half accumulators merged equal the whole
    merged = M.FaithfulnessAccumulator(choices=["inside", "uniform"])
    for k in range(3):
        part = M.FaithfulnessAccumulator(choices=["inside", "uniform"])
        part.add_image(1, size, det_boxes[k : k + 1], scores[k : k + 1], cats[k : k + 1], {"inside": inside[k : k + 1], "uniform": uniform[k : k + 1]}, dataset["annotations"])
        merged.merge(part.state())
    assert merged.summarize(dataset, [1], [1, 2]) == summary


def test_mask_ap_lives_in_its_own_module_and_metrics_uses_that_one():
    from detection.attention import mask_ap as mask_ap_module

    assert M.mask_ap is mask_ap_module.mask_ap
    assert mask_ap_module.EXPLANATION_IOU_THRESHOLDS[0] == pytest.approx(0.2)
    assert len(mask_ap_module.EXPLANATION_IOU_THRESHOLDS) == 16
