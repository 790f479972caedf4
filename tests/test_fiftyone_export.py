"""`detr-attn export --format fiftyone`: FiftyOne's serialized-sample JSON, read back here field by
field (FiftyOne itself cannot start on this machine: see README) -- masks, heatmaps, boxes."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from detection.runfolder.maps_npz import load_maps_npz
from detection.attention.metrics import explanation_mask
from detection.cli import main
from detection.runfolder.journal import read_journal
from detection.evaluation.fiftyone_export import decode_array, encode_array, image_fields, pixel_box

DEMO = Path(__file__).resolve().parents[1] / "demo" / "images"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fo") / "run"
    assert main(["predict", str(DEMO), "--model", "demo", "--out", str(out), "--save-attention", "--device", "cpu",
                 "--workers", "0", "--quiet"]) == 0
    return out


def test_array_encoding_round_trip() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    value = encode_array(array)
    assert value["$binary"]["subType"] == "00"
    assert np.array_equal(decode_array(value), array)
    mask = np.eye(3, dtype=bool)
    assert np.array_equal(decode_array(encode_array(mask)), mask)


def test_pixel_box_covers_the_box_in_whole_pixels() -> None:
    assert pixel_box([10.2, 5.9, 20.5, 10.0], 100, 50) == (10, 5, 31, 16)
    assert pixel_box([-3.0, -2.0, 500.0, 400.0], 100, 50) == (0, 0, 100, 50)  # clipped
    assert pixel_box([99.5, 49.5, 0.1, 0.1], 100, 50) == (99, 49, 100, 50)  # at least one pixel


def test_export_writes_what_fiftyone_reads(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fo"
    assert main(["export", str(run_dir), "--format", "fiftyone", "--out", str(out)]) == 0
    assert json.loads((out / "metadata.json").read_text())["media_type"] == "image"
    assert "version" not in json.loads((out / "metadata.json").read_text())  # FiftyOne's legacy importer
    samples = json.loads((out / "samples.json").read_text())["samples"]
    records = read_journal(run_dir / "predictions.jsonl")
    assert len(samples) == len(records) == len(list(DEMO.glob("*.png")))
    checked = 0
    for sample, record in zip(samples, records):
        assert Path(sample["filepath"]).is_absolute() and Path(sample["filepath"]).is_file()
        assert sample["metadata"] == {"_cls": "ImageMetadata", "width": record["width"], "height": record["height"]}
        maps, _ = load_maps_npz(run_dir / "attention" / f"{record['key']}.npz")
        detections = sample["detections"]["detections"]
        assert sample["detections"]["_cls"] == "Detections" and len(detections) == len(record["detections"])
        height, width = record["height"], record["width"]
        for k, (document, det) in enumerate(zip(detections, record["detections"])):
            assert document["_cls"] == "Detection" and len(document["_id"]["$oid"]) == 24
            assert document["label"] == det["class_name"] and document["confidence"] == det["score"]
            assert document["query_index"] == det["query_index"] and document["category_id"] == det["category_id"]
            x0, y0, x1, y1 = pixel_box(det["bbox"], width, height)
            assert document["bounding_box"] == [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]
            mask = decode_array(document["mask"])
            assert mask.dtype == bool and np.array_equal(mask, explanation_mask(maps[k])[y0:y1, x0:x1])
            heat = sample[f"saliency_det_{k}"]
            assert heat["_cls"] == "Heatmap" and heat["range"] == [0.0, 255.0]
            png = cv2.imread(str(out / heat["map_path"]), cv2.IMREAD_UNCHANGED)
            assert png.shape == (height, width) and png.dtype == np.uint8
            assert np.abs(png.astype(np.float32) - maps[k] * 255.0).max() <= 0.5 + 1e-3
            checked += 1
        combined = cv2.imread(str(out / sample["saliency"]["map_path"]), cv2.IMREAD_UNCHANGED)
        assert np.abs(combined.astype(np.float32) - maps.max(axis=0) * 255.0).max() <= 0.5 + 1e-3
    assert checked > 0


def test_in_memory_fields_keep_float_maps() -> None:
    maps = np.zeros((2, 20, 30), dtype=np.float32)
    maps[0, 5:10, 5:10] = 1.0
    maps[1, 12:18, 20:28] = 0.5
    dets = [{"bbox": [4.5, 4.5, 6.0, 6.0], "score": 0.9, "class_name": "a", "query_index": 3},
            {"bbox": [19.0, 11.0, 10.0, 8.0], "score": 0.8, "class_name": "b", "query_index": 3}]
    fields = image_fields(dets, maps, "x")
    assert sorted(fields) == ["detections", "saliency", "saliency_det_0", "saliency_det_1"]
    assert np.array_equal(decode_array(fields["saliency_det_1"]["map"]), maps[1])
    assert np.array_equal(decode_array(fields["saliency"]["map"]), maps.max(axis=0))
    first = fields["detections"]["detections"][0]
    assert "category_id" not in first and first["query_index"] == 3
    assert decode_array(first["mask"]).shape == (7, 7)  # rows/cols 4..10 of the image


def test_export_without_saved_attention_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["predict", str(DEMO), "--model", "demo", "--out", str(out), "--device", "cpu", "--workers", "0",
                 "--quiet"]) == 0
    assert main(["export", str(out), "--format", "fiftyone", "--out", str(tmp_path / "fo")]) == 2
    assert "--save-attention" in capsys.readouterr().err
    assert not (tmp_path / "fo" / "samples.json").exists()
