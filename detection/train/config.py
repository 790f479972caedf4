"""Training configuration: the defaults every train config starts from, YAML files and
`--set key=value` overrides merged on top, with unknown keys refused."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from detection.data.ground_truth import coco_split_paths

# Every key a train config may set; a YAML file or --set overrides these.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": None,                 # architecture trained from random weights: configs/models/NAME.yaml
                                   # or a YAML path; None = FROM_SCRATCH_MODEL without `init`. With
                                   # `init` the weights define the architecture: resolved to None
    "model_overrides": {},         # DetrConfig fields changed on top of `model` (on top of `init`
                                   # weights: only PREPROCESSING_FIELDS)
    "init": None,                  # start from weights: a native folder, "demo", an authors' .pth,
                                   # an HF folder, a published name, or a training checkpoint .pt
    "freeze_backbone": False,      # no backbone parameter trains (as optim.lr_backbone <= 0 does)
    "backbone": {
        # units that train, counted from the top (torchvision's convention), when the backbone
        # trains: ResNet 0-5 (layer4, layer3, layer2, layer1, stem), None = 3 = the DETR authors'
        # rule (stem and layer1 frozen); ViT 0..depth+1 (top block + final norm, ..., first
        # block, embeddings), None = "all". See detection.models.backbone.backbone_units.
        "trainable_layers": None,
    },
    "train_batch_norm": False,     # batch norm of the trainable layers trains (from scratch); else frozen
    "data": {
        "train_images": None, "train_annotations": None,
        "val_images": None, "val_annotations": None,
        "num_workers": 1,
        "common_crop_p": 0.0,      # share of batches cropped to a common size (no padding), see coco.py
    },
    "augment": {},                 # see detection/data/transforms.py
    "optim": {
        # lr, lr_backbone, warmup_steps: None = the schedule of SCHEDULES["scratch"] without `init`,
        # SCHEDULES["fine-tune"] with it (resolved by load_train_config, recorded in config.yaml)
        "batch_size": 8, "epochs": 10, "lr": None, "lr_backbone": None, "weight_decay": 1e-4,
        "grad_clip": 0.1, "warmup_steps": None, "schedule": "cosine",  # cosine | step | constant
        "min_lr_ratio": 0.01, "lr_drop_epochs": [], "lr_drop_factor": 0.1,
        "adamw": "fused",          # fused | foreach | for-loop: AdamW's implementation (same update)
    },
    "loss": {"ce": 1.0, "bbox": 5.0, "giou": 2.0, "eos_coef": 0.1,
             "match_class": 1.0, "match_bbox": 5.0, "match_giou": 2.0, "aux": True,
             "dense": 0.0},           # weight of the training-only dense encoder supervision (dense.py)
    "ema": {"enabled": False, "decay": 0.999},
    "precision": "fp32",           # fp32 | bf16 (CPU or CUDA) | fp16 (CUDA); heads and loss stay fp32
    "channels_last": None,         # CNN backbone in NHWC; None: with bf16/fp16 only (train/precision.py)
    "compile": False,              # torch.compile the model for training (inductor; train/precision.py)
    "device": "auto",              # auto | cpu | cuda
    "threads": None,               # torch intra-op threads (None: torch default)
    "deterministic": False,
    "log_every": 20,
    "checkpoint_every": 500,       # steps; an epoch end always checkpoints
    "eval": {"every_epochs": 1, "batch_size": 8, "score_threshold": 0.0, "attention_threshold": 0.5,
             "pointing_game": True, "max_images": None, "best_metric": "AP"},
    "progress": True,
}

# The architecture `detr-attn train --data DIR` trains from random weights when neither `model`
# nor `init` is given.
FROM_SCRATCH_MODEL = "detr-tiny"
# The optimiser settings left unset (None) take one of these: training from random weights, or
# fine-tuning `init` weights (ten times lower rates and a short warm-up, so that the first steps
# on new data do not undo what the weights know).
SCHEDULES: dict[str, dict[str, float]] = {
    "scratch": {"lr": 1e-4, "lr_backbone": 1e-5, "warmup_steps": 0},
    "fine-tune": {"lr": 1e-5, "lr_backbone": 1e-6, "warmup_steps": 50},
}

# Sections whose keys are not checked here (DetrConfig fields, augmentation options): a file or
# `--set section={...}` replaces the whole mapping; `--set section.a.b=v` sets one entry in it.
FREE_FORM_SECTIONS = ("model_overrides", "augment")
# DetrConfig fields that `model_overrides` may change on top of `init` weights: the inference
# resize rule (shorter side -> min_size, longer <= max_size), stored with the fine-tuned model.
PREPROCESSING_FIELDS = ("min_size", "max_size")


def _merge(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise ValueError(f"{where}: unknown config key {key!r}; known: {sorted(base)}")
        if isinstance(base[key], dict) and key not in FREE_FORM_SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {key!r} must be a mapping")
            out[key] = _merge(base[key], value, f"{where}: {key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(config: dict[str, Any], assignment: str) -> dict[str, Any]:
    """`a.b.c=value` (value parsed as YAML) -> a new config dict."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:  # YAML 1.1 reads "2e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    return set_value(config, key.strip(), value, where=f"--set {assignment}")


