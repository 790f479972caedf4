"""`detr-attn eval --detections`: exact parity with pycocotools, subsets, pitfalls, outputs."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.cli import main
from detection.data.ground_truth import GroundTruthError, load_coco_gt
from detection.evaluation.bbox import BBOX_STAT_NAMES, evaluate_bbox
from detection.evaluation.classes import ClassMappingError, map_classes
from detection.evaluation.results import EvaluationError, image_ids_from_file_names, validate_results
from detection.evaluation.subsets import SubsetSpec, select_subset
from detection.render.colors import class_color
from detection.render.plot import draw_pr_plot

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 3, "name": "traffic light"}, {"id": 7, "name": "disc"}]


def make_gt(seed: int = 0, num_images: int = 12) -> dict:
    """Images of varied size with small/medium/large objects, a crowd region and empty images."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    ann_id = 1
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(200, 400)), int(rng.integers(150, 300))
        images.append({"id": image_id * 10, "width": width, "height": height, "file_name": f"{image_id:03d}.png"})
        if image_id % 5 == 0:
            continue  # images without annotations
        for _ in range(int(rng.integers(1, 6))):
            side = float(rng.choice([12, 40, 120]) * rng.uniform(0.7, 1.3))
            w, h = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append(
                {"id": ann_id, "image_id": image_id * 10, "category_id": int(rng.choice([1, 3, 7])),
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(ann_id == 4)}
            )
            ann_id += 1
    return {"images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}


def make_detections(gt: dict, seed: int = 1) -> list[dict]:
    """Jittered true positives, duplicates, wrong classes and background false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in gt["annotations"]:
        if rng.uniform() < 0.15:
            continue  # missed
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        category = ann["category_id"] if rng.uniform() > 0.1 else 7
        results.append({"image_id": ann["image_id"], "category_id": category,
                        "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1)],
                        "score": float(rng.uniform(0.3, 1.0))})
        if rng.uniform() < 0.2:
            results.append(dict(results[-1], score=float(rng.uniform(0.05, 0.5))))  # duplicate
    for image in gt["images"]:
        for _ in range(int(rng.integers(0, 3))):
            w, h = rng.uniform(10, 80, 2)
            results.append({"image_id": image["id"], "category_id": int(rng.choice([1, 3, 7])),
                            "bbox": [rng.uniform(0, image["width"] - w), rng.uniform(0, image["height"] - h), w, h],
                            "score": float(rng.uniform(0.0, 0.6))})
    return results


def direct_stats(ann_path: Path, results_path: Path, img_ids=None, cat_ids=None) -> list[float]:
    """What a user gets from pycocotools alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        dt = gt.loadRes(str(results_path))
        evaluator = COCOeval(gt, dt, "bbox")
        if img_ids is not None:
            evaluator.params.imgIds = img_ids
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


@pytest.fixture()
def dataset(tmp_path):
    gt = make_gt()
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(gt))
    results = make_detections(gt)
    res = tmp_path / "results.json"
    res.write_text(json.dumps(results))
    return gt, ann, results, res


def _eval(args: list[str]) -> int:
    return main(["eval", "--no-progress", *args])


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_full_dataset_parity_with_pycocotools(dataset, tmp_path):
    gt, ann, results, res = dataset
    out = tmp_path / "run"
    assert _eval(["--detections", str(res), "--ann", str(ann), "--out", str(out)]) == 0
    metrics = _metrics(out)
    ours = [metrics["bbox"][name] for name in BBOX_STAT_NAMES]
    assert ours == direct_stats(ann, out / "detections.json")
    assert ours == direct_stats(ann, res)  # nothing was dropped that pycocotools would use
    assert 0.2 < metrics["bbox"]["AP50"] < 1.0  # a real, imperfect detector
    assert json.loads((out / "detections.json").read_text()) == results


