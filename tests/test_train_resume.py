"""Crash-safe checkpoints and exact resume: a run SIGKILLed mid-epoch and resumed ends with the
same weights, loss history and evaluations as an uninterrupted run, in fp32 and in bf16 (tiny
config, deterministic mode, subprocesses)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detection.data.synthetic import SynthConfig, generate_dataset
from detection.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, train=12, val=4, seed=3, config=SynthConfig(image_size=64, max_objects=3))
    return root


def _train(dataset: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "detection.cli", "train", "--config", str(REPO / "configs/train/tiny.yaml"),
               "--out", str(out),
               "--set", f"data.train_images={dataset / 'train'}",
               "--set", f"data.train_annotations={dataset / 'annotations/instances_train.json'}",
               "--set", f"data.val_images={dataset / 'val'}",
               "--set", f"data.val_annotations={dataset / 'annotations/instances_val.json'}",
               "--set", "optim.epochs=3", *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def _eval_lines(run: Path) -> list[dict]:
    lines = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in l.items() if k != "elapsed_s"} for l in lines if l["type"] == "eval"]


def _train_lines(run: Path) -> list[dict]:
    """The train records (loss terms, lr, grad norm per step) without wall-clock times."""
    lines = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in l.items() if k != "elapsed_s"} for l in lines if l["type"] == "train"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(dataset, tmp_path, precision):
    # 12 images / batch 4 = 3 steps per epoch, 9 steps; checkpoints every 2 steps.
    straight = _train(dataset, tmp_path / "straight", "--set", f"precision={precision}")
    assert straight.returncode == 0, straight.stderr[-3000:]

    crashed = _train(dataset, tmp_path / "crashed", "--set", f"precision={precision}",
                     "--kill-after-step", "5")  # epoch 1, step 2 of 3
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    state = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, 4, 1)
    assert not (tmp_path / "crashed" / "model").exists()  # it really died before the end
    leftovers = [p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [] or all(p.endswith(".tmp") for p in leftovers)

    resumed = subprocess.run(
        [sys.executable, "-m", "detection.cli", "train", "--out", str(tmp_path / "crashed"), "--resume"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "crashed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    last_a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    last_b = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.pt")
    for name, value in last_a["model"].items():
        assert torch.equal(value, last_b["model"][name]), name
    assert last_a["step"] == last_b["step"] == 9
    assert _eval_lines(tmp_path / "straight") == _eval_lines(tmp_path / "crashed")
    assert last_b["config"]["precision"] == precision
    # every step's loss, terms, lr and gradient norm: the resumed run logs steps 5-9 again
    straight_steps = {r["step"]: r for r in _train_lines(tmp_path / "straight")}
    crashed_steps = {r["step"]: r for r in _train_lines(tmp_path / "crashed")}  # the last record wins
    assert sorted(straight_steps) == sorted(crashed_steps) == list(range(1, 10))
    assert straight_steps == crashed_steps


def test_checkpoint_contents_load_with_weights_only(dataset, tmp_path):
    result = _train(dataset, tmp_path / "run", "--set", "optim.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    # weights_only=True is what load_checkpoint uses; load directly to prove it
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "ema", "epoch", "step", "step_in_epoch",
                "rng", "config", "model_config", "code_version", "best_metric"):
        assert key in state, key
    assert state["ema"] is not None and state["scaler"] is None  # EMA on, fp32 run
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state["config"]["optim"]["epochs"] == 1 and state["model_config"]["num_classes"] == 5
    assert state["code_version"]["package"]
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["best_metric"] is not None
