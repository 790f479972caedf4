"""Floors and the ceiling (`attention.floors`) on hand-made cases, their place in eval's accumulator
(every metric, per category, bootstrap intervals) and the seeded tie order of deletion / insertion."""
from __future__ import annotations

import numpy as np
import pytest

from detection.attention import floors as F
from detection.attention.maps import cells_to_image, image_to_cells
from detection.attention.metrics import FaithfulnessAccumulator
from detection.attention.perturbation import perturbation_curve, saliency_order
from tests.test_evaluate_model import confident_model_setup, _run


def _dataset(size, objects):
    """objects: (category, [x, y, w, h], polygon or None) -> COCO dict of one image."""
    height, width = size
    annotations = []
    for k, (category, bbox, polygon) in enumerate(objects):
        x, y, w, h = bbox
        annotations.append({"id": k + 1, "image_id": 1, "category_id": category, "bbox": bbox, "area": w * h,
                            "iscrowd": 0, "segmentation": [polygon or [x, y, x + w, y, x + w, y + h, x, y + h]]})
    return {"images": [{"id": 1, "width": width, "height": height, "file_name": "a.png"}],
            "annotations": annotations, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_uniform_in_a_filled_box_has_mask_ap_one_and_the_box_family_is_what_it_says():
    size = (60, 80)
    dataset = _dataset(size, [(1, [10, 20, 30, 20], None)])
    box = np.array([[10, 20, 40, 40]], float)
    settings = F.FloorSettings(floors=F.FLOORS[:3] + (F.BEST_BOX_ONLY,), best_box_only="box-border")
    acc = FaithfulnessAccumulator([], floor_settings=settings)
    acc.add_image(1, size, box, [0.9], [1], {}, dataset["annotations"])
    summary = acc.summarize(dataset, [1], [1])
    assert summary[F.UNIFORM_BOX]["mask_ap"] == pytest.approx(1.0)
    assert summary[F.UNIFORM_BOX]["energy_pointing_game"] == pytest.approx(1.0)
    assert summary[F.GAUSSIAN_BASELINE]["pointing_game"] == 1.0
    # the border band: no mass in the middle fifth-inset box, all of it inside the box
    band = F.BOX_FAMILY["box-border"](box[0], size)
    assert band[30, 25] == 0 and band[20, 10] == 1 and band[39, 39] == 1 and band[:, :10].sum() == 0
    hollow = F.BOX_FAMILY["box-minus-centre"](box[0], size)
    assert hollow[30, 25] == 0 and hollow[20, 10] == 1 and hollow.sum() < band.size
    np.testing.assert_array_equal(F.floor_maps(settings, 1, box, size, [None], None)[F.BEST_BOX_ONLY][0], band)


def test_a_random_map_points_into_the_box_as_often_as_the_box_covers_the_image():
    size = (40, 40)
    dataset = _dataset(size, [(1, [0, 0, 20, 20], None)])  # a quarter of the image
    acc = FaithfulnessAccumulator([], floor_settings=F.FloorSettings(floors=(F.RANDOM_MAP,)))
    for image_id in range(400):  # a fresh seeded map per image id
        acc.add_image(image_id, size, np.array([[0, 0, 20, 20]], float), [0.9], [1], {}, dataset["annotations"])
    pointing = np.mean(acc.pointing[F.RANDOM_MAP])
    assert abs(pointing - 0.25) < 3 * np.sqrt(0.25 * 0.75 / 400)
    assert np.mean(acc.energy[F.RANDOM_MAP]) == pytest.approx(0.25, abs=0.01)
    first = F.floor_maps(F.FloorSettings(floors=(F.RANDOM_MAP,)), 7, np.zeros((2, 4)), size, [None] * 2, None)
    again = F.floor_maps(F.FloorSettings(floors=(F.RANDOM_MAP,)), 7, np.zeros((2, 4)), size, [None] * 2, None)
    np.testing.assert_array_equal(first[F.RANDOM_MAP], again[F.RANDOM_MAP])
    assert not np.array_equal(first[F.RANDOM_MAP][0], first[F.RANDOM_MAP][1])


def test_image_to_cells_inverts_cells_to_image_and_the_ceiling_is_the_mask_on_the_grid():
    rng = np.random.default_rng(0)
    cells = rng.random((2, 5, 7)).astype(np.float32)
    # input 80 x 112 at stride 16 -> 5 x 7 cells; original image 100 x 140
    image = cells_to_image(cells, 16, (80, 112), (100, 140), "nearest")
    np.testing.assert_allclose(image_to_cells(image, 16, (80, 112), (5, 7)), cells, rtol=1e-6)
    # a GT mask made of whole cells: the ceiling's Otsu mask is the mask up to the bilinear upsampling
    size = (100, 140)
    x0, y0, x1, y1 = 40, 20, 100, 80  # cells 2..4 x 1..3 at 1.25 px per input px
    polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
    dataset = _dataset(size, [(1, [x0, y0, x1 - x0, y1 - y0], polygon)])
    grid = F.CellGrid(16, (80, 112), (5, 7))
    acc = FaithfulnessAccumulator([], floor_settings=F.FloorSettings(floors=(F.CEILING,)))
    _, floors = acc.score_image(1, size, np.array([[x0, y0, x1, y1], [0, 0, 10, 10]], float), [0.9, 0.8], [1, 2], {},
                                dataset["annotations"], grid)
    ceiling = floors[F.CEILING]
    assert ceiling[1].max() == 0  # unmatched: nothing to reach
    assert ceiling[0, 50, 70] == pytest.approx(1.0) and ceiling[0, 5, 5] == pytest.approx(0.0)
    row = acc.summarize(dataset, [1], [1])[F.CEILING]
    assert row["mask_ap50"] == pytest.approx(1.0) and 0.9 < row["mask_ap"] < 1.0
    with pytest.raises(KeyError, match="cell grid"):
        acc.add_image(1, size, np.array([[x0, y0, x1, y1]], float), [0.9], [1], {}, dataset["annotations"])


def test_per_category_rows_bootstrap_intervals_and_sharding():
    size = (40, 40)
    dataset = _dataset(size, [(1, [0, 0, 20, 20], None), (2, [20, 20, 20, 20], None)])
    boxes = np.array([[0, 0, 20, 20], [20, 20, 40, 40]], float)
    inside = np.zeros((2, *size), np.float32)
    inside[0, :20, :20] = 1
    inside[1, 5, 5] = 1  # the second detection points outside its object

    def accumulate(image_ids):
        acc = FaithfulnessAccumulator(["inside"], floor_settings=F.FloorSettings(floors=F.FLOORS[:3]))
        for image_id in image_ids:
            acc.add_image(image_id, size, boxes, [0.9, 0.8], [1, 2], {"inside": inside}, dataset["annotations"])
            for j in range(2):
                acc.add_curve("inside", "deletion", 0.1 * (j + 1), image_id, j + 1)
        return acc

    acc = accumulate([1])
    summary = acc.summarize(dataset, [1], [1, 2], per_category=True, bootstrap=50)
    row = summary["inside"]
    assert row["pointing_game"] == 0.5
    assert row["per_category"][1]["pointing_game"] == 1.0 and row["per_category"][2]["pointing_game"] == 0.0
    assert row["per_category"][1]["deletion_auc"] == pytest.approx(0.1)
    assert row["per_category"][2]["num_matched"] == 1
    # one image: every resample is that image, the interval is the mean itself
    assert row["ci95"]["pointing_game"] == [0.5, 0.5]
    assert row["ci95"]["deletion_auc"] == pytest.approx([0.15, 0.15])
    assert list(summary) == ["inside", F.GAUSSIAN_BASELINE, F.UNIFORM_BOX, F.RANDOM_MAP]
    # shards merged into a bare accumulator (as eval's writer does) give the same summary
    merged = FaithfulnessAccumulator(["inside"])
    merged.merge(accumulate([1]).state())
    assert merged.summarize(dataset, [1], [1, 2], per_category=True, bootstrap=50) == summary


def test_best_box_only_choice_and_floor_options():
    rows = {"box-gauss-0.1": {"mask_ap": 0.3, "deletion_auc": 0.2}, "box-uniform": {"mask_ap": 0.5, "deletion_auc": 0.3},
            "raw": {"mask_ap": 0.9, "deletion_auc": 0.01}}
    assert F.best_box_only_choice(rows, "mask_ap") == "box-uniform"
    assert F.best_box_only_choice(rows, "deletion_auc") == "box-gauss-0.1"  # lower is better
    assert F.parse_floors("all") == F.FLOORS
    assert F.parse_floors("gaussian,box-family")[1:] == tuple(F.BOX_FAMILY)
    assert F.parse_floors(None) == (F.GAUSSIAN_BASELINE,)
    with pytest.raises(ValueError, match="unknown floor"):
        F.parse_floors("gaussian,moon")
    with pytest.raises(ValueError, match="best-box-only"):
        F.FloorSettings(floors=(F.BEST_BOX_ONLY,))


def test_ties_in_the_deletion_order_follow_a_seeded_random_order():
    flat = np.ones((8, 8))
    order = saliency_order(flat, tie_seed=3)
    assert sorted(order.tolist()) == list(range(64)) and order.tolist() != list(range(64))
    np.testing.assert_array_equal(order, saliency_order(flat, tie_seed=3))
    two_level = np.zeros((8, 8))
    two_level[2:4, 2:6] = 1
    assert set(saliency_order(two_level)[:8].tolist()) == set(np.flatnonzero(two_level).tolist())
    # a flat map deletes its pixels in random order: the top rows do not go first
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4] = 255
    curve = perturbation_curve(image, flat, lambda batch: batch[:, :4].mean(axis=(1, 2, 3)) / 255, "deletion", steps=4)
    assert curve.scores[1] > 0.6  # raster order would have removed the whole top half: 0.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return confident_model_setup(tmp_path_factory.mktemp("floors"))


