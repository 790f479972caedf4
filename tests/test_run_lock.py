"""One live predict run per folder: the lock file (runfolder.lock, named by runfolder),
its refusal message, the take-over of a dead process's lock, and `--out` naming a file."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.cli import main as cli_main
from detection.runfolder.layout import LOCK_FILE, OWN_OUTPUTS
from detection.runfolder.run_folder import RunFolder
from detection.runfolder.lock import RunFolderLocked, RunLock, process_alive
from detection.models.registry import build_model, save_model

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(path: Path, pid: int, host: str | None = None) -> str:
    text = json.dumps({"pid": pid, "host": host or socket.gethostname(), "token": "other", "started": "then"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lock")
    torch.manual_seed(0)
    save_model(build_model("detr-tiny").eval(), root / "model", source="random init (tests)")
    rng = np.random.default_rng(3)
    (root / "images").mkdir()
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "images" / f"im{index}.png")
    return {"model": root / "model", "images": root / "images"}


def _predict(job: dict[str, Path], out: Path) -> int:
    return cli_main(["predict", str(job["images"]), "--model", str(job["model"]), "--out", str(out),
                     "--device", "cpu", "--workers", "0", "--quiet"])


def test_lock_name_is_not_an_output_and_overwrite_keeps_it(tmp_path: Path) -> None:
    assert LOCK_FILE == ".lock" and LOCK_FILE not in OWN_OUTPUTS
    folder = RunFolder(tmp_path)
    with folder.lock():
        (tmp_path / "run.json").write_text("{}")
        folder.clear()  # --overwrite runs under the lock
        assert (tmp_path / LOCK_FILE).is_file() and not (tmp_path / "run.json").exists()
        assert folder.remove_stale_temp_files() == 0 and (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path: Path) -> None:
    first = RunLock(tmp_path / "out" / LOCK_FILE)  # creates the folder
    first.acquire()
    holder = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunFolderLocked, match=f"pid {os.getpid()} on this host") as refused:
        RunLock(tmp_path / "out" / LOCK_FILE).acquire()
    assert refused.value.holder["token"] == first.token
    first.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    with RunLock(tmp_path / "out" / LOCK_FILE):
        assert (tmp_path / "out" / LOCK_FILE).exists()
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / LOCK_FILE)
    lock.acquire()
    text = _write_lock(tmp_path / LOCK_FILE, os.getpid())  # replaced behind its back
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == text


def test_dead_owner_is_taken_over_with_a_log_line(tmp_path: Path, caplog) -> None:
    pid = _dead_pid()
    assert not process_alive(pid) and process_alive(os.getpid())
    _write_lock(tmp_path / LOCK_FILE, pid)
    lock = RunLock(tmp_path / LOCK_FILE)
    with caplog.at_level(logging.WARNING, logger="detection.runfolder.lock"):
        lock.acquire()
    assert f"taking over the lock of process {pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing moved aside is left
    lock.release()


def test_lock_of_another_host_is_refused_whatever_its_pid(tmp_path: Path) -> None:
    _write_lock(tmp_path / LOCK_FILE, _dead_pid(), host="elsewhere")
    with pytest.raises(RunFolderLocked, match="on host elsewhere"):
        RunLock(tmp_path / LOCK_FILE).acquire()


def test_unreadable_lock_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text("not json")
    with pytest.raises(RunFolderLocked, match="unreadable lock file"):
        RunLock(tmp_path / LOCK_FILE).acquire()


def test_second_predict_into_a_live_runs_folder_is_refused_then_a_dead_lock_is_taken_over(
        job, tmp_path: Path, capsys, caplog) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from detection.runfolder.lock import RunLock; "
         f"RunLock({str(out / LOCK_FILE)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
        env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _predict(job, out) == 2
        message = capsys.readouterr().err
        assert f"is being written by another predict run (pid {holder.pid} on this host" in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the next run takes the lock over and completes
    with caplog.at_level(logging.WARNING, logger="detection.runfolder.lock"):
        assert _predict(job, out) == 0
    assert f"taking over the lock of process {holder.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released at the end of the run
    assert (out / "detections.json").is_file()


def test_out_naming_a_file_is_a_usage_error(job, tmp_path: Path, capsys) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert _predict(job, target) == 2
    message = capsys.readouterr().err
    assert f"--out {target}: is a file, not a folder" in message and "Traceback" not in message
    assert target.read_text() == "keep me"
    # a file in the way of the folder's parents: a usage error too, naming --out
    assert _predict(job, target / "sub") == 2
    assert f"--out {target / 'sub'}: cannot create the folder" in capsys.readouterr().err
