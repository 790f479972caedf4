"""`detr-attn eval --model`: one engine, parity, attention metrics, sharding (detr-tiny, random weights)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.attention import metrics as M
from detection.attention.maps import detection_maps
from detection.attention.matching import annotation_region, match_detections
from detection.cli import main
from detection.data.images import load_image
from detection.data.preprocess import image_to_input, pad_batch
from detection.data.ground_truth import load_coco_gt
from detection.evaluation.bbox import BBOX_STAT_NAMES
from detection.evaluation.classes import map_classes
from detection.evaluation.model_run import ModelRunOptions, detection_score_fn, run_model
from detection.evaluation.subsets import SubsetSpec, select_subset
from detection.models.registry import build_model, load_model, save_model
from detection.postprocess import postprocess

NUM_IMAGES = 5


def _write_dataset(root: Path, model) -> Path:
    """Random-shape images; the GT is built from the model's own top detections (so a random
    model has matches: AP > 0, pointing game defined) plus one object it does not find."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for index in range(NUM_IMAGES):
        height, width = int(rng.integers(96, 160)), int(rng.integers(96, 160))
        canvas = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        name = f"{index:03d}.png"
        cv2.imwrite(str(root / "images" / name), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
        loaded = load_image(root / "images" / name)
        batch, mask = pad_batch([image_to_input(loaded.rgb, model.config.min_size, model.config.max_size)])
        with torch.no_grad():
            det = postprocess(model(batch, mask), [loaded.original_size], model.config.class_names, 0.0)[0]
        objects = [(det.boxes[k].tolist(), model.config.category_ids[int(det.labels[k])]) for k in range(2)]
        objects.append(([5.0, 5.0, 40.0, 30.0], 3))
        for (x0, y0, x1, y1), category in objects:
            x0, y0 = max(x0, 0.0), max(y0, 0.0)
            x1, y1 = min(x1, width), min(y1, height)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": int(category),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]}))
    return ann


def confident_model_setup(root):
    """A seeded random detr-tiny saved to root/model, and a dataset built from its detections."""
    torch.manual_seed(0)
    model = build_model("detr-tiny").eval()
    # a confident random model: push "no object" down so detections pass the attention threshold
    with torch.no_grad():
        model.class_embed.bias[-1] = -4.0
    save_model(model, root / "model", source="random init (test)")
    return root, _write_dataset(root, model)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return confident_model_setup(tmp_path_factory.mktemp("evalmodel"))


def _run(root, ann, out, *extra) -> dict:
    code = main(["eval", "--no-progress", "--model", str(root / "model"), "--ann", str(ann), "--images", str(root / "images"),
                 "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def _direct_stats(ann, results_path):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        evaluator = COCOeval(gt, gt.loadRes(str(results_path)), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def test_model_eval_parity_engine_and_attention(setup, tmp_path):
    root, ann = setup
    out = tmp_path / "run"
    metrics = _run(root, ann, out, "--attention-threshold", "0.3", "--layers", "last,mean,rollout", "--heads", "mean,max")
    assert [metrics["bbox"][n] for n in BBOX_STAT_NAMES] == _direct_stats(ann, out / "detections.json")

    # the detections are the model's own, image by image (no second engine drifting apart)
    model = load_model(root / "model")
    written = json.loads((out / "detections.json").read_text())
    gt = load_coco_gt(ann)
    explained = 0
    pointing, energy = [], []
    for image in gt["images"]:
        loaded = load_image(root / "images" / image["file_name"])
        images, mask = pad_batch([image_to_input(loaded.rgb, model.config.min_size, model.config.max_size)])
        with torch.no_grad():
            outputs = model(images, mask, cross_attention=True)
        det = postprocess(outputs, [loaded.original_size], model.config.class_names, 0.0)[0]
        mine = sorted([r for r in written if r["image_id"] == image["id"]], key=lambda r: -r["score"])
        assert len(mine) == len(det) == model.config.num_queries
        np.testing.assert_allclose([r["score"] for r in mine], det.scores.numpy(), rtol=1e-4, atol=1e-5)
        boxes = det.boxes.numpy()
        np.testing.assert_allclose([r["bbox"] for r in mine], np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], atol=2e-2)
        # recompute the "last/mean" pointing game / energy for this image by hand
        keep = (det.scores >= 0.3).nonzero().flatten()
        explained += len(keep)
        if len(keep):
            maps = detection_maps(outputs["attention"], 0, det.query_index[keep], loaded.original_size, heads="mean", layers="last", normalize=None)
            anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
            gt_boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns])
            matched = match_detections(boxes[keep.numpy()], det.scores[keep].numpy(), np.array(model.config.category_ids)[det.labels[keep].numpy()],
                                       gt_boxes, np.array([a["category_id"] for a in anns]))
            for j, g in enumerate(matched):
                if g >= 0:
                    region = annotation_region(anns[g], loaded.original_size)
                    pointing.append(M.pointing_game(maps[j], region))
                    energy.append(M.energy_pointing_game(maps[j], region))
    attention = metrics["attention"]
    expected_choices = [f"{l}/{h}" for l in ("last", "mean", "rollout") for h in ("mean", "max")] + [M.GAUSSIAN_BASELINE]
    assert list(attention) == expected_choices
    row = attention["last/mean"]
    assert explained > 0 and row["num_detections"] == explained
    assert row["num_matched"] == len(pointing)
    if pointing:
        assert row["pointing_game"] == pytest.approx(np.mean(pointing))
        assert row["energy_pointing_game"] == pytest.approx(np.mean(energy))
    for choice_row in attention.values():
        assert -1.0 <= choice_row["mask_ap"] <= 1.0 and -1.0 <= choice_row["mask_ap_standard"] <= 1.0
        assert choice_row["mask_ap"] >= choice_row["mask_ap_standard"] or choice_row["mask_ap"] == -1.0
    markdown = (out / "metrics.md").read_text()
    assert "| rollout/max |" in markdown and "| gaussian-baseline |" in markdown


