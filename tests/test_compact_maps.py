"""Maps stored at their information resolution (npz format 2) and overlays at a display size:
round trips against `detection_maps`, the stored geometry, format-1 files, resume refusal, and
overlays equal to rendering the downscaled image with maps made at that size."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.runfolder.versions import MAPS_NPZ_FORMAT, MAPS_NPZ_FORMAT_V1
from detection.attention.maps import cells_to_image, detection_maps, maps_from_cells, query_cell_maps
from detection.runfolder.maps_npz import load_maps_npz, map_metadata, save_maps_npz
from detection.cli import main as cli_main
from detection.runfolder.journal import read_journal
from detection.engine.image_files import OutputOptions
from tests.image_writing import write_like_predict
from detection.render import cell_overlays as overlays
from detection.render.cell_overlays import render_overlays
from detection.engine.predictor import Predictor, PredictorSettings
from detection.runfolder.run_folder import RunFolder
from detection.data.sources import expand_sources
from detection.models.registry import build_model
from detection.models.native import save_model
from detection.data.image_codec import decode_image
from detection.render.overlay import render_detection_overlay, render_overlay, strongest_map
from detection.render.panel import display_size, resize_image
from detection.structures import Detections
from tests.test_maps import make_detections, make_record
from tests.test_sampled import sampled_record


def _detections(query_index, size) -> Detections:
    count = len(query_index)
    boxes = torch.tensor([[2.0 + k, 3.0, 20.0 + k, 30.0] for k in range(count)]).reshape(-1, 4)
    return Detections(size, boxes=boxes, scores=torch.linspace(0.9, 0.5, count), labels=torch.arange(count),
                      query_index=torch.as_tensor(query_index), class_names=[f"c{k}" for k in range(count)])


def _save_record(path, record, image_index, query_index, original_size, **choices):
    cells = query_cell_maps(record, image_index, query_index, heads=choices.get("heads", "mean"),
                            layers=choices.get("layers", "last"))
    meta = map_metadata(record, image_index, **choices)
    save_maps_npz(path, cells, _detections(query_index, original_size), meta["feature_stride"], meta["input_size"],
                  meta)
    return cells, meta


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", ["minmax", "percentile", None])
def test_original_size_reproduces_detection_maps_of_a_padded_dense_batch(tmp_path, normalize):
    record = make_record([(64, 96), (40, 56)], 16, layers=3, heads=2, queries=5, seed=4)
    original = (123, 171)  # image 1 shown larger than its input, non-integer factors
    path = tmp_path / "m.npz"
    cells, _ = _save_record(path, record, 1, [4, 0, 2], original, layers="mean", heads="max", normalize=normalize)
    loaded, meta = load_maps_npz(path, size="original")
    expected = detection_maps(record, 1, [4, 0, 2], original, layers="mean", heads="max", normalize=normalize)
    assert loaded.dtype == np.float32 and loaded.shape == expected.shape == (3, *original)
    np.testing.assert_allclose(loaded, expected, rtol=0, atol=1e-6)
    stored, _ = load_maps_npz(path, size=None)
    np.testing.assert_array_equal(stored, cells.numpy())
    assert stored.shape == (3, 3, 4)  # the valid block of image 1: ceil(40 / 16) x ceil(56 / 16)
    assert meta["format"] == MAPS_NPZ_FORMAT


def test_stored_geometry_is_the_records(tmp_path):
    record = make_record([(64, 96), (40, 56)], 16)
    _save_record(tmp_path / "m.npz", record, 1, [1], (80, 112))
    _, meta = load_maps_npz(tmp_path / "m.npz", size=None)
    assert meta["feature_stride"] == 16
    assert meta["input_size"] == [40, 56]  # the image's pre-padding input, not the batch's
    assert meta["valid_feature_size"] == [3, 4]
    assert meta["padded_feature_size"] == [4, 6]  # the batch grid: the rest was padding
    assert meta["image_size"] == [80, 112]
    assert meta["interpolation"] == "bilinear" and meta["percentiles"] == [1.0, 99.0]


def test_a_sampled_record_round_trips_through_its_level0_grid(tmp_path):
    strides = (8, 16, 32)
    points = {(layer, 1, head, 0, level): [((36.0, 28.0), 0.2 + 0.1 * level), ((4.0, 36.0), 0.05)]
              for layer in range(2) for head in range(2) for level in range(3)}
    record = sampled_record(points, [(64, 96), (40, 56)], strides, layers=2, heads=2)
    path = tmp_path / "s.npz"
    cells, _ = _save_record(path, record, 1, [0], (80, 112))
    loaded, meta = load_maps_npz(path)
    np.testing.assert_allclose(loaded, detection_maps(record, 1, [0], (80, 112)), rtol=0, atol=1e-6)
    assert load_maps_npz(path, size=None)[0].shape == (1, 5, 7)  # level 0's valid cells
    assert meta["attention_kind"] == "sampled" and meta["level_strides"] == [8, 16, 32]


def test_other_sizes_resample_the_cells_once(tmp_path):
    record = make_record([(64, 96)], 16, seed=7)
    path = tmp_path / "m.npz"
    _save_record(path, record, 0, [0, 3], (300, 450))
    small, _ = load_maps_npz(path, size=(60, 90))
    # a display size of the same image is just another original size: same cells, same geometry
    np.testing.assert_allclose(small, detection_maps(record, 0, [0, 3], (60, 90)), rtol=0, atol=1e-6)
    # nearest interpolation: cell (y, x) paints exactly the pixels whose centres fall in it
    one_hot = np.zeros((1, 4, 6), np.float32)
    one_hot[0, 1, 2] = 5.0
    detections = make_detections(1, size=(32, 48))
    save_maps_npz(tmp_path / "n.npz", one_hot, detections, 16, (64, 96), {"interpolation": "nearest"})
    painted, _ = load_maps_npz(tmp_path / "n.npz", size=(32, 48))  # half the input size: cells of 8 px
    expected = np.zeros((32, 48), np.float32)
    expected[8:16, 16:24] = 1.0
    np.testing.assert_array_equal(painted[0], expected)
    with pytest.raises(ValueError, match="size must be"):
        load_maps_npz(path, size="half")
    with pytest.raises(ValueError, match="positive"):
        load_maps_npz(path, size=(0, 5))


# -- format 1 ------------------------------------------------------------------------------------
def _write_v1(path: Path, maps: np.ndarray, detections: Detections) -> None:
    """A format-1 file as the previous version wrote it (float16 full-resolution maps)."""
    document = {"format": MAPS_NPZ_FORMAT_V1, "num_maps": len(maps), "image_size": list(detections.image_size),
                "boxes": detections.boxes.tolist(), "scores": detections.scores.tolist(),
                "labels": detections.labels.tolist(), "query_index": detections.query_index.tolist(),
                "class_names": list(detections.class_names), "normalize": "minmax", "feature_stride": 16}
    payload = np.frombuffer(json.dumps(document).encode("utf-8"), dtype=np.uint8)
    np.savez_compressed(path, maps=maps.astype(np.float16), meta_json=payload)


def test_format_1_files_stay_readable(tmp_path):
    rng = np.random.default_rng(1)
    maps = rng.random((2, 40, 60)).astype(np.float32)
    path = tmp_path / "v1.npz"
    _write_v1(path, maps, make_detections(2))
    stored = maps.astype(np.float16).astype(np.float32)
    for size in (None, "original", (40, 60)):
        loaded, meta = load_maps_npz(path, size=size)
        np.testing.assert_array_equal(loaded, stored)
        assert meta["format"] == MAPS_NPZ_FORMAT_V1 and meta["query_index"] == [0, 7]
    resized, _ = load_maps_npz(path, size=(20, 30))
    np.testing.assert_array_equal(resized, cells_to_image(stored, 1, (40, 60), (20, 30)))
    np.testing.assert_allclose(resized[:, 3, 5], stored[:, 6:8, 10:12].mean(axis=(1, 2)), atol=1e-6)


def test_unknown_or_inconsistent_files_are_refused_by_name(tmp_path):
    detections = make_detections(1)
    path = tmp_path / "future.npz"
    payload = np.frombuffer(json.dumps({"format": "detr-attn-maps/9", "num_maps": 1}).encode(), dtype=np.uint8)
    np.savez_compressed(path, cells=np.zeros((1, 3, 4), np.float32), meta_json=payload)
    with pytest.raises(ValueError, match=r"future\.npz: unknown maps format 'detr-attn-maps/9'"):
        load_maps_npz(path)
    mixed = tmp_path / "mixed.npz"  # format 1 says full-resolution maps, the file holds cells
    payload = np.frombuffer(json.dumps({"format": MAPS_NPZ_FORMAT_V1, "num_maps": 1}).encode(), dtype=np.uint8)
    np.savez_compressed(mixed, cells=np.zeros((1, 3, 4), np.float32), meta_json=payload)
    with pytest.raises(ValueError, match="mixed.npz: unknown maps format"):
        load_maps_npz(mixed)
    good = tmp_path / "good.npz"
    save_maps_npz(good, np.ones((1, 3, 4), np.float32), detections, 16, (40, 60))
    with np.load(good) as archive:
        meta = json.loads(archive["meta_json"].tobytes())
    meta["valid_feature_size"] = [3, 5]
    np.savez_compressed(good, cells=np.ones((1, 3, 4), np.float32),
                        meta_json=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"good.npz: cells \(3, 4\) disagree with valid_feature_size"):
        load_maps_npz(good)


# -- overlays at a display size -----------------------------------------------------------------------
def test_display_size_only_scales_down_and_keeps_the_long_side():
    assert display_size((3000, 4000), 1600) == (1200, 1600)
    assert display_size((4000, 3000), 1600) == (1600, 1200)
    assert display_size((101, 333), 100) == (30, 100)  # round(101 * 100 / 333) = 30
    assert display_size((90, 120), 1600) == (90, 120)
    assert display_size((3000, 4000), None) == (3000, 4000)


def test_detections_resized_scale_boxes_per_axis():
    detections = _detections([3, 1], (100, 200))
    resized = detections.resized((50, 40))
    assert resized.image_size == (50, 40)
    np.testing.assert_allclose(resized.boxes.numpy(), detections.boxes.numpy() * np.array([0.2, 0.5, 0.2, 0.5]),
                               rtol=1e-6)
    assert resized.query_index.tolist() == [3, 1] and resized.class_names == ["c0", "c1"]


@pytest.mark.parametrize("pixels_per_chunk", [1, 1 << 24])  # one detection per chunk / all at once
def test_overlays_are_the_downscaled_image_with_maps_made_at_that_size(monkeypatch, pixels_per_chunk):
    monkeypatch.setattr(overlays, "MAP_PIXELS_PER_CHUNK", pixels_per_chunk)
    record = make_record([(64, 96)], 16, seed=2, queries=5)
    original = (300, 450)
    image = np.random.default_rng(3).integers(0, 256, (*original, 3), dtype=np.uint8)
    queries = [0, 2, 4]
    detections = _detections(queries, original)
    cells = query_cell_maps(record, 0, queries)
    meta = map_metadata(record, 0)
    for long_side, size in ((200, (133, 200)), (None, original)):
        drawn = list(render_overlays(image, detections, cells, meta, OutputOptions(overlay_size=long_side)))
        assert [k for k, _ in drawn] == [0, 1, 2, None]
        shown = resize_image(image, size) if long_side else image
        assert shown.shape[:2] == size
        shown_detections = detections.resized(size)
        maps = detection_maps(record, 0, queries, size)
        np.testing.assert_array_equal(drawn[-1][1], render_overlay(shown, shown_detections, maps))
        for k in range(3):
            np.testing.assert_array_equal(drawn[k][1], render_detection_overlay(shown, shown_detections[k], maps[k]))
    # the maps at a display size are the cells resampled straight to it
    np.testing.assert_allclose(maps_from_cells(cells, 16, (64, 96), (133, 200)),
                               detection_maps(record, 0, queries, (133, 200)), rtol=0, atol=1e-6)


def test_strongest_map_folded_in_chunks_is_max_and_first_argmax():
    rng = np.random.default_rng(4)
    maps = np.round(rng.random((7, 5, 6)).astype(np.float32) * 4) / 4  # many ties
    folded = None
    for start in range(0, 7, 3):
        folded = strongest_map(maps[start : start + 3], folded, offset=start)
    np.testing.assert_array_equal(folded[0], maps.max(axis=0))
    np.testing.assert_array_equal(folded[1], maps.argmax(axis=0))


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """One 150x200 image predicted by a random detr-tiny (every query a detection, attention kept)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(8)
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(folder / "im.png")
    torch.manual_seed(0)
    model = build_model("detr-tiny").eval()
    predictor = Predictor(model, PredictorSettings(score_threshold=0.0, cross_attention=True, keep_images=True))
    return model, list(predictor.run(expand_sources([str(folder)])))[0]


