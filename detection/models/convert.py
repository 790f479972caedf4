"""Foreign checkpoints in and out: authors' files and HF folders <-> our DETR and native folders.

Reads through checkpoint_io, renames through keymaps, writes through native; nothing here
edits keys itself. The key-map names are re-exported here for older imports.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from detection.io import atomic_path
from detection.models.checkpoint_io import (HF_INDEX_FILES, HF_WEIGHT_FILES, CheckpointError,  # noqa: F401
                                            load_hf_weights, load_state_dict_file, load_weights_into,
                                            sha256_file)
from detection.models.configs import load_config
from detection.models.detr import DETR, DetrConfig
from detection.models.keymaps import (AUTHORS_BACKBONE_PREFIX, HF_BACKBONE_PREFIX,  # noqa: F401
                                      NATIVE_BACKBONE_PREFIX, authors_to_native, hf_config_to_detr_config,
                                      hf_to_native, infer_authors_config, native_to_authors)
from detection.models.native import load_native, save_model


def save_authors_checkpoint(model: DETR, path: str | os.PathLike) -> Path:
    """Write `{"model": state_dict}` with the authors' key names (atomic)."""
    state = {k: v.detach().cpu().clone() for k, v in native_to_authors(model.state_dict()).items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state}, tmp)
    return Path(path)


def detect_format(path: str | os.PathLike) -> str:
    """'native' (model.json folder), 'hf' (config.json folder) or 'authors' (checkpoint file)."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.json").is_file():
            return "native"
        if (path / "config.json").is_file():
            return "hf"
        raise ValueError(f"{path}: folder is neither a native model (model.json) nor an HF model (config.json)")
    if path.is_file():
        return "authors"
    raise ValueError(f"{path}: no such file or folder")


def load_hf_folder(folder: str | os.PathLike, name: str | None = None) -> tuple[DETR, Path]:
    """An HF DETR folder -> (our model, the weights file read)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_path}: cannot read HF config: {exc}") from exc
    preprocessor = None
    pre_path = folder / "preprocessor_config.json"
    if pre_path.is_file():
        preprocessor = json.loads(pre_path.read_text())
    config = hf_config_to_detr_config(hf_config, preprocessor, name=name or folder.name, origin=str(config_path))
    state, weights_path = load_hf_weights(folder)
    try:
        native = hf_to_native(state)
    except ValueError as exc:
        raise CheckpointError(weights_path, str(exc)) from exc
    model = DETR(config)
    load_weights_into(model, native, origin=str(weights_path))
    return model, weights_path


def load_authors_checkpoint(path: str | os.PathLike, config: DetrConfig | None = None) -> DETR:
    """An authors' `{"model": state_dict}` file -> our model (config inferred when not given)."""
    path = Path(path)
    raw = load_state_dict_file(path)
    config = config or infer_authors_config(raw, path.name)
    model = DETR(config)
    load_weights_into(model, authors_to_native(raw), origin=str(path))
    return model


def load_foreign(path: str | os.PathLike, config: DetrConfig | str | None = None) -> DETR:
    """A native folder, HF folder or authors' checkpoint -> our model (with .source set)."""
    path = Path(path)
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    kind = detect_format(path)
    if kind == "native":
        return load_native(path)
    if kind == "hf":
        model, weights_path = load_hf_folder(path)
        model.source = f"hf:{path}"  # type: ignore[attr-defined]
        model.source_sha256 = sha256_file(weights_path)  # type: ignore[attr-defined]
        return model
    model = load_authors_checkpoint(path, config)
    model.source = f"authors:{path}"  # type: ignore[attr-defined]
    model.source_sha256 = sha256_file(path)  # type: ignore[attr-defined]
    return model


def convert_to_native(src: str | os.PathLike, out: str | os.PathLike,
                      config: DetrConfig | str | None = None, source: str | None = None) -> Path:
    """Convert an authors' checkpoint or HF folder into a native folder at `out`."""
    model = load_foreign(src, config)
    return save_model(model, out, source=source or getattr(model, "source", str(src)),
                      source_sha256=getattr(model, "source_sha256", None))
