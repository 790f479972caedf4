"""CLI round trip for every HF family: predict (overlays, --save-attention), eval (bbox AP plus
attention metrics) and report, on small random models and a tiny synthetic COCO set."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_equivalence import CASES, hf_folder  # noqa: E402

from detection.attention.maps import detection_maps  # noqa: E402
from detection.runfolder.maps_npz import load_maps_npz  # noqa: E402
from detection.cli import main  # noqa: E402
from detection.data.images import load_image  # noqa: E402
from detection.data.preprocess import image_to_input, pad_batch  # noqa: E402
from detection.runfolder.journal import read_journal  # noqa: E402
from detection.models.registry import load_model  # noqa: E402
from detection.postprocess import postprocess  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    assert main(["synth", "--out", str(root), "--train", "0", "--val", "2", "--image-size", "96",
                 "--no-progress"]) == 0
    return root


@pytest.mark.parametrize("variant", list(CASES))
def test_predict_eval_report_round_trip(tmp_path, dataset: Path, variant: str) -> None:
    folder = hf_folder(variant, tmp_path / "model")
    model = load_model(folder)
    out = tmp_path / "run"
    assert main(["predict", str(dataset / "val"), "--model", str(folder), "--out", str(out), "--score-threshold",
                 "0.2", "--device", "cpu", "--precision", "fp32", "--workers", "0", "--overlays",
                 "--save-attention", "--quiet"]) == 0
    records = read_journal(out / "predictions.jsonl")
    assert len(records) == 2 and sum(len(r["detections"]) for r in records) > 0
    for record in records:
        if not record["detections"]:
            continue
        maps, meta = load_maps_npz(out / "attention" / f"{record['key']}.npz")
        loaded = load_image(record["file"])
        assert maps.shape == (len(record["detections"]), *loaded.original_size)
        assert meta["query_index"] == [d["query_index"] for d in record["detections"]]
        assert 0.0 <= maps.min() and maps.max() <= 1.0 + 1e-3 and maps.max() > 0.5
        # the saved maps are the maps of each detection's own query, recomputed here directly
        images, mask = pad_batch([image_to_input(loaded.rgb, model.preprocess_spec)])
        with torch.no_grad():
            outputs = model(images, mask, cross_attention=True)
        queries = torch.tensor(meta["query_index"])
        direct = detection_maps(outputs["attention"], 0, queries, loaded.original_size)
        assert np.abs(direct - maps).max() <= 2e-3
        # a query detected under two classes (sigmoid top-k) keeps one map: its query's (the npz
        # stores it once per detection: equal cells; the batched float32 resampling may round
        # rows at different positions differently in the last bits)
        stored, _ = load_maps_npz(out / "attention" / f"{record['key']}.npz", size=None)
        for a in range(len(queries)):
            for b in range(a + 1, len(queries)):
                if queries[a] == queries[b]:
                    assert np.array_equal(stored[a], stored[b])
                    np.testing.assert_allclose(maps[a], maps[b], rtol=0, atol=1e-5)
        combined = cv2.imread(str(out / record["overlay"]))
        assert combined.shape[:2] == loaded.original_size
    evaluation = tmp_path / "eval"
    assert main(["eval", "--no-progress", "--model", str(folder), "--ann",
                 str(dataset / "annotations" / "instances_val.json"), "--images", str(dataset / "val"),
                 "--out", str(evaluation), "--allow-unmapped", "--attention-threshold", "0.2",
                 "--heads", "mean", "--device", "cpu"]) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox"]["AP"] <= 1.0
    # the default layer choices, rollout only where the family's attention is dense
    expected = {"last/mean", "mean/mean", "gaussian-baseline"}
    if model.family.attention == "dense":
        expected.add("rollout/mean")
    assert set(metrics["attention"]) == expected
    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report), "--pdf-max-images", "0"]) == 0
    html = next(report.glob("*.html")).read_text()
    assert records[0]["key"] in html


@pytest.mark.parametrize("variant", ["deformable_detr", "rt_detr_v2_discrete"])
def test_points_overlay_style(tmp_path, dataset: Path, variant: str) -> None:
    """--overlay-style points: det_<k>.raw-points is the detection's sampling points drawn over the image."""
    from detection.attention.sampled import query_points
    from detection.render.points import render_points
    from detection.structures import Detections

    folder = hf_folder(variant, tmp_path / "model")
    model = load_model(folder)
    out = tmp_path / "run"
    assert main(["predict", str(dataset / "val"), "--model", str(folder), "--out", str(out), "--score-threshold",
                 "0.2", "--device", "cpu", "--precision", "fp32", "--workers", "0", "--overlay-style", "points",
                 "--quiet"]) == 0
    records = [r for r in read_journal(out / "predictions.jsonl") if r["detections"]]
    assert records
    record = records[0]
    loaded = load_image(record["file"])
    images, mask = pad_batch([image_to_input(loaded.rgb, model.preprocess_spec)])
    with torch.no_grad():
        outputs = model(images, mask, cross_attention=True)
    for k, detection in enumerate(record["detections"]):
        points = query_points(outputs["attention"], 0, detection["query_index"], loaded.original_size)
        x, y, w, h = detection["bbox"]
        one = Detections(boxes=torch.tensor([[x, y, x + w, y + h]]), scores=torch.tensor([detection["score"]]),
                         labels=torch.tensor([detection["label"]]), class_names=[detection["class_name"]],
                         query_index=torch.tensor([detection["query_index"]]), image_size=loaded.original_size)
        expected = render_points(loaded.rgb, points, one)
        written = cv2.cvtColor(cv2.imread(str(out / "overlays" / record["key"] / f"det_{k}.raw-points.png")), cv2.COLOR_BGR2RGB)
        # boxes come back from the journal rounded to 3 decimals: allow the anti-aliased edge to move
        assert np.mean(np.abs(written.astype(int) - expected.astype(int)) > 0) < 0.002
        assert np.abs(written.astype(int) - loaded.rgb.astype(int)).max() > 100  # the dots are there


def test_points_overlay_style_refused_for_dense(tmp_path, dataset: Path) -> None:
    folder = hf_folder("conditional_detr", tmp_path / "model")
    out = tmp_path / "run"
    assert main(["predict", str(dataset / "val"), "--model", str(folder), "--out", str(out), "--device", "cpu",
                 "--workers", "0", "--overlay-style", "points", "--quiet"]) == 2
    assert not (out / "predictions.jsonl").exists()
