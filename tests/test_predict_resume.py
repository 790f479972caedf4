"""Resume after SIGKILL and torchrun sharding: the run folder ends byte-identical to an
uninterrupted single-process run (run.json aside: it records timing)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.cli import main as cli_main
from detection.models.registry import build_model, save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Float results depend on the thread count (reduction splits); torchrun workers and the
    subprocesses here run with OMP_NUM_THREADS=1, so in-process runs use one thread too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    save_model(build_model("detr-tiny").eval(), root / "model", source="random init (tests)")
    rng = np.random.default_rng(21)
    images = root / "images"
    for index in range(24):
        sub = images / ("a" if index % 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        height, width = [(60, 80), (80, 60), (64, 64)][index % 3]
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(sub / f"im{index:03d}.png")
    (images / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {"root": root, "model": root / "model", "images": images}


def _command(corpus: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "detection.cli", "predict", str(corpus["images"]), "--model", str(corpus["model"]),
            "--out", str(out), "--score-threshold", "0.3", "--device", "cpu", "--precision", "fp32",
            "--batch-size", "2", "--workers", "0", "--save-attention", "--overlays", "--quiet", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _content(path: Path) -> bytes:
    """File bytes; for npz the stored arrays (zip headers carry write timestamps)."""
    if path.suffix != ".npz":
        return path.read_bytes()
    with np.load(path, allow_pickle=False) as archive:
        return b"".join(name.encode() + archive[name].tobytes() for name in sorted(archive.files))


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every output file except run.json (timing), by relative path."""
    return {str(p.relative_to(out)): _content(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "run.json"}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert cli_main(_command(corpus, out)[3:]) == 1  # broken.png fails, everything else succeeds
    snapshot = _snapshot(out)
    assert snapshot["errors.jsonl"].count(b"\n") == 1
    assert snapshot["predictions.jsonl"].count(b"\n") == 24
    assert any(name.startswith("attention/") for name in snapshot)
    assert any(name.startswith("overlays/") and name.count("/") == 2 for name in snapshot)  # per-detection
    return snapshot


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(corpus, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen(_command(corpus, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / "predictions.jsonl"
    deadline = time.time() + 240
    lines_at_kill = None
    while time.time() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 4:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            lines_at_kill = journal.read_bytes().count(b"\n")
            break
        time.sleep(0.02)
    assert lines_at_kill is not None, "the run finished before it could be killed"
    assert process.returncode == -signal.SIGKILL
    assert lines_at_kill < 24  # killed mid-run
    assert not (out / "detections.json").exists()
    # a kill in the middle of an append leaves a partial line; simulate the worst case
    with open(journal, "ab") as handle:
        handle.write(b'{"file": "half a rec')
    (out / "overlays" / ".im_left_behind.png.abc.tmp").write_bytes(b"partial")

    assert cli_main(_command(corpus, out)[3:]) == 1  # the same command, resumed
    assert _snapshot(out) == reference

    # rerunning a finished run changes nothing
    assert cli_main(_command(corpus, out)[3:]) == 1
    assert _snapshot(out) == reference


@pytest.mark.slow
def test_torchrun_two_processes_merge_to_single_run(corpus, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", *_command(corpus, out)[2:]]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    # rank 0 reports the failed input with status 1, which torchrun passes on as a failure
    assert done.returncode == 1, done.stderr[-3000:]
    assert not (out / ".parts").exists()
    assert _snapshot(out) == reference
