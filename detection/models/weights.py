"""Safe checkpoint IO, the manifest of published checkpoints, and the download cache.

Loading never executes code: safetensors by extension, otherwise torch.load(weights_only=True).
Every error names the file and the problem.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# Wrappers that prefix every key: DDP / DataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` / `_orig_mod.` prefixes (repeatedly, in any order) from every key.

    The one place where wrapper prefixes are handled.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stripped = key
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if stripped.startswith(prefix):
                    stripped = stripped[len(prefix):]
                    changed = True
        if stripped in out:
            raise ValueError(f"two keys map to {stripped!r} after removing wrapper prefixes")
        out[stripped] = value
    return out


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """Read a checkpoint without executing code.

    *.safetensors -> dict of tensors; *.pth/.pt/.bin/.ckpt/.tar -> whatever torch.load with
    weights_only=True returns (tensors, dicts, lists, numbers, strings only).
    Raises CheckpointError (naming the file) for missing, truncated, corrupt or unsafe files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(path, f"not a valid safetensors file (truncated or corrupt?): {exc}") from exc
    if suffix not in TORCH_SUFFIXES:
        raise CheckpointError(path, f"unknown checkpoint extension {suffix!r}; expected one of "
                                    f"{SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global outside torch's allow-list: code never runs.
        # Quote torch's precise reason (e.g. "Unsupported global: GLOBAL builtins.open"), not
        # its advice to retry with weights_only=False.
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln]
        detail = lines[0].split("WeightsUnpickler error:")[-1].strip().split(". Please")[0] if lines else ""
        raise CheckpointError(path, "refused to load: the pickle references code or objects that "
                                    "are not plain tensors/containers (a malicious or non-weights "
                                    f"file?); nothing was executed. {detail}".rstrip()) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(path, f"cannot read checkpoint (truncated or corrupt?): "
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def extract_state_dict(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint: the object itself, or its "model",
    "state_dict" or "model_state_dict" entry (authors' and common training formats)."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(path, "no state dict found: expected a dict of tensors or a dict with a "
                                "'model' / 'state_dict' entry")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Safe load + state dict extraction + wrapper-prefix stripping."""
    return strip_wrapper_prefixes(extract_state_dict(load_checkpoint_file(path), path))


def _summarise(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str,
                      ignore_missing: Iterable[str] = ()) -> None:
    """Copy `state_dict` into `model`; every missing, unexpected or mis-shaped key is an error.

    ignore_missing: exact key names the caller expects to be absent (e.g. a replaced head).
    Raises CheckpointError naming `origin` and the offending keys.
    """
    expected = model.state_dict()
    ignore = set(ignore_missing)
    missing = set(expected) - set(state_dict) - ignore
    unexpected = set(state_dict) - set(expected)
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_summarise(mismatched)}")
    if problems:
        raise CheckpointError(origin, "weights do not match the model: " + "; ".join(problems))
    model.load_state_dict(dict(state_dict), strict=not ignore)


# ---------------------------------------------------------------------------------------------
# manifest of published checkpoints, download cache

MANIFEST_PATH = Path(__file__).resolve().parents[2] / "weights" / "manifest.yaml"
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
    import yaml

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
    from detection.io import atomic_path

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
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, leave=False)
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
    return cache_dir(cache) / "native" / name


def ensure_published_native(name: str, cache: str | os.PathLike | None = None,
                            progress: bool = True) -> Path:
    """Native folder of a published checkpoint in the cache (download + convert on first use)."""
    from detection.models.convert import convert_to_native

    entries = load_manifest()
    if name not in entries:
        raise ValueError(f"unknown model {name!r}: not a native model folder, checkpoint file, "
                         f"'demo', or a published checkpoint name ({sorted(entries)})")
    folder = published_native_dir(name, cache)
    if (folder / "model.json").is_file():
        return folder
    checkpoint = download_checkpoint(name, cache, progress, entries)
    entry = entries[name]
    return convert_to_native(checkpoint, folder, config=entry.config, source=entry.url)


def load_published(name: str, cache: str | os.PathLike | None = None):
    """A published checkpoint as our DETR (see ensure_published_native)."""
    from detection.models.registry import load_native

    return load_native(ensure_published_native(name, cache))
