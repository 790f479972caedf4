"""The run-folder layout's one owner: what RunFolder and write_image_outputs write, RunReader
reads back (values, not shapes), and --overwrite removes only predict's own outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.attention.maps import detection_maps
from detection.runfolder.maps_npz import load_maps_npz
from detection.engine.image_files import OutputOptions
from tests.image_writing import write_like_predict
from detection.runfolder.records import detection_record
from detection.engine.predictor import Predictor, PredictorSettings
from detection.runfolder.layout import OWN_OUTPUTS, attention_name, detection_overlay_name, overlay_name
from detection.runfolder.run_folder import RunFolder
from detection.runfolder.reader import RunReader
from detection.runfolder.records import coco_results, error_record
from detection.data.sources import SourceItem, expand_sources
from detection.models.registry import build_model
from detection.data.image_codec import decode_image
from detection.render.overlay import render_detection_overlay, render_overlay


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Two predicted images (random detr-tiny, every query a detection) with attention and pixels."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    for index, (height, width) in enumerate([(90, 120), (100, 80)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"im{index}.png")
    torch.manual_seed(0)
    model = build_model("detr-tiny").eval()
    predictor = Predictor(model, PredictorSettings(score_threshold=0.0, cross_attention=True, keep_images=True))
    return model, list(predictor.run(expand_sources([str(folder)])))


def test_names_are_the_documented_layout():
    # every overlay's file name says which method drew it (and the point view says so)
    assert overlay_name("a__b~2", "raw", "png") == "overlays/a__b~2.raw.png"
    assert detection_overlay_name("a__b~2", 3, "raw", "jpg") == "overlays/a__b~2/det_3.raw.jpg"
    assert detection_overlay_name("a__b~2", 3, "raw", "jpg", "points") == "overlays/a__b~2/det_3.raw-points.jpg"
    assert detection_overlay_name("a", 0, "drise", "png") == "overlays/a/det_0.drise.png"
    # a key that ends like a method name still gets names of its own
    assert overlay_name("a.raw", "raw", "png") != overlay_name("a", "raw", "png")
    assert attention_name("clip__frame000003") == "attention/clip__frame000003.npz"
    assert OWN_OUTPUTS == ("run.json", "predictions.jsonl", "errors.jsonl", "detections.json", ".parts",
                           "overlays", "attention")


def test_reader_round_trips_what_the_writer_wrote(tmp_path: Path, results) -> None:
    model, predicted = results
    category_ids = model.config.category_ids
    options = OutputOptions(overlays=True, save_attention=True)
    folder = RunFolder(tmp_path / "out")
    info = {"status": "complete", "model": "detr-tiny", "settings": {"batch_size": 1}}
    folder.write_run_info(info)
    assert folder.open() == set()
    records = [write_like_predict(folder, r, options, model) for r in predicted]
    for record in records:
        folder.append_prediction(record)
    bad = SourceItem(key="broken", file="/x/broken.png", image_id=9, unit=9)
    folder.append_error(bad, "not an image")
    folder.close()
    items = [r.item for r in predicted] + [bad]
    assert folder.finalize(items, category_ids) == {"images": 2, "errors": 1,
                                                    "detections": sum(len(r["detections"]) for r in records)}

    reader = RunReader(tmp_path / "out")
    assert reader.info() == info
    assert reader.predictions() == records  # every value, in image id order
    assert reader.errors() == [error_record(bad, "not an image")]
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == coco_results(records)
    for result, record in zip(predicted, records):
        key = reader.image_key(record)
        detections = result.detections
        assert key == result.item.key and len(detections) == len(record["detections"]) > 0
        assert reader.overlay(record, key) == tmp_path / "out" / record["overlay"] == folder.overlay_path(key, "raw", "png")
        maps = detection_maps(result.attention, 0, detections.query_index, detections.image_size)
        # PNG is lossless: the files hold exactly the rendered pixels
        np.testing.assert_array_equal(decode_image(reader.overlay(record, key).read_bytes()),
                                      render_overlay(result.image, detections, maps))
        per_detection = reader.detection_overlays(key, len(detections))
        assert per_detection == [folder.detection_overlay_path(key, k, "raw", "png") for k in range(len(detections))]
        np.testing.assert_array_equal(decode_image(per_detection[1].read_bytes()),
                                      render_detection_overlay(result.image, detections[1], maps[1]))
        stored, meta = load_maps_npz(reader.attention(key))
        np.testing.assert_array_equal(stored, maps)  # cells stored: exact at the original size
        assert meta["key"] == key and meta["query_index"] == detections.query_index.tolist()
        assert record == detection_record(result.item, detections, category_ids) | {
            "attention": attention_name(key), "overlay": overlay_name(key, "raw", "png")}


def test_reader_finds_keys_of_records_without_a_key_field(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.detection_overlay_path("a__one", 0, "raw", "jpg").parent.mkdir(parents=True)
    folder.overlay_path("a__one", "raw", "jpg").write_bytes(b"jpg")
    folder.attention_path("two").parent.mkdir(parents=True)
    folder.attention_path("two").write_bytes(b"npz")
    (tmp_path / "predictions.jsonl").write_text("")
    reader = RunReader(tmp_path)
    assert reader.image_key({"file": "/data/in/a/one.jpg"}) == "a__one"
    assert reader.image_key({"file": "/data/two.png"}) == "two"
    assert reader.image_key({"file": "/data/three.png"}) is None
    assert reader.image_key({"file": "/data/in/a/one.jpg", "stem": "older"}) == "older"
    assert reader.overlay({"overlay": "../outside.png"}, "a__one") == folder.overlay_path("a__one", "raw", "jpg")
    assert reader.detection_overlays("a__one", 2) == [None, None]
    assert reader.attention("a__one") is None and reader.info() is None and reader.errors() == []


def test_reader_finds_overlays_of_folders_written_before_the_method_names(tmp_path: Path) -> None:
    (tmp_path / "predictions.jsonl").write_text("")
    old = {"overlays/a.png": "combined", "overlays/a/det_0.png": "raw 0", "overlays/a/det_1.jpg": "raw 1",
           "overlays/a/drise/det_0.png": "drise 0"}
    for name, text in old.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    reader = RunReader(tmp_path)
    assert reader.image_key({"file": "/in/a.png"}) == "a"
    assert reader.overlay({}, "a").read_text() == "combined"
    assert [p.read_text() for p in reader.detection_overlays("a", 2)] == ["raw 0", "raw 1"]
    assert [p and p.read_text() for p in reader.detection_overlays("a", 2, "drise")] == ["drise 0", None]
    new = RunFolder(tmp_path).detection_overlay_path("a", 1, "raw", "png", "points")
    new.write_text("points 1")  # a resumed folder: the new name wins over the old one
    assert [p.read_text() for p in reader.detection_overlays("a", 2)] == ["raw 0", "points 1"]


def test_clear_removes_only_predicts_own_outputs(tmp_path: Path) -> None:
    for name in ("run.json", "predictions.jsonl", "errors.jsonl", "detections.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    for name in (".parts", "overlays/k", "attention", "mine"):
        (tmp_path / name).mkdir(parents=True)
    RunFolder(tmp_path).clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]