def set_value(config: dict[str, Any], key: str, value: Any, where: str | None = None) -> dict[str, Any]:
    """`a.b.c` set to `value` (taken as is, not parsed) -> a new config dict; unknown keys raise."""
    parts = key.split(".")
    if parts[0] in FREE_FORM_SECTIONS and len(parts) > 1:
        # one entry inside a free-form section: earlier --set entries and the file's stay
        out = copy.deepcopy(config)
        node = out[parts[0]]
        for part in parts[1:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        return out
    update: dict[str, Any] = value
    for part in reversed(parts):
        update = {part: update}
    return _merge(config, update, where or key)


def load_train_config(path: str | os.PathLike | None, overrides: Iterable[str] = (),
                      values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS, then the YAML file at `path` (if any), then each `key=value` override in order,
    then `values` ({"optim.lr": 1e-4, ...}: dotted keys, values taken as they are).

    Raises ValueError naming the file or the override for unknown keys, an unreadable file,
    missing training data, or an unknown precision.
    """
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: cannot read train config: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a train config must be a mapping")
        config = _merge(config, data, str(path))
    for assignment in overrides:
        config = apply_override(config, assignment)
    for key, value in (values or {}).items():
        config = set_value(config, key, value)
    for key in ("train_images", "train_annotations"):
        if not config["data"].get(key):
            raise ValueError(f"train config needs data.{key}")
    if config["precision"] not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {config['precision']!r}")
    return resolve_model_and_schedule(config)


def resolve_model_and_schedule(config: dict[str, Any]) -> dict[str, Any]:
    """The config with what training will really do written in: `model` FROM_SCRATCH_MODEL when
    neither it nor `init` is set and None when `init` is (the weights define the architecture);
    the unset optimiser settings from SCHEDULES. Idempotent (a resumed run's config.yaml is
    already resolved)."""
    config = copy.deepcopy(config)
    if config.get("init"):
        config["model"] = None
    elif config.get("model") is None:
        config["model"] = FROM_SCRATCH_MODEL
    schedule = SCHEDULES["fine-tune" if config.get("init") else "scratch"]
    for key, value in schedule.items():
        if config["optim"].get(key) is None:
            config["optim"][key] = value
    return config


def describe_training_model(config: dict[str, Any]) -> str:
    """One line a user reads first: which model trains, from what, with which learning rate."""
    optim = config["optim"]
    rates = f"lr {optim['lr']:g}, backbone lr {optim['lr_backbone']:g}, warm-up {optim['warmup_steps']} steps"
    if config.get("init"):
        return f"fine-tuning the weights of {config['init']} ({rates})"
    return f"training {config['model']} from random weights ({rates})"


def coco_folder_data(root: str | os.PathLike) -> dict[str, str]:
    """The `data.*` paths of a dataset in the layout `detr-attn synth` writes:
    ROOT/train/, ROOT/annotations/instances_train.json and, for evaluation, ROOT/val/ and
    ROOT/annotations/instances_val.json (without both, training runs without evaluation).

    Returns all four {"data.train_images": ..., ...} (the val ones None without a validation
    set) for `load_train_config(values=...)`; raises ValueError naming each missing part.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data {root}: no such folder")
    train_images, train_annotations = coco_split_paths(root, "train")
    val_images, val_annotations = coco_split_paths(root, "val")
    parts = {"data.train_images": train_images, "data.train_annotations": train_annotations,
             "data.val_images": val_images, "data.val_annotations": val_annotations}
    present = {key: (path.is_dir() if key.endswith("images") else path.is_file()) for key, path in parts.items()}
    required = ["data.train_images", "data.train_annotations"]
    if present["data.val_images"] or present["data.val_annotations"]:
        required += ["data.val_images", "data.val_annotations"]  # half a validation set is a mistake
    missing = [f"{parts[key]} ({'image folder' if key.endswith('images') else 'COCO annotations file'})"
               for key in required if not present[key]]
    if missing:
        raise ValueError(f"--data {root}: missing {', '.join(missing)}; expected the layout "
                         f"`detr-attn synth` writes: train/, val/, annotations/instances_{{train,val}}.json")
    return {key: str(parts[key]) if key in required else None for key in parts}