def test_sharded_run_merges_to_the_single_process_result(setup):
    root, ann = setup
    gt = load_coco_gt(ann)
    subset = select_subset(gt, SubsetSpec())
    model = load_model(root / "model")
    options = ModelRunOptions(attention_threshold=0.3, layers=["last"], heads=["mean"], progress=False)
    mapping, _ = map_classes(model.config.class_names, gt["categories"], subset.category_ids)
    single = run_model(model, gt, subset, root / "images", mapping, options)
    shards = [run_model(model, gt, subset, root / "images", mapping, options, rank, 2) for rank in (0, 1)]
    merged = shards[0][0] + shards[1][0]
    key = lambda r: (r["image_id"], -r["score"], r["category_id"])  # noqa: E731
    merged, whole_results = sorted(merged, key=key), sorted(single[0], key=key)
    # same detections; scores equal up to CPU kernel rounding between calls
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in merged] == [(r["image_id"], r["category_id"], r["bbox"]) for r in whole_results]
    np.testing.assert_allclose([r["score"] for r in merged], [r["score"] for r in whole_results], rtol=1e-5)
    whole = M.FaithfulnessAccumulator(["last/mean"])
    whole.merge(single[1])
    parts = M.FaithfulnessAccumulator(["last/mean"])
    parts.merge(shards[0][1])
    parts.merge(shards[1][1])
    assert parts.num_detections == whole.num_detections > 0
    assert sorted(parts.pointing["last/mean"]) == sorted(whole.pointing["last/mean"])
    assert parts.summarize(gt, subset.image_ids, subset.category_ids)["last/mean"]["mask_ap"] == pytest.approx(
        whole.summarize(gt, subset.image_ids, subset.category_ids)["last/mean"]["mask_ap"]
    )


def test_detection_score_fn_recovers_the_detection_score(setup):
    root, ann = setup
    model = load_model(root / "model")
    loaded = load_image(root / "images" / "000.png")
    images, mask = pad_batch([image_to_input(loaded.rgb, model.config.min_size, model.config.max_size)])
    with torch.no_grad():
        det = postprocess(model(images, mask), [loaded.original_size], model.config.class_names, 0.0)[0]
    score_fn = detection_score_fn(lambda im, m: model(im, m), model, det.boxes[0].tolist(), int(det.labels[0]))
    scores = score_fn(np.stack([loaded.rgb, loaded.rgb]))
    # its own query has IoU 1 with its box, so the score is at least the detection's own
    assert scores[0] == pytest.approx(scores[1])
    assert float(det.scores[0]) - 1e-4 <= scores[0] <= 1.0
    # a black image is a different input: the score changes
    assert abs(score_fn(np.zeros((1, *loaded.rgb.shape), np.uint8))[0] - scores[0]) > 1e-3


