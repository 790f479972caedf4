"""Named model configs (configs/models/*.yaml), building, saving and loading models.

A native model folder holds `model.safetensors` (weights) and `model.json` (the DetrConfig
fields plus `architecture`, `format_version`, `source`, `source_sha256`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn

from detection.io import atomic_path, write_json_atomic
from detection.models.detr import DETR, DetrConfig
from detection.models.weights import load_checkpoint_file, load_weights_into

__all__ = ["DetrConfig", "DETR", "build_model", "load_model", "save_model", "load_config",
           "available_configs", "replace_class_head", "CONFIG_DIR", "DEMO_DIR"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs" / "models"
DEMO_DIR = REPO_ROOT / "weights" / "demo"
ARCHITECTURE = "detr"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
_META_ONLY_KEYS = ("architecture", "format_version", "source", "source_sha256")


def available_configs() -> list[str]:
    """Names of the configs in configs/models/ (file stems)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | os.PathLike) -> DetrConfig:
    """A DetrConfig from a config name (configs/models/NAME.yaml) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"no model config {str(name_or_path)!r}: {path} does not exist; "
                         f"known configs: {available_configs()}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of DetrConfig fields")
    data.setdefault("name", path.stem)
    return DetrConfig.from_dict(data, origin=str(path))


def build_model(config: DetrConfig | dict | str | os.PathLike) -> DETR:
    """A randomly initialised DETR (train mode) from a DetrConfig, a dict, or a config name/path."""
    if isinstance(config, dict):
        config = DetrConfig.from_dict(config)
    elif not isinstance(config, DetrConfig):
        config = load_config(config)
    return DETR(config)


def save_model(model: DETR, folder: str | os.PathLike, source: str = "",
               source_sha256: str | None = None) -> Path:
    """Write `model` as a native folder (weights first, metadata last, each atomically).

    source: where the weights came from (URL, file, "random init", training run);
    source_sha256: sha256 of the source file when there is one.
    """
    from safetensors.torch import save_file

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
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


def load_native(folder: str | os.PathLike) -> DETR:
    folder = Path(folder)
    config, extra = read_model_meta(folder)
    model = DETR(config)
    weights_path = folder / WEIGHTS_FILE
    load_weights_into(model, load_checkpoint_file(weights_path), origin=str(weights_path))
    model.source = extra.get("source", "")  # type: ignore[attr-defined]
    model.source_sha256 = extra.get("source_sha256")  # type: ignore[attr-defined]
    return model


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> DETR:
    """A DETR with weights, in eval mode, on `device`.

    name_or_path:
      * "demo": the model shipped in weights/demo/;
      * a native model folder (model.json + model.safetensors);
      * an authors' checkpoint file (.pth) or an HF DETR folder (config.json + weights),
        converted in memory;
      * a published checkpoint name from weights/manifest.yaml (e.g. "detr-r50"), downloaded
        to the cache and converted on first use.
    """
    text = str(name_or_path)
    path = Path(name_or_path)
    if text == "demo":
        if not is_native_folder(DEMO_DIR):
            raise ValueError(f"the demo model is not available: {DEMO_DIR} has no {META_FILE}. "
                             "It is produced by training (see README); or pass a model folder.")
        model = load_native(DEMO_DIR)
    elif is_native_folder(path):
        model = load_native(path)
    elif path.exists():
        from detection.models import convert

        model = convert.load_foreign(path)
    else:
        from detection.models import weights

        model = weights.load_published(text)
    return model.to(device).eval()


def replace_class_head(model: DETR, class_names: Sequence[str], category_ids: Sequence[int]) -> DETR:
    """Replace only the classifier (for fine-tuning on another label set), in place.

    The new head (len(class_names) + 1 outputs, last = "no object") is freshly initialised;
    every other weight is kept. model.config is updated. Returns the model.
    """
    if len(class_names) != len(category_ids):
        raise ValueError(f"{len(class_names)} class names but {len(category_ids)} category ids")
    if not class_names:
        raise ValueError("need at least one class")
    old = model.class_embed
    head = nn.Linear(old.in_features, len(class_names) + 1)
    model.class_embed = head.to(device=old.weight.device, dtype=old.weight.dtype)
    model.config = model.config.replace(num_classes=len(class_names), class_names=list(class_names),
                                        category_ids=[int(c) for c in category_ids])
    return model