def test_written_overlays_at_a_display_size(tmp_path, predicted):
    model, result = predicted
    folder = RunFolder(tmp_path / "out")
    folder.open()
    options = OutputOptions(overlays=True, save_attention=True, overlay_size=120)
    write_like_predict(folder, result, options, model)
    folder.close()
    key, detections = result.item.key, result.detections
    size = (90, 120)  # long side 120 of 150 x 200
    shown = resize_image(result.image, size)
    shown_detections = detections.resized(size)
    maps = detection_maps(result.attention, 0, detections.query_index, size)
    np.testing.assert_array_equal(decode_image(folder.overlay_path(key, "raw", "png").read_bytes()),
                                  render_overlay(shown, shown_detections, maps))
    for k in (0, len(detections) - 1):
        np.testing.assert_array_equal(decode_image(folder.detection_overlay_path(key, k, "raw", "png").read_bytes()),
                                      render_detection_overlay(shown, shown_detections[k], maps[k]))
    # the npz does not depend on the overlay size: cells, and the original-size maps from them
    stored, _ = load_maps_npz(folder.attention_path(key))
    np.testing.assert_array_equal(stored, detection_maps(result.attention, 0, detections.query_index,
                                                         detections.image_size))


# -- the run folder --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    save_model(build_model("detr-tiny").eval(), folder, source="random init (tests)")
    images = folder / "in"
    images.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(images / "a.png")
    return folder


