"""Batch engine: sources, batch == single, bad inputs, run folder outputs, EXIF alignment, video.

Model: the `detr-tiny` config with seeded random weights, score threshold 0 so every query is
a detection (random weights give no confident ones). Resume-after-kill and torchrun tests are
in tests/test_predict_resume.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detection.cli import main as cli_main
from detection.data.images import load_image
from detection.data.preprocess import image_to_input, pad_batch
from detection.runfolder.journal import read_journal, repair_journal
from detection.engine.planning import plan_batches, probe_sizes, shard_plan
from detection.runfolder.records import detection_record
from detection.engine.predictor import Predictor, PredictorSettings
from detection.data.sources import expand_sources
from detection.models.contract import PreprocessSpec
from detection.models.registry import build_model, save_model
from detection.postprocess import postprocess


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("detr-tiny").eval()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_model) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    save_model(tiny_model, folder, source="random init (tests)")
    return folder


def _write_images(folder: Path, sizes, seed: int = 0, ext: str = "png") -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (height, width) in enumerate(sizes):
        path = folder / f"img{index:02d}.{ext}"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _by_query(detections):
    order = torch.argsort(detections.query_index)
    return detections.boxes[order], detections.scores[order], detections.query_index[order]


# -- sources ------------------------------------------------------------------------------
def test_expand_files_folders_globs_lists(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _write_images(root / "a", [(8, 8), (8, 8)])
    _write_images(root / "b" / "deep", [(8, 8)], ext="jpg")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    _write_images(root / ".hidden", [(8, 8)])
    items = expand_sources([str(root)])
    assert [it.key for it in items] == ["a__img00", "a__img01", "b__deep__img00"]
    assert [it.image_id for it in items] == [1, 2, 3]

    globbed = expand_sources([str(root / "**" / "*.jpg")])
    assert [it.key for it in globbed] == ["b__deep__img00"]

    listing = tmp_path / "list.txt"
    listing.write_text("# comment\ndata/a/img01.png\n\ndata/b\nmissing.png\n")
    listed = expand_sources([f"@{listing}"])
    assert [(it.key, it.error) for it in listed] == [
        ("img01", None), ("deep__img00", None), ("missing", "file not found")]

    # the same file via two routes is kept once; a repeated stem gets a suffix
    mixed = expand_sources([str(root / "a" / "img00.png"), str(root / "a"), str(root / "b" / "deep" / "img00.jpg")])
    assert [it.key for it in mixed] == ["img00", "img01", "img00~2"]
    assert expand_sources([str(tmp_path / "none*.png")])[0].error.startswith("glob pattern matched no")


def test_plan_exact_groups_equal_shapes_and_shards(tmp_path: Path) -> None:
    sizes = [(120, 160), (150, 100), (120, 160), (120, 160), (150, 100), (64, 64)]
    _write_images(tmp_path, sizes)
    items = probe_sizes(expand_sources([str(tmp_path)]))
    plan = plan_batches(items, batch_size=2, preprocess=PreprocessSpec.shortest_edge(128, 192), mode="exact")
    assert [[it.image_id for it in b.items] for b in plan] == [[1, 3], [2, 5], [4], [6]]
    for batch in plan:
        assert len(set(batch.input_sizes)) == 1
    padded = plan_batches(items, batch_size=3, preprocess=PreprocessSpec.shortest_edge(128, 192), mode="padded")
    assert sorted(it.image_id for b in padded for it in b.items) == [1, 2, 3, 4, 5, 6]
    # shards are disjoint and cover the plan
    shards = [shard_plan(plan, r, 3) for r in range(3)]
    ids = [it.image_id for s in shards for b in s for it in b.items]
    assert sorted(ids) == [1, 2, 3, 4, 5, 6] and len(ids) == 6


# -- numbers ------------------------------------------------------------------------------
def test_predictor_matches_reference_pipeline(tmp_path: Path, tiny_model) -> None:
    """Engine output == load_image -> image_to_input -> model -> postprocess by hand."""
    paths = _write_images(tmp_path, [(120, 160), (90, 200)], seed=3)
    predictor = Predictor(tiny_model, PredictorSettings(device="cpu", precision="fp32", batch_size=1, score_threshold=0.0, fold_bn=False, channels_last=False))
    results = {r.item.file: r for r in predictor.run([str(p) for p in paths])}
    config = tiny_model.config
    for path in paths:
        loaded = load_image(path)
        images, mask = pad_batch([image_to_input(loaded.rgb, config.min_size, config.max_size)])
        with torch.no_grad():
            outputs = tiny_model(images, mask)
        expected = postprocess(outputs, [loaded.original_size], config.class_names, 0.0)[0]
        got = results[str(path)].detections
        assert got.image_size == loaded.original_size
        torch.testing.assert_close(got.boxes, expected.boxes, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=1e-6)
        assert got.query_index.tolist() == expected.query_index.tolist()


def test_exact_batching_equals_single(tmp_path: Path, tiny_model) -> None:
    """Same-shape images batched by 4 give the detections and maps of batch size 1."""
    from detection.attention.maps import detection_maps

    paths = [str(p) for p in _write_images(tmp_path, [(120, 160)] * 4 + [(100, 150)] * 2, seed=5)]
    single = {r.item.key: r for r in Predictor(tiny_model, PredictorSettings(batch_size=1, score_threshold=0.0, cross_attention=True)).run(paths)}
    batched = {r.item.key: r for r in Predictor(tiny_model, PredictorSettings(batch_size=4, score_threshold=0.0, cross_attention=True)).run(paths)}
    assert single.keys() == batched.keys() and len(single) == 6
    for key, one in single.items():
        many = batched[key]
        assert many.attention.decoder_cross.shape[1] == 1  # this image's record only
        assert one.detections.query_index.tolist() == many.detections.query_index.tolist()
        # float32 reduction order differs between batch sizes: agreement to ~1e-5 px
        torch.testing.assert_close(one.detections.boxes, many.detections.boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(one.detections.scores, many.detections.scores, rtol=0, atol=1e-6)
        maps_one = detection_maps(one.attention, 0, one.detections.query_index, one.detections.image_size)
        maps_many = detection_maps(many.attention, 0, many.detections.query_index, many.detections.image_size)
        np.testing.assert_allclose(maps_one, maps_many, rtol=0, atol=1e-4)


def test_padded_batching_close_to_single(tmp_path: Path, tiny_model) -> None:
    """Padded batches of mixed sizes: same queries, boxes within 0.5 px, scores within 1e-3,
    maps of the original size that agree within 0.02 (stated tolerance for padded mode)."""
    from detection.attention.maps import detection_maps

    sizes = [(120, 160), (120, 170), (118, 160), (100, 150), (120, 180), (90, 160)]
    paths = [str(p) for p in _write_images(tmp_path, sizes, seed=7)]
    single = {r.item.key: r for r in Predictor(tiny_model, PredictorSettings(batch_size=1, score_threshold=0.0, cross_attention=True)).run(paths)}
    padded_predictor = Predictor(tiny_model, PredictorSettings(batch_size=6, batching="padded", score_threshold=0.0, cross_attention=True))
    padded = {r.item.key: r for r in padded_predictor.run(paths)}
    padded_inputs = {tuple(r.attention.input_size) for r in padded.values()}
    assert len(padded_inputs) == 1  # one padded batch
    assert any(tuple(r.attention.input_size) != tuple(padded[k].attention.input_size) for k, r in single.items())
    for key, one in single.items():
        many = padded[key]
        boxes_one, scores_one, queries_one = _by_query(one.detections)
        boxes_many, scores_many, queries_many = _by_query(many.detections)
        assert queries_one.tolist() == queries_many.tolist()
        assert (boxes_one - boxes_many).abs().max() <= 0.5
        assert (scores_one - scores_many).abs().max() <= 1e-3
        maps_one = detection_maps(one.attention, 0, queries_one, one.detections.image_size)
        maps_many = detection_maps(many.attention, 0, queries_many, many.detections.image_size)
        assert maps_many.shape == maps_one.shape == (len(queries_one), *sizes[int(key[3:])])
        assert np.abs(maps_one - maps_many).max() <= 0.02


def test_exif_rotated_file_gives_the_upright_detections(tmp_path: Path, tiny_model) -> None:
    """An EXIF orientation-6 PNG and its upright twin: identical pixels, so identical boxes,
    reported in the displayed (rotated) frame."""
    rng = np.random.default_rng(11)
    upright = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png", exif=exif.tobytes())
    assert Image.open(tmp_path / "rotated.png").size == (100, 150)  # stored W x H is swapped
    results = {r.item.key: r for r in Predictor(tiny_model, PredictorSettings(score_threshold=0.0)).run(
        [str(tmp_path / "upright.png"), str(tmp_path / "rotated.png")])}
    a, b = results["upright"].detections, results["rotated"].detections
    assert a.image_size == b.image_size == (100, 150)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=0)
    assert a.query_index.tolist() == b.query_index.tolist()


def test_workers_do_not_change_results(tmp_path: Path, tiny_model) -> None:
    paths = [str(p) for p in _write_images(tmp_path, [(120, 160), (150, 100), (120, 160), (64, 64)], seed=2)]
    inline = {r.item.key: r for r in Predictor(tiny_model, PredictorSettings(batch_size=2, num_workers=0, score_threshold=0.0)).run(paths)}
    pooled = {r.item.key: r for r in Predictor(tiny_model, PredictorSettings(batch_size=2, num_workers=2, score_threshold=0.0)).run(paths)}
    assert inline.keys() == pooled.keys()
    for key in inline:
        assert torch.equal(inline[key].detections.boxes, pooled[key].detections.boxes)


# -- video --------------------------------------------------------------------------------
def _write_video(path: Path, frames: int, size=(96, 128)) -> bool:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size[1], size[0]))
    if not writer.isOpened():
        return False
    rng = np.random.default_rng(0)
    for index in range(frames):
        frame = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        cv2.putText(frame, str(index), (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 3)
        writer.write(frame)
    writer.release()
    return path.exists() and path.stat().st_size > 0


def test_video_frames_sampled_and_identified(tmp_path: Path, tiny_model) -> None:
    video = tmp_path / "clip.avi"
    if not _write_video(video, 10):
        pytest.skip("OpenCV cannot write MJPG video here")
    items = expand_sources([str(video)], video_stride=3)
    assert [(it.key, it.frame_index) for it in items] == [
        ("clip__frame000000", 0), ("clip__frame000003", 3), ("clip__frame000006", 6), ("clip__frame000009", 9)]
    # reference: the same frames decoded by OpenCV one by one, saved losslessly
    capture = cv2.VideoCapture(str(video))
    decoded = []
    for index in range(10):
        ok, frame = capture.read()
        assert ok
        if index % 3 == 0:
            path = tmp_path / f"frame{index}.png"
            cv2.imwrite(str(path), frame)
            decoded.append(str(path))
    capture.release()
    predictor = Predictor(tiny_model, PredictorSettings(batch_size=2, num_workers=1, score_threshold=0.0))
    video_results = sorted((r for r in predictor.run(items)), key=lambda r: r.item.frame_index)
    frame_results = {r.item.file: r for r in predictor.run(decoded)}
    assert [r.error for r in video_results] == [None] * 4
    for result, path in zip(video_results, decoded):
        expected = frame_results[path].detections
        torch.testing.assert_close(result.detections.boxes, expected.boxes, rtol=0, atol=1e-4)
        record = detection_record(result.item, result.detections, tiny_model.config.category_ids)
        assert record["frame_index"] == result.item.frame_index and record["file"] == str(video)


# -- the CLI and the run folder -------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but which holds almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_corpus(folder: Path) -> dict[str, str]:
    """Bad files and the words their error reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    buffer = folder / "whole.png"
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(buffer)
    data = buffer.read_bytes()
    buffer.unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "bomb.png").write_bytes(_png_header_only(9000, 9000))
    return {"empty": "zero-byte", "text": "not an image", "truncated": "truncated", "bomb": "decompression bomb"}