def test_subset_parity_sets_img_and_cat_ids(dataset, tmp_path):
    gt, ann, results, res = dataset
    ids_file = tmp_path / "ids.txt"
    chosen = [30, 10, 50, 100, 120]  # 50 and 100 have no annotations
    ids_file.write_text("\n".join(map(str, chosen)))
    out = tmp_path / "run"
    assert _eval(["--detections", str(res), "--ann", str(ann), "--out", str(out), "--image-ids", str(ids_file),
                  "--categories", "square", "traffic light"]) == 0
    metrics = _metrics(out)
    ours = [metrics["bbox"][name] for name in BBOX_STAT_NAMES]
    # identical on the written file and on the original file with the same imgIds / catIds
    assert ours == direct_stats(ann, out / "detections.json", sorted(chosen), [1, 3])
    assert ours == direct_stats(ann, res, sorted(chosen), [1, 3])
    # without imgIds the unseen images would not count: the numbers differ
    assert ours != direct_stats(ann, out / "detections.json", None, [1, 3])
    written = json.loads((out / "detections.json").read_text())
    assert {r["image_id"] for r in written} <= set(chosen) and {r["category_id"] for r in written} <= {1, 3}
    assert [row["name"] for row in metrics["per_category"]] == ["square", "traffic light"]
    with_objects = {a["image_id"] for a in gt["annotations"] if a["category_id"] in (1, 3)}
    assert metrics["subset"]["images_selected"] == 5
    assert metrics["subset"]["images_without_annotations"] == len(set(chosen) - with_objects) >= 2
    assert any("no ground-truth objects" in w for w in metrics["warnings"])


def test_per_category_ap_matches_single_category_runs(dataset, tmp_path):
    gt, ann, results, res = dataset
    out = tmp_path / "run"
    assert _eval(["--detections", str(res), "--ann", str(ann), "--out", str(out)]) == 0
    for row in _metrics(out)["per_category"]:
        single = direct_stats(ann, res, None, [row["category_id"]])
        assert row["AP"] == pytest.approx(single[0], abs=1e-12)
        assert row["AP50"] == pytest.approx(single[1], abs=1e-12)
        assert row["AP75"] == pytest.approx(single[2], abs=1e-12)
        assert row["AR100"] == pytest.approx(single[8], abs=1e-12)
        assert row["num_gt"] == sum(1 for a in gt["annotations"] if a["category_id"] == row["category_id"] and not a["iscrowd"])


def test_empty_results_equal_pycocotools_with_nothing_to_match(dataset, tmp_path):
    gt, ann, results, res = dataset
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "run"
    assert _eval(["--detections", str(empty), "--ann", str(ann), "--out", str(out)]) == 0
    metrics = _metrics(out)
    # pycocotools cannot load [] itself; detections only of a category outside catIds is the same thing
    only_disc = tmp_path / "disc.json"
    only_disc.write_text(json.dumps([r for r in results if r["category_id"] == 7]))
    out2 = tmp_path / "run2"
    assert _eval(["--detections", str(only_disc), "--ann", str(ann), "--out", str(out2), "--categories", "square", "traffic light"]) == 0
    assert [_metrics(out2)["bbox"][n] for n in BBOX_STAT_NAMES] == direct_stats(ann, only_disc, None, [1, 3])
    assert metrics["bbox"]["AP"] == 0.0 and metrics["bbox"]["AR100"] == 0.0
    # all categories, nothing detected: pycocotools' answer is 0 wherever GT exists
    assert [metrics["bbox"][n] for n in BBOX_STAT_NAMES] == [
        0.0 if v > -1 else -1.0 for v in direct_stats(ann, res)
    ]
    assert any("no detections" in w for w in metrics["warnings"])
    assert json.loads((out / "detections.json").read_text()) == []


def test_empty_results_no_small_objects_gives_minus_one(tmp_path):
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0}]}
    evaluation = evaluate_bbox(gt, [], [1], [1])
    assert evaluation.stats["AP"] == 0.0 and evaluation.stats["APm"] == 0.0
    assert evaluation.stats["APs"] == -1.0 and evaluation.stats["APl"] == -1.0  # no GT of those sizes
    assert evaluation.empty


