"""Safe checkpoint file IO: load without executing code, find the state dict, check it fits.

Safetensors by extension, otherwise torch.load(weights_only=True); every error names the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file
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
    """Hex sha256 of a file, read in chunks."""
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


# HF model folders: one weights file or a sharded index of them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def load_hf_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of an HF model folder (single file or shards) and the file that names it."""
    folder = Path(folder)
    for index_name in HF_INDEX_FILES:
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(index_path, f"invalid shard index: {exc}") from exc
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load_state_dict_file(folder / shard))
            return state, index_path
    for weights_name in HF_WEIGHT_FILES:
        if (folder / weights_name).is_file():
            return load_state_dict_file(folder / weights_name), folder / weights_name
    raise CheckpointError(folder, f"no weights: expected one of {HF_WEIGHT_FILES + HF_INDEX_FILES}")