def test_eval_scores_every_floor_per_category_with_intervals(setup, tmp_path):
    root, ann = setup
    metrics = _run(root, ann, tmp_path / "run", "--first", "2", "--attention-threshold", "0.3", "--layers", "last",
                   "--heads", "mean", "--floors", "all,box-family", "--best-box-only", "box-gauss-0.5",
                   "--per-category", "--bootstrap", "20", "--deletion-insertion", "--di-steps", "2",
                   "--di-max-detections", "1")
    attention = metrics["attention"]
    assert list(attention) == ["last/mean", *F.FLOORS, *F.BOX_FAMILY]
    for row in attention.values():
        assert row["deletion_auc"] is not None and set(row["per_category"]) == {"1", "2", "3"}  # JSON keys
        assert "pointing_game" in row["ci95"]
    assert attention[F.CEILING]["energy_pointing_game"] >= attention[F.RANDOM_MAP]["energy_pointing_game"]
    assert metrics["best_box_only"]["mask_ap"] in F.BOX_FAMILY
    markdown = (tmp_path / "run" / "metrics.md").read_text()
    assert "| gt-mask-ceiling |" in markdown and "per category" in markdown and "Best box-only map" in markdown


def test_class_agnostic_maps_match_by_iou_and_score_under_the_objects_category():
    size = (60, 80)
    dataset = _dataset(size, [(1, [10, 20, 30, 20], None)])
    box = np.array([[10, 20, 40, 40]], float)
    settings = F.FloorSettings(floors=(F.UNIFORM_BOX,))
    aware = FaithfulnessAccumulator([], floor_settings=settings)
    assert aware.add_image(1, size, box, [0.9], [2], {}, dataset["annotations"])[0] == -1  # another class
    agnostic = FaithfulnessAccumulator([], floor_settings=settings, class_agnostic=True)
    assert agnostic.add_image(1, size, box, [0.9], [2], {}, dataset["annotations"])[0] == 0
    assert agnostic.matched_keys == [[1, 1]] and agnostic.masks[F.UNIFORM_BOX][0]["category_id"] == 1
    assert agnostic.summarize(dataset, [1], [1, 2])[F.UNIFORM_BOX]["mask_ap"] == pytest.approx(1.0)
    assert aware.summarize(dataset, [1], [1, 2])[F.UNIFORM_BOX]["mask_ap"] == 0.0
