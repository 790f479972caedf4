"""A full disk during an atomic write: the error names the file meant, the temp file is gone
and the previous content of the file is untouched."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import detection.io
from detection.io import atomic_path, write_bytes_atomic


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_syncing_removes_the_temp_file_and_names_the_target(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "sub" / "a.png"
    write_bytes_atomic(target, b"old")
    monkeypatch.setattr(detection.io, "_sync_file", _disk_full)
    with pytest.raises(OSError) as raised:
        write_bytes_atomic(target, b"new content")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert str(raised.value) == f"[Errno {errno.ENOSPC}] no space left on device: '{target}'"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.png"] and target.read_bytes() == b"old"


def test_disk_full_while_the_caller_writes_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "maps.npz"
    with pytest.raises(OSError) as raised:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            _disk_full()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_unchanged(tmp_path: Path) -> None:
    with pytest.raises(PermissionError, match="nope"):
        with atomic_path(tmp_path / "x.json"):
            raise PermissionError("nope")
    assert list(tmp_path.iterdir()) == []


def test_journal_append_on_a_full_disk_leaves_no_partial_line(tmp_path: Path, monkeypatch) -> None:
    from detection.runfolder.journal import Journal, read_journal

    journal = Journal(tmp_path / "predictions.jsonl")
    journal.append({"key": "a"})
    real_write = os.write

    def half_then_disk_full(fd: int, data: bytes) -> int:
        if len(data) > 10:
            return real_write(fd, data[:10])  # a short write, as on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_disk_full)
    with pytest.raises(OSError) as raised:
        journal.append({"key": "b", "detections": []})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "predictions.jsonl")
    monkeypatch.setattr(os, "write", real_write)
    journal.append({"key": "c"})  # space is back: the next line follows a complete one
    journal.close()
    assert (tmp_path / "predictions.jsonl").read_bytes() == b'{"key": "a"}\n{"key": "c"}\n'
    assert [r["key"] for r in read_journal(tmp_path / "predictions.jsonl")] == ["a", "c"]
