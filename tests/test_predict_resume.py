"""Resume after SIGKILL, SIGTERM and a full disk, and torchrun sharding: the run folder ends
byte-identical to an uninterrupted single-process run (run.json aside: it records timing)."""
from __future__ import annotations

import errno
import json
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

import detection.io
from detection.cli import main as cli_main
from detection.engine.stop_signals import StopOnSignals
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
    journal = out / "predictions.jsonl"
    # asserts that the kill came before the run finished
    process, _, lines_at_kill = _signal_mid_run(corpus, out, signal.SIGKILL)
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


def test_stop_on_signals_asks_to_stop_a_second_sigint_stops_now_handlers_restored() -> None:
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with StopOnSignals() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # a second SIGTERM: still finishing the images in flight
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {signum: signal.getsignal(signum) for signum in previous} == previous


def _signal_mid_run(corpus: dict[str, Path], out: Path, signum: int) -> tuple[subprocess.Popen, str, int]:
    """Start the run in a subprocess, send `signum` once 4 images are journalled; returns the
    finished process, its stderr and the number of journal lines it left."""
    process = subprocess.Popen(_command(corpus, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / "predictions.jsonl"
    deadline = time.time() + 240
    sent = False
    while time.time() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 4:
            os.kill(process.pid, signum)
            sent = True
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=240)
    assert sent, "the run finished before the signal could be sent"
    return process, stderr.decode(), journal.read_bytes().count(b"\n")


@pytest.mark.slow
def test_sigterm_finishes_items_in_flight_exits_3_and_rerun_equals_uninterrupted(corpus, reference,
                                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    process, stderr, lines = _signal_mid_run(corpus, out, signal.SIGTERM)
    assert process.returncode == 3, stderr[-3000:]
    assert "interrupted; rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert 4 <= lines < 24  # stopped mid-run, after what was journalled when the signal came
    journal = (out / "predictions.jsonl").read_bytes()
    assert journal.endswith(b"\n")  # a clean stop: only complete lines
    assert all(json.loads(line)["key"] for line in journal.splitlines())
    assert not (out / "detections.json").exists() and not (out / ".lock").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not list(out.rglob("*.tmp"))
    # every journalled image has all of its files (a journal line means "completely done")
    for line in journal.splitlines():
        record = json.loads(line)
        assert (out / record["attention"]).is_file() and (out / record["overlay"]).is_file()

    assert cli_main(_command(corpus, out)[3:]) == 1  # the same command, resumed
    assert _snapshot(out) == reference


@pytest.mark.slow
def test_disk_full_names_the_file_leaves_no_partial_file_and_rerun_resumes(corpus, reference, tmp_path: Path,
                                                                           monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    real_sync = detection.io._sync_file
    calls: list[Path] = []
    failed: list[Path] = []

    def sync_then_disk_full_once(path: Path) -> None:
        calls.append(path)
        if len(calls) == 30 and not failed:  # mid-run: a per-detection overlay or an npz
            failed.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_sync(path)

    monkeypatch.setattr(detection.io, "_sync_file", sync_then_disk_full_once)
    assert cli_main(_command(corpus, out)[3:]) == 3
    stderr = capsys.readouterr().err
    assert failed, "the patched writer was not reached"
    # the temp file was removed, and the message names the file meant, not the temp file
    meant = failed[0].parent / failed[0].name[1:].rsplit(".", 2)[0]
    assert not failed[0].exists() and not meant.exists()
    assert f"no space left on device writing {meant}" in stderr and "Traceback" not in stderr
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()
    assert not (out / "detections.json").exists()
    assert 0 < (out / "predictions.jsonl").read_bytes().count(b"\n") < 24

    monkeypatch.setattr(detection.io, "_sync_file", real_sync)  # space is back
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


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost_merge_to_single_run(corpus, reference, tmp_path: Path) -> None:
    """`torchrun --nnodes 2`: two launcher processes stand in for two hosts sharing the output folder
    (c10d rendezvous on localhost); the merged folder equals the single-process run."""
    import socket

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    out = tmp_path / "out"

    def launcher(is_host: bool) -> subprocess.Popen:
        # is_host: which launcher serves the rendezvous store (on one host both match localhost)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-hosts",
                   "--rdzv_conf", f"is_host={str(is_host).lower()}", "-m", *_command(corpus, out)[2:]]
        return subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    launchers = [launcher(True), launcher(False)]
    try:
        errors = [process.communicate(timeout=240)[1] for process in launchers]
    finally:
        for process in launchers:
            if process.poll() is None:
                process.kill()
    # the launcher of rank 0 passes on its status 1 (the failed input); the other's worker exits 0 (its
    # launcher may report the store's shutdown at the exit barrier: the outputs are what counts)
    codes = [process.returncode for process in launchers]
    assert 1 in codes and set(codes) <= {0, 1}, "\n".join(e[-3000:] for e in errors)
    assert not (out / ".parts").exists()
    assert _snapshot(out) == reference