def test_unknown_image_ids_refused_with_names(dataset, tmp_path, capsys):
    gt, ann, results, res = dataset
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(results + [{"image_id": 99999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    assert _eval(["--detections", str(bad), "--ann", str(ann), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "99999" in err and "instances.json" in err


def test_unknown_category_ids_reported_and_ignored(dataset, tmp_path):
    gt, ann, results, res = dataset
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(results + [{"image_id": 10, "category_id": 42, "bbox": [0, 0, 5, 5], "score": 0.9}] * 3))
    out = tmp_path / "run"
    assert _eval(["--detections", str(extra), "--ann", str(ann), "--out", str(out)]) == 0
    metrics = _metrics(out)
    assert metrics["source"]["results_unknown_category"] == {"42": 3}
    assert any("category ids the ground truth does not define" in w and "42" in w for w in metrics["warnings"])
    assert [metrics["bbox"][n] for n in BBOX_STAT_NAMES] == direct_stats(ann, extra)


def test_annotation_id_zero_refused(dataset, tmp_path, capsys):
    gt, ann, results, res = dataset
    broken = copy.deepcopy(gt)
    broken["annotations"][0]["id"] = 0
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(broken))
    assert _eval(["--detections", str(res), "--ann", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "zero.json" in err and "annotation id 0" in err


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda g: g["annotations"][1].update(id=g["annotations"][0]["id"]), "duplicate annotation id"),
        (lambda g: g["annotations"][0].pop("area"), "'area'"),
        (lambda g: g["annotations"][0].pop("iscrowd"), "'iscrowd'"),
        (lambda g: g["annotations"][0].update(category_id=99), "unknown category_id 99"),
        (lambda g: g["annotations"][0].update(bbox=[0, 0, -1, 3]), "invalid bbox"),
        (lambda g: g.pop("categories"), "'categories'"),
    ],
)
def test_ground_truth_validation(dataset, tmp_path, mutate, message):
    gt, ann, results, res = dataset
    broken = copy.deepcopy(gt)
    mutate(broken)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(GroundTruthError, match=message) as info:
        load_coco_gt(path)
    assert "broken.json" in str(info.value)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"image_id": 10, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5}, "invalid bbox"),
        ({"image_id": "10", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}, "image_id"),
        ({"image_id": 10, "category_id": 1, "bbox": [0, 0, 5, 5]}, "invalid score"),
    ],
)
def test_results_validation(entry, message):
    with pytest.raises(EvaluationError, match=message):
        validate_results([entry], "res.json")


def test_subsets(dataset, tmp_path):
    gt, ann, results, res = dataset
    order = [img["id"] for img in gt["images"]]
    assert select_subset(gt, SubsetSpec(first=4)).image_ids == order[:4]
    first = select_subset(gt, SubsetSpec(random=5, seed=3)).image_ids
    assert first == select_subset(gt, SubsetSpec(random=5, seed=3)).image_ids  # deterministic
    assert first != select_subset(gt, SubsetSpec(random=5, seed=4)).image_ids
    assert len(first) == 5 and first == [i for i in order if i in first]  # file order kept
    counts = {}
    for a in gt["annotations"]:
        if not a["iscrowd"] and a["category_id"] == 1:
            counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    subset = select_subset(gt, SubsetSpec(category_names=["SQUARE"], min_objects=2))
    assert subset.category_ids == [1]
    assert subset.image_ids == [i for i in order if counts.get(i, 0) >= 2] and subset.image_ids
    ids = tmp_path / "ids.json"
    ids.write_text("[120, 20]")
    assert select_subset(gt, SubsetSpec(image_ids_file=ids, first=1)).image_ids == [20]
    ids.write_text("[20, 555]")
    with pytest.raises(GroundTruthError, match="555"):
        select_subset(gt, SubsetSpec(image_ids_file=ids))
    with pytest.raises(GroundTruthError, match="unknown category names"):
        select_subset(gt, SubsetSpec(category_names=["zebra"]))
    with pytest.raises(GroundTruthError, match="no images"):
        select_subset(gt, SubsetSpec(min_objects=100))


def test_subset_cli_first_n_and_random(dataset, tmp_path):
    gt, ann, results, res = dataset
    out = tmp_path / "run"
    assert _eval(["--detections", str(res), "--ann", str(ann), "--out", str(out), "--random", "6", "--seed", "2"]) == 0
    ids = select_subset(gt, SubsetSpec(random=6, seed=2)).image_ids
    assert [_metrics(out)["bbox"][n] for n in BBOX_STAT_NAMES] == direct_stats(ann, res, sorted(ids))