def _predict(tiny_dir: Path, out: Path, *extra: str) -> int:
    return cli_main(["predict", str(tiny_dir / "in"), "--model", str(tiny_dir), "--out", str(out),
                     "--score-threshold", "0.0", "--device", "cpu", "--workers", "0", "--quiet", *extra])


def test_a_folder_of_format_1_maps_is_refused_on_resume(tmp_path, tiny_dir, capsys):
    out = tmp_path / "run"
    assert _predict(tiny_dir, out, "--save-attention") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"]["maps_format"] == MAPS_NPZ_FORMAT
    del run["fingerprint"]["maps_format"]  # as the previous version wrote it
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert _predict(tiny_dir, out, "--save-attention") == 2
    message = capsys.readouterr().err
    assert "detr-attn-maps/1" in message and MAPS_NPZ_FORMAT in message and "--overwrite" in message
    assert _predict(tiny_dir, out, "--save-attention", "--overwrite") == 0
    record = read_journal(out / "predictions.jsonl")[0]
    maps, _ = load_maps_npz(out / record["attention"])
    assert maps.shape == (len(record["detections"]), 120, 160)


def test_overlay_size_is_part_of_the_fingerprint(tmp_path, tiny_dir, capsys):
    out = tmp_path / "run"
    assert _predict(tiny_dir, out, "--overlays", "--overlay-size", "80") == 0
    record = read_journal(out / "predictions.jsonl")[0]
    assert decode_image((out / record["overlay"]).read_bytes()).shape == (60, 80, 3)
    assert json.loads((out / "run.json").read_text())["fingerprint"]["overlay_size"] == 80
    capsys.readouterr()
    assert _predict(tiny_dir, out, "--overlays", "--overlay-size", "original") == 2
    assert "overlay_size" in capsys.readouterr().err
    assert _predict(tiny_dir, tmp_path / "full", "--overlays", "--overlay-size", "original") == 0
    record = read_journal(tmp_path / "full" / "predictions.jsonl")[0]
    assert decode_image((tmp_path / "full" / record["overlay"]).read_bytes()).shape == (120, 160, 3)
    with pytest.raises(SystemExit):
        _predict(tiny_dir, tmp_path / "bad", "--overlays", "--overlay-size", "0")
