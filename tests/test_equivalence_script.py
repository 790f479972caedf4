"""scripts/redesign_equivalence.py's comparison: equal folders pass, and each kind of change is named exactly."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "redesign_equivalence.py"


def _script():
    spec = importlib.util.spec_from_file_location("redesign_equivalence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_folder(root: Path, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    (root / "attention").mkdir(parents=True)
    (root / "overlays").mkdir()
    meta = np.frombuffer(json.dumps({"file": "a.png", "stride": 32}).encode(), dtype=np.uint8)
    np.savez(root / "attention" / "a.npz", cells=rng.random((2, 3, 4), dtype=np.float32), meta_json=meta)
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(root / "overlays" / "a.png")
    (root / "predictions.jsonl").write_text('{"file": "a.png"}\n')
    (root / "run.json").write_text(json.dumps({"fingerprint": {"model": "demo"}, "timing": {"s": seconds}}))
    return root


def test_equal_folders_compare_equal_and_timing_is_ignored(tmp_path):
    script = _script()
    old, new = _run_folder(tmp_path / "old", 1.0), _run_folder(tmp_path / "new", 2.0)
    assert script.compare_folders("predict", old, new) == ([], 4)
    assert script.compare_folders("resumed", old, new, run_json="untimed") == ([], 4)


def test_each_change_is_named(tmp_path):
    script = _script()
    old, new = _run_folder(tmp_path / "old", 1.0), _run_folder(tmp_path / "new", 1.0)
    overlay = new / "overlays" / "a.png"
    pixels = np.array(Image.open(overlay))
    pixels[4, 1, 2] ^= 1
    Image.fromarray(pixels).save(overlay)
    with np.load(new / "attention" / "a.npz") as stored:
        cells, meta = stored["cells"].copy(), json.loads(stored["meta_json"].tobytes())
    cells[1, 2, 3] = np.nextafter(cells[1, 2, 3], np.float32(2))
    meta["stride"] = 16
    np.savez(new / "attention" / "a.npz", cells=cells,
             meta_json=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    (new / "run.json").write_text(json.dumps({"fingerprint": {"model": "other"}, "timing": {"s": 1.0}}))
    (new / "extra.txt").write_text("x")

    problems, checked = script.compare_folders("predict", old, new)

    assert checked == 4
    assert [(name, detail.split(":")[0]) for _, name, detail in problems] == [
        ("attention/a.npz", "[cells] 1 of 24 values differ, first at (1, 2, 3)"),
        ("attention/a.npz", "[meta_json] /stride"),
        ("extra.txt", "only in new"),
        ("overlays/a.png", "1 of 30 pixels differ, first at (y=4, x=1)"),
        ("run.json", "/fingerprint/model"),
    ]


def test_planted_overlay_is_one_pixel(tmp_path):
    script = _script()
    run = tmp_path / "run"
    (run / "overlays" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(run / "overlays" / "a" / "det_0.relevance.png")
    name, expected = script.plant(run, "overlay")
    # reported under its name in the baseline's layout (overlays/<key>/<method>/det_<k>)
    assert (name, expected) == ("overlays/a/relevance/det_0.png", "1 of 24 pixels differ, first at (y=2, x=3)")
    assert np.asarray(Image.open(run / "overlays" / "a" / "det_0.relevance.png"))[2, 3].tolist() == [255, 255, 255]


def test_overlays_are_compared_under_their_baseline_names():
    script = _script()
    assert [script.old_layout_name(name) for name in (
        "overlays/k.raw.png", "overlays/k/det_2.raw.jpg", "overlays/k/det_0.raw-points.png",
        "overlays/k/det_1.drise.png", "overlays/k.png", "overlays/k/drise/det_1.png", "attention/k.npz")] == [
        "overlays/k.png", "overlays/k/det_2.jpg", "overlays/k/det_0.png", "overlays/k/drise/det_1.png",
        "overlays/k.png", "overlays/k/drise/det_1.png", "attention/k.npz"]


def test_intended_changes_are_only_d_rise_outputs_and_aucs_compare_within_tolerance():
    script = _script()
    assert [script.intended(name) for name in (
        "attention/drise/a.npz", "overlays/a/drise/det_0.png", "coco_masks_drise.json", "drise/a.npz",
        "attention/relevance/a.npz", "overlays/a.raw.png", "attention/a.npz")] == [True] * 4 + [False] * 3
    old = {"attention": {"last/mean": {"deletion_auc": 0.25, "pointing_game": 0.9},
                         "gaussian-baseline": {"deletion_auc": 0.25}}}
    near = {"attention": {"last/mean": {"deletion_auc": 0.2504, "pointing_game": 0.9},
                          "gaussian-baseline": {"deletion_auc": 0.28}}}
    assert script.auc_difference(old, near) is None and old == {"attention": {"last/mean": {"pointing_game": 0.9},
                                                                              "gaussian-baseline": {}}}
    far = {"attention": {"last/mean": {"deletion_auc": 0.26}}}
    assert script.auc_difference({"attention": {"last/mean": {"deletion_auc": 0.25}}}, far) == \
        "/attention/last/mean/deletion_auc: 0.25 vs 0.26 (beyond 0.001)"
