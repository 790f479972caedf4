"""Atomic file writes: temp file in the same folder, fsync, rename. No partial file ever exists."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it onto `path`.

    On any failure the temp file is removed and `path` is left as it was. A full disk
    (ENOSPC, while the caller writes the temp file or while it is synced) raises
    OSError(ENOSPC, "no space left on device", path): the message names the file meant,
    not the temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _sync_file(tmp_path)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        full = disk_full_error(err, path)
        if full is not None:
            raise full from err
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def disk_full_error(err: OSError, path: str | os.PathLike) -> OSError | None:
    """For a full disk (ENOSPC): OSError(ENOSPC, "no space left on device", path), naming the
    file meant rather than a temp file; None for any other error (re-raise it as it is)."""
    if err.errno != errno.ENOSPC:
        return None
    return OSError(errno.ENOSPC, "no space left on device", str(path))


def _sync_file(path: Path) -> None:
    """Flush a written file to the disk (where a full disk shows at the latest)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike, what: str, error: Callable[[str], Exception] = ValueError) -> Any:
    """Parse a JSON file; a missing file or invalid JSON raises `error` naming the file.

    what: how the message calls the file ("results file", "annotation file", ...).
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