def test_outputs_markdown_and_pr_curves(dataset, tmp_path):
    gt, ann, results, res = dataset
    out = tmp_path / "run"
    assert _eval(["--detections", str(res), "--ann", str(ann), "--out", str(out)]) == 0
    metrics = _metrics(out)
    markdown = (out / "metrics.md").read_text()
    assert "| AP | AP50 |" in markdown and f"{metrics['bbox']['AP']:.3f}" in markdown
    assert "| traffic light |" in markdown
    for name in ("pr_curve.png", "pr_per_category.png"):
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape == (520, 720, 3)
        # coloured curve pixels exist (the palette is not grey)
        spread = image.max(axis=2).astype(int) - image.min(axis=2).astype(int)
        assert (spread > 100).sum() > 200


def test_draw_pr_plot_places_points():
    recall = np.linspace(0, 1, 101)
    image = draw_pr_plot([("flat", recall, np.full(101, 0.5))], "t", size=(520, 720))
    # precision 0.5 -> the horizontal line sits halfway between the plot's top (40) and bottom (460)
    row = image[250, 300]
    assert tuple(row) == class_color(0) == (31, 119, 180)


def test_class_mapping_by_name_map_file_and_errors(tmp_path):
    cats = [{"id": 5, "name": "traffic light"}, {"id": 9, "name": "Disc"}]
    mapping, warnings = map_classes(["Traffic_Light", "disc", "N/A"], cats, [5, 9])
    assert mapping == {0: 5, 1: 9} and any("N/A" in w for w in warnings)
    with pytest.raises(ClassMappingError, match="--class-map"):
        map_classes(["light", "circle"], cats, [5, 9])
    mapping, _ = map_classes(["light", "circle"], cats, [5, 9], {"light": "traffic light", "circle": 9})
    assert mapping == {0: 5, 1: 9}
    with pytest.raises(ClassMappingError, match="map.json"):
        map_classes(["light"], cats, [5], {"light": "lamp"}, "map.json")
    with pytest.raises(ClassMappingError, match="not a model class"):
        map_classes(["light"], cats, [5], {"bulb": 5})
    mapping, warnings = map_classes(["light"], cats, [5, 9], {"light": 5}, allow_unmapped=True)
    assert mapping == {0: 5} and any("Disc" in w for w in warnings)
    # restricting the evaluated categories makes a partial model fine
    assert map_classes(["disc"], cats, [9])[0] == {0: 9}


def test_match_file_names_for_predict_output(dataset, tmp_path, capsys):
    gt, ann, results, res = dataset
    by_id = {img["id"]: img["file_name"] for img in gt["images"]}
    # predict numbers images 1..N by input order and records the path it was given
    position = {img["id"]: k + 1 for k, img in enumerate(gt["images"])}
    predicted = [dict(r, image_id=position[r["image_id"]], file_name=f"/data/coco/val/{by_id[r['image_id']]}") for r in results]
    pred = tmp_path / "predicted.json"
    pred.write_text(json.dumps(predicted))
    assert _eval(["--detections", str(pred), "--ann", str(ann), "--out", str(tmp_path / "bad")]) == 2
    assert "--match-file-names" in capsys.readouterr().err
    out = tmp_path / "run"
    assert _eval(["--detections", str(pred), "--ann", str(ann), "--out", str(out), "--match-file-names"]) == 0
    assert [_metrics(out)["bbox"][n] for n in BBOX_STAT_NAMES] == direct_stats(ann, res)
    with pytest.raises(EvaluationError, match="matches no image"):
        image_ids_from_file_names([dict(predicted[0], file_name="/x/unknown.png")], gt, "p.json")
    twin = copy.deepcopy(gt)
    name = twin["images"][0]["file_name"]
    twin["images"].append(dict(twin["images"][0], id=999, file_name="other/" + name))
    twin["images"].append(dict(twin["images"][0], id=998))  # same file_name twice: ambiguous
    with pytest.raises(EvaluationError, match="several images"):
        image_ids_from_file_names([dict(predicted[0], file_name=f"/x/{name}")], twin, "p.json")
    # the longest matching suffix wins
    assert image_ids_from_file_names([dict(predicted[0], file_name=f"/x/other/{name}")], twin, "p.json")[0]["image_id"] == 999
