"""A run folder's lock: one live predict run per folder. The lock file (its name is the run
folder's, `run_folder.LOCK_FILE`) holds the owner's pid and host; a dead owner's lock is taken over.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class RunFolderLocked(RuntimeError):
    """Another process, alive (or on another host), holds the folder's lock."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (os.kill(pid, 0) sends nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """An exclusive lock file, created atomically (O_CREAT | O_EXCL).

    `acquire` raises RunFolderLocked naming the holder's pid and host while that process is
    alive (or runs on another host, where liveness cannot be checked); a lock whose pid is not
    alive on this host is taken over (logged). `release` removes the file only if it is still
    this lock's. Use as a context manager, or acquire / release.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.token = uuid.uuid4().hex
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self, attempts: int = 5) -> None:
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_dead()
                continue
            try:
                os.write(fd, content)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            self.held = True
            return
        raise RunFolderLocked(f"{self.path}: could not take the lock (other processes keep taking it)", {})

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read_holder(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _take_over_if_dead(self) -> None:
        """Remove the existing lock if its owner is dead; raise RunFolderLocked if it is alive."""
        text = _read_text(self.path)
        if text is None:  # removed meanwhile: try again
            return
        holder = _parse(text)
        if holder is None:  # created an instant ago and not written yet?
            time.sleep(0.2)
            text = _read_text(self.path)
            if text is None:
                return
            holder = _parse(text)
            if holder is None:
                raise RunFolderLocked(f"{self.path}: unreadable lock file; if no predict run writes this "
                                      "folder, delete the lock file and rerun", {})
        pid, host = int(holder.get("pid", -1)), str(holder.get("host", "?"))
        if host != socket.gethostname() or process_alive(pid):
            where = "this host" if host == socket.gethostname() else f"host {host}"
            raise RunFolderLocked(
                f"{self.path.parent} is being written by another predict run (pid {pid} on {where}, "
                f"started {holder.get('started', '?')}); wait for it to finish or use another --out "
                f"(if that process is gone, delete {self.path})", holder)
        logger.warning("%s: taking over the lock of process %d, which is no longer running", self.path, pid)
        # Move the stale lock aside, then check that what was moved is the stale one: another
        # process may have taken it over and written its own an instant before.
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{self.token[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_text(aside) != text:  # a live lock: put it back (unless yet another one exists)
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _parse(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _read_holder(path: Path) -> dict[str, Any] | None:
    text = _read_text(path)
    return None if text is None else _parse(text)
