"""Where models come from: build from a config, or load by name or path from whichever source.

The one layer that picks between sources (the shipped demo, native folders, authors' / HF
checkpoints, published checkpoints from the manifest); file IO and key maps sit below it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from detection.models import published
from detection.models.configs import CONFIG_DIR, available_configs, load_config  # noqa: F401
from detection.models.convert import convert_to_native, load_foreign
from detection.models.detr import DETR, DetrConfig
from detection.models.hf.families import FAMILIES, NATIVE_MODEL_TYPES
from detection.models.hf.folder import CONFIG_FILE, read_model_type
from detection.models.hf.hub import fetch_hub_folder, is_hub_name
from detection.models.hf.load import load_hf_detector
from detection.models.native import (ARCHITECTURE, FORMAT_VERSION, META_FILE, WEIGHTS_FILE,  # noqa: F401
                                     is_native_folder, load_native, read_model_meta, save_model)
from detection.resources import data_path, data_root

__all__ = ["DetrConfig", "DETR", "build_model", "load_model", "save_model", "load_config",
           "available_configs", "replace_class_head", "ensure_published_native", "load_published",
           "CONFIG_DIR", "DEMO_DIR", "SHIPPED_MODELS"]

REPO_ROOT = data_root()  # the repository checkout, or detection/_data/ in an installed wheel
DEMO_DIR = data_path("weights", "demo")
#: The models shipped in weights/ by name: the demo model (five convex shapes) and the model trained on
#: the hard shapes of issue 23 (twelve shapes, box supervision only; weights/hard/TRAINING.md).
SHIPPED_MODELS = {"demo": DEMO_DIR, "hard": data_path("weights", "hard")}


def build_model(config: DetrConfig | dict | str | os.PathLike) -> DETR:
    """A randomly initialised DETR (train mode) from a DetrConfig, a dict, or a config name/path."""
    if isinstance(config, dict):
        config = DetrConfig.from_dict(config)
    elif not isinstance(config, DetrConfig):
        config = load_config(config)
    return DETR(config)


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
               prompt: Sequence[str] | None = None) -> nn.Module:
    """A detector with weights (a DETR, or an HFDetector), in eval mode, on `device`.

    name_or_path:
      * "demo" / "hard": the models shipped in weights/demo/ and weights/hard/ (`SHIPPED_MODELS`);
      * a native model folder (model.json + model.safetensors);
      * an authors' checkpoint file (.pth) or an HF DETR folder (config.json + weights),
        converted in memory;
      * an HF folder of another supported family (config.json's model_type: YOLOS, Conditional
        / DAB-DETR, Deformable DETR, RT-DETR v1/v2, D-FINE, RF-DETR, Table Transformer), run
        through transformers (`pip install 'detection[hf]'`; see detection.models.hf);
      * "hf:ORG/NAME[@REVISION]": such a folder from the Hugging Face Hub (huggingface_hub's cache);
      * a published checkpoint name from weights/manifest.yaml (e.g. "detr-r50"), downloaded
        to the cache and converted on first use.
    prompt: the phrases of an open-vocabulary HF detector (OWL-ViT, OWLv2, Grounding DINO,
    OmDet-Turbo; docs/prompted.md): required for those, refused (ValueError) for every other model.
    """
    text = str(name_or_path)
    path = Path(name_or_path)
    hf_folder = path.is_dir() and (path / CONFIG_FILE).is_file() and not is_native_folder(path)
    if prompt is not None and not (hf_folder or is_hub_name(text)):
        raise ValueError(f"--model {text}: a prompt applies to open-vocabulary Hugging Face detectors only; this "
                         "model has fixed classes")
    if text in SHIPPED_MODELS:
        folder = SHIPPED_MODELS[text]
        if not is_native_folder(folder):
            raise ValueError(f"the {text} model is not available: {folder} has no {META_FILE}. "
                             f"It is produced by training ({folder / 'TRAINING.md'}); or pass a model folder.")
        model = load_native(folder)
    elif is_hub_name(text):
        folder, source = fetch_hub_folder(text)
        model = _load_hf_folder(folder, source, prompt)
    elif hf_folder:
        model = _load_hf_folder(path, None, prompt)
    elif is_native_folder(path):
        model = load_native(path)
    elif path.exists():
        model = load_foreign(path)
    else:
        model = load_published(text)
    return model.to(device).eval()


def is_prompted_model(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` names an open-vocabulary HF detector (its classes come from a prompt);
    a Hub name is fetched (or read from the cache) to read its config.json."""
    text, path = str(name_or_path), Path(name_or_path)
    if is_hub_name(text):
        path = fetch_hub_folder(text)[0]
    elif not (path.is_dir() and (path / CONFIG_FILE).is_file()) or is_native_folder(path):
        return False
    model_type = read_model_type(path)
    return model_type in FAMILIES and FAMILIES[model_type].prompted


def _load_hf_folder(folder: Path, source: str | None, prompt: Sequence[str] | None = None) -> nn.Module:
    """An HF folder: DETR's are converted to the native DETR, other families wrapped."""
    if read_model_type(folder) in NATIVE_MODEL_TYPES:
        if prompt is not None:
            raise ValueError(f"{folder}: a prompt applies to open-vocabulary detectors only; DETR has fixed classes")
        model = load_foreign(folder)
        if source is not None:
            model.source = source  # type: ignore[attr-defined]
        return model
    return load_hf_detector(folder, source, prompt)


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


def ensure_published_native(name: str, cache: str | os.PathLike | None = None,
                            progress: bool = True) -> Path:
    """Native folder of a published checkpoint in the cache (download + convert on first use)."""
    entries = published.load_manifest()
    if name not in entries:
        raise ValueError(f"unknown model {name!r}: not a native model folder, checkpoint file, "
                         f"'demo', or a published checkpoint name ({sorted(entries)})")
    folder = published.published_native_dir(name, cache)
    if (folder / META_FILE).is_file():
        return folder
    checkpoint = published.download_checkpoint(name, cache, progress, entries)
    entry = entries[name]
    return convert_to_native(checkpoint, folder, config=entry.config, source=entry.url)


def load_published(name: str, cache: str | os.PathLike | None = None) -> DETR:
    """A published checkpoint as our DETR (see ensure_published_native)."""
    return load_native(ensure_published_native(name, cache))