def test_cli_bad_inputs_never_stop_the_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    good = _write_images(tmp_path / "in", [(120, 160), (90, 120), (120, 160)], seed=4)
    expected_errors = _bad_corpus(tmp_path / "in" / "bad")
    unicode_dir = tmp_path / "in" / "ünïcødé"
    _write_images(unicode_dir, [(50, 60)], seed=9)
    out = tmp_path / "out"
    status = cli_main(["predict", str(tmp_path / "in"), str(tmp_path / "missing.png"), "--model", str(tiny_model_dir),
                       "--out", str(out), "--score-threshold", "0.0", "--device", "cpu", "--precision", "fp32",
                       "--batch-size", "2", "--workers", "2", "--quiet"])
    assert status == 1  # some inputs failed, all others processed
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    reasons = {e["key"]: e["reason"] for e in errors}
    assert set(reasons) == {f"bad__{k}" for k in expected_errors} | {"missing"}
    for name, words in expected_errors.items():
        assert words in reasons[f"bad__{name}"]
    predictions = read_journal(out / "predictions.jsonl")
    assert [p["key"] for p in predictions] == ["img00", "img01", "img02", "ünïcødé__img00"]
    assert [p["image_id"] for p in predictions] == sorted(p["image_id"] for p in predictions)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["counts"] == {"images": 4, "errors": 5, "detections": 40}
    # COCO results: xywh pixels, category ids through the model config
    coco = json.loads((out / "detections.json").read_text())
    assert len(coco) == 40
    first = predictions[0]
    det = first["detections"][0]
    entry = next(c for c in coco if c["image_id"] == first["image_id"] and c["query_index"] == det["query_index"])
    assert entry["bbox"] == det["bbox"] and entry["file_name"] == str(good[0])
    assert entry["category_id"] == [1, 2, 3][det["label"]] and entry["class_name"] == det["class_name"]
    assert first["width"] == 160 and first["height"] == 120


