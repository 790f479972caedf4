"""Published checkpoints: the weights/manifest.yaml entries, the download cache, the hash check.

Downloads go to a temp file, are verified, then renamed: the cache never holds a bad file.
"""
from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

import yaml
from tqdm import tqdm

from detection.io import atomic_path
from detection.models.checkpoint_io import sha256_file
from detection.resources import data_path

MANIFEST_PATH = data_path("weights", "manifest.yaml")
CACHE_ENV = "DETECTION_CACHE"


class DownloadError(RuntimeError):
    """A published checkpoint could not be fetched or failed its hash check."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One published checkpoint: where it is, how to check it, which config it needs."""

    name: str
    url: str
    config: str
    format: str = "authors"
    sha256_prefix: str | None = None   # first hex digits of the sha256 (from the file name)
    sha256: str | None = None          # full sha256, only if actually computed from the file
    coco_val_ap: float | None = None
    license: str | None = None

    @property
    def file_name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


def load_manifest(path: str | os.PathLike = MANIFEST_PATH) -> dict[str, ManifestEntry]:
    """The entries of weights/manifest.yaml (or `path`) by name; a malformed entry is a ValueError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read weights manifest: {exc}") from exc
    entries = {}
    known = {f.name for f in dataclasses.fields(ManifestEntry)} - {"name"}
    for name, fields in (data.get("checkpoints") or {}).items():
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"{path}: checkpoint {name!r} has unknown fields {sorted(unknown)}")
        if not fields.get("sha256") and not fields.get("sha256_prefix"):
            raise ValueError(f"{path}: checkpoint {name!r} has neither sha256 nor sha256_prefix")
        entries[name] = ManifestEntry(name=name, **fields)
    return entries


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Download cache: `override`, else $DETECTION_CACHE, else ~/.cache/detection."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "detection"


def check_hash(path: str | os.PathLike, entry: ManifestEntry) -> str:
    """sha256 of `path`; raises DownloadError if it does not match the entry's (prefix) hash."""
    digest = sha256_file(path)
    expected = entry.sha256 or entry.sha256_prefix or ""
    if not digest.startswith(expected.lower()):
        kind = "sha256" if entry.sha256 else "sha256 prefix"
        raise DownloadError(f"{path}: hash mismatch for {entry.name}: {kind} expected {expected}, "
                            f"file has {digest}")
    return digest


def download_checkpoint(name: str, cache: str | os.PathLike | None = None, progress: bool = True,
                        manifest: Mapping[str, ManifestEntry] | None = None) -> Path:
    """The verified checkpoint file of a manifest entry, downloading it into the cache if needed.

    Writes to a temp file next to the target, checks the hash, then renames atomically: a
    failed or interrupted download never leaves a file under the final name.
    """
    entries = manifest if manifest is not None else load_manifest()
    if name not in entries:
        raise ValueError(f"unknown checkpoint {name!r}; known: {sorted(entries)}")
    entry = entries[name]
    target = cache_dir(cache) / "checkpoints" / entry.file_name
    if target.is_file():
        check_hash(target, entry)
        return target
    try:
        with atomic_path(target) as tmp:
            _fetch(entry.url, tmp, progress)
            check_hash(tmp, entry)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DownloadError(
            f"could not download {entry.url}: {getattr(exc, 'reason', exc)}. If you have the file, "
            f"convert it yourself: `detr-attn weights convert FILE --out DIR --config {entry.config}` "
            f"and pass --model DIR, or copy it to {target}") from exc
    return target


def _fetch(url: str, dest: Path, progress: bool) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, leave=False, disable=None)
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()


def published_native_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where the native folder converted from published checkpoint `name` is cached."""
    return cache_dir(cache) / "native" / name