def test_deletion_insertion_cli(setup, tmp_path):
    root, ann = setup
    metrics = _run(root, ann, tmp_path / "run", "--first", "1", "--attention-threshold", "0.3", "--layers", "last",
                   "--heads", "mean", "--deletion-insertion", "--di-steps", "4", "--di-max-detections", "1")
    assert set(metrics["attention"]) == {"last/mean", M.GAUSSIAN_BASELINE}
    for row in metrics["attention"].values():
        assert row["num_detections"] > 0
        assert 0.0 <= row["deletion_auc"] <= 1.0 and 0.0 <= row["insertion_auc"] <= 1.0
    assert "deletion AUC" in (tmp_path / "run" / "metrics.md").read_text()


def test_unmappable_model_classes_fail_clearly(setup, tmp_path, capsys):
    root, ann = setup
    data = json.loads(ann.read_text())
    for category in data["categories"]:
        category["name"] = category["name"].upper() + "_x"
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(data))
    code = main(["eval", "--no-progress", "--model", str(root / "model"), "--ann", str(renamed), "--images", str(root / "images"),
                 "--out", str(tmp_path / "run"), "--first", "2"])
    assert code == 2 and "--class-map" in capsys.readouterr().err
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"circle": "CIRCLE_x", "square": 2, "triangle": "TRIANGLE_x"}))
    metrics = _run(root, renamed, tmp_path / "run2", "--class-map", str(class_map), "--no-attention", "--first", "2")
    assert metrics["attention"] == {}
    reference = _run(root, ann, tmp_path / "run3", "--no-attention", "--first", "2")
    assert metrics["bbox"] == reference["bbox"]


def test_export_masks_reproduces_eval_mask_ap_with_pycocotools(setup, tmp_path):
    """`--export-masks FILE`: pycocotools' own segm evaluation of the written masks, with eval's
    IoU thresholds (0.2:0.95), gives exactly the mask AP in metrics.json, for every choice."""
    root, ann = setup
    masks_file = tmp_path / "masks.json"
    metrics = _run(root, ann, tmp_path / "run", "--attention-threshold", "0.3", "--layers", "last,mean",
                   "--heads", "mean", "--export-masks", str(masks_file))
    exported = json.loads(masks_file.read_text())
    assert {entry["choice"] for entry in exported} == set(metrics["attention"])
    gt_dataset = json.loads(Path(ann).read_text())
    image_ids = [image["id"] for image in gt_dataset["images"]]
    category_ids = sorted(c["id"] for c in gt_dataset["categories"])
    for choice, row in metrics["attention"].items():
        entries = [{k: v for k, v in e.items() if k != "choice"} for e in exported if e["choice"] == choice]
        assert len(entries) == row["num_detections"]
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = gt_dataset
            gt.createIndex()
            evaluator = COCOeval(gt, gt.loadRes(entries), iouType="segm")
            evaluator.params.imgIds, evaluator.params.catIds = image_ids, category_ids
            evaluator.params.iouThrs = np.concatenate([np.linspace(0.2, 0.45, 6), np.linspace(0.5, 0.95, 10)])
            evaluator.evaluate()
            evaluator.accumulate()
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        valid = precision[precision > -1]
        assert float(np.mean(valid)) == row["mask_ap"] and row["mask_ap"] > 0


def test_export_masks_needs_a_model_with_attention(setup, tmp_path, capsys):
    root, ann = setup
    code = main(["eval", "--no-progress", "--model", str(root / "model"), "--ann", str(ann), "--images",
                 str(root / "images"), "--out", str(tmp_path / "run"), "--no-attention",
                 "--export-masks", str(tmp_path / "masks.json")])
    assert code == 2 and "--export-masks needs --model with attention" in capsys.readouterr().err
    assert not (tmp_path / "masks.json").exists()