def test_cli_usage_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    _write_images(tmp_path / "in", [(64, 64)])
    base = ["predict", str(tmp_path / "in"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"),
            "--device", "cpu", "--workers", "0", "--quiet"]
    assert cli_main(["predict", "--out", str(tmp_path / "o2"), "--model", str(tiny_model_dir)]) == 2  # no inputs
    assert cli_main(base[:2] + ["--model", str(tmp_path / "no_model_here")] + base[4:]) == 2
    assert cli_main(base + ["--score-threshold", "0.5"]) == 0
    # same folder, other settings: refused (resuming would mix results)
    assert cli_main(base + ["--score-threshold", "0.1"]) == 2
    assert cli_main(base + ["--score-threshold", "0.1", "--overwrite"]) == 0
    # other weights under the same model path (e.g. retrained): refused too
    torch.manual_seed(1)
    save_model(build_model("detr-tiny").eval(), tmp_path / "model_v")
    command = base[:2] + ["--model", str(tmp_path / "model_v"), "--out", str(tmp_path / "out_v")] + base[6:]
    assert cli_main(command) == 0
    torch.manual_seed(2)
    save_model(build_model("detr-tiny").eval(), tmp_path / "model_v")
    assert cli_main(command) == 2


def test_cli_overlays_and_attention_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    from detection.runfolder.maps_npz import load_maps_npz

    _write_images(tmp_path / "in" / "sub", [(120, 160)], seed=6)
    out = tmp_path / "out"
    status = cli_main(["predict", str(tmp_path / "in"), "--model", str(tiny_model_dir), "--out", str(out),
                       "--score-threshold", "0.3", "--device", "cpu", "--workers", "0", "--overlays",
                       "--save-attention", "--format", "jpg", "--quiet"])
    assert status == 0
    record = read_journal(out / "predictions.jsonl")[0]
    count = len(record["detections"])
    assert count > 0 and record["key"] == "sub__img00"
    maps, meta = load_maps_npz(out / "attention" / "sub__img00.npz")
    assert maps.shape == (count, 120, 160)
    assert meta["query_index"] == [d["query_index"] for d in record["detections"]]
    assert meta["file"] == record["file"] and meta["layers"] == "last"
    combined = cv2.imread(str(out / "overlays" / "sub__img00.raw.jpg"))
    assert combined.shape == (120, 160, 3)
    for k in range(count):
        assert cv2.imread(str(out / "overlays" / "sub__img00" / f"det_{k}.raw.jpg")).shape == (120, 160, 3)
    assert not list(out.rglob("*.tmp"))


def test_repair_journal_drops_partial_line(tmp_path: Path) -> None:
    journal = tmp_path / "p.jsonl"
    journal.write_bytes(b'{"key": "a"}\n{"key": "b"}\n{"key": "c", "detec')
    assert [r["key"] for r in read_journal(journal)] == ["a", "b"]
    assert repair_journal(journal) == len(b'{"key": "c", "detec')
    assert journal.read_bytes() == b'{"key": "a"}\n{"key": "b"}\n'
    assert repair_journal(journal) == 0


def test_infer_gpu_wrapper_defaults_yield_to_user_options() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_gpu", Path(__file__).resolve().parents[1] / "scripts" / "infer_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = module.with_gpu_defaults(["a.jpg", "--out", "o", "--batch-size=4", "--device", "cpu"])
    assert argv[:5] == ["a.jpg", "--out", "o", "--batch-size=4", "--device"]
    assert argv.count("--device") == 1 and "--batch-size" not in argv
    assert argv[argv.index("--precision") + 1] == "bf16" and argv[argv.index("--batching") + 1] == "padded"
