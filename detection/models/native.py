"""The native model folder: model.safetensors (weights) + model.json (DetrConfig + provenance).

model.json holds the DetrConfig fields plus `architecture`, `format_version`, `source` and
`source_sha256`; both files are written atomically, weights first.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from detection.io import atomic_path, write_json_atomic
from detection.models.checkpoint_io import load_checkpoint_file, load_weights_into
from detection.models.detr import DETR, DetrConfig

ARCHITECTURE = "detr"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
_META_ONLY_KEYS = ("architecture", "format_version", "source", "source_sha256")


def save_model(model: DETR, folder: str | os.PathLike, source: str = "",
               source_sha256: str | None = None) -> Path:
    """Write `model` as a native folder (weights first, metadata last, each atomically).

    source: where the weights came from (URL, file, "random init", training run);
    source_sha256: sha256 of the source file when there is one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": ARCHITECTURE})
    meta = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, **model.config.to_dict(),
            "source": source, "source_sha256": source_sha256}
    write_json_atomic(folder / META_FILE, meta)
    return folder


def read_model_meta(folder: str | os.PathLike) -> tuple[DetrConfig, dict[str, Any]]:
    """(config, metadata-only fields) of a native model folder."""
    meta_path = Path(folder) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{meta_path}: missing; a native model folder needs {META_FILE} and {WEIGHTS_FILE}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: invalid JSON: {exc}") from exc
    if meta.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{meta_path}: architecture {meta.get('architecture')!r}, expected {ARCHITECTURE!r}")
    extra = {k: meta.pop(k) for k in _META_ONLY_KEYS if k in meta}
    return DetrConfig.from_dict(meta, origin=str(meta_path)), extra


def is_native_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding model.json (a native model folder)."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


def load_native(folder: str | os.PathLike) -> DETR:
    """The DETR of a native folder; `.source` / `.source_sha256` set from model.json."""
    folder = Path(folder)
    config, extra = read_model_meta(folder)
    model = DETR(config)
    weights_path = folder / WEIGHTS_FILE
    load_weights_into(model, load_checkpoint_file(weights_path), origin=str(weights_path))
    model.source = extra.get("source", "")  # type: ignore[attr-defined]
    model.source_sha256 = extra.get("source_sha256")  # type: ignore[attr-defined]
    return model
