"""Append-only JSON-lines journals: one complete line per record, each a single write() + fsync,
so a line always means "this record is done" and a kill leaves at most a trailing partial line.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from detection.io import disk_full_error


def dumps_record(record: dict[str, Any]) -> str:
    """The one JSON form of a journal line (no trailing newline)."""
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def repair_journal(path: Path) -> int:
    """Cut a trailing partial line (left by a kill mid-write); returns bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as handle:
        # find the last newline, scanning back in blocks
        end = size
        block = 65536
        last_newline = -1
        while end > 0 and last_newline < 0:
            start = max(0, end - block)
            handle.seek(start)
            chunk = handle.read(end - start)
            found = chunk.rfind(b"\n")
            if found >= 0:
                last_newline = start + found
            end = start
        keep = last_newline + 1
        if keep < size:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        return size - keep


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of a journal (a trailing partial line is ignored)."""
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    lines.pop()  # "" after the final newline, or a partial line left by a kill
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: corrupt journal line ({err}); delete the run folder or this file") from None
    return records


class Journal:
    """Append-only JSON-lines file: each record is one write() of a complete line + fsync."""

    def __init__(self, path: Path, truncate: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self._fd = os.open(path, flags, 0o644)
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        """Append one line. On failure (a full disk writes part of it, then fails) the file is cut
        back to its previous size, so later lines never follow a partial one; a full disk raises
        OSError(ENOSPC, "no space left on device", this journal's path)."""
        data = (dumps_record(record) + "\n").encode("utf-8")
        with self._lock:
            start = os.fstat(self._fd).st_size
            try:
                written = os.write(self._fd, data)
                while written < len(data):  # regular files write fully unless the disk is full
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
            except OSError as err:
                try:
                    os.ftruncate(self._fd, start)
                except OSError:
                    pass  # the next run's repair_journal cuts a trailing partial line
                full = disk_full_error(err, self.path)
                if full is not None:
                    raise full from err
                raise

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
