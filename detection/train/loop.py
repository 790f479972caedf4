"""`detr-attn train`: train or fine-tune a DETR on COCO-format data.

    detr-attn train --config configs/train/demo.yaml [--set key=value ...] --out RUN_DIR [--resume]

RUN_DIR (rank 0 writes everything):
    config.yaml          the resolved config (defaults + file + --set)
    log.jsonl            one JSON object per line: {"type": "train", step, epoch, lr, loss, ...}
                         every `log_every` steps and {"type": "eval", epoch, step, AP, AP50, ...}
    checkpoints/last.pt  written every `checkpoint_every` steps and at each epoch end
    checkpoints/best.pt  the checkpoint with the best eval `best_metric` (default AP)
    model/               the final weights as a native model folder (model.safetensors + model.json,
                         EMA weights when EMA is on): `--model RUN_DIR/model` works everywhere
    best_model/          the same for the best evaluation

Exact resume: data order is a function of (seed, epoch) (`EpochSampler`), augmentation of
(seed, epoch, sample index) (`CocoDetection.sample_seed`); the checkpoint holds every RNG
state, so `--resume` after a crash replays the same steps bit for bit in deterministic mode.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import yaml
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.data.coco import CocoDetection, LabelMap, TrainCollate, collate
from detection.data.transforms import AugmentConfig, EvalTransform, build_transform
from detection.io import write_text_atomic
from detection.train import distributed as dist_utils
from detection.train.dense import DenseSupervision, dense_losses
from detection.train.checkpoint import code_version, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from detection.train.ema import ModelEma
from detection.train.losses import SetCriterion
from detection.train.matcher import HungarianMatcher

log = logging.getLogger("detection.train")

# Every key a train config may set; a YAML file or --set overrides these.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": "detr-tiny",          # configs/models/NAME.yaml or a YAML path (architecture)
    "model_overrides": {},         # DetrConfig fields changed on top of `model` (on top of `init`
                                   # weights: only PREPROCESSING_FIELDS)
    "init": None,                  # start from weights: a native folder, "demo", an authors' .pth,
                                   # an HF folder, a published name, or a training checkpoint .pt
    "freeze_backbone": False,
    "train_batch_norm": False,     # train the backbone's batch norm (from scratch); frozen otherwise
    "data": {
        "train_images": None, "train_annotations": None,
        "val_images": None, "val_annotations": None,
        "num_workers": 1,
        "common_crop_p": 0.0,      # share of batches cropped to a common size (no padding), see coco.py
    },
    "augment": {},                 # see detection/data/transforms.py
    "optim": {
        "batch_size": 8, "epochs": 10, "lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4,
        "grad_clip": 0.1, "warmup_steps": 0, "schedule": "cosine",  # cosine | step | constant
        "min_lr_ratio": 0.01, "lr_drop_epochs": [], "lr_drop_factor": 0.1,
    },
    "loss": {"ce": 1.0, "bbox": 5.0, "giou": 2.0, "eos_coef": 0.1,
             "match_class": 1.0, "match_bbox": 5.0, "match_giou": 2.0, "aux": True,
             "dense": 0.0},           # weight of the training-only dense encoder supervision (dense.py)
    "ema": {"enabled": False, "decay": 0.999},
    "precision": "fp32",           # fp32 | bf16 (CPU or CUDA) | fp16 (CUDA)
    "device": "auto",              # auto | cpu | cuda
    "threads": None,               # torch intra-op threads (None: torch default)
    "deterministic": False,
    "log_every": 20,
    "checkpoint_every": 500,       # steps; an epoch end always checkpoints
    "eval": {"every_epochs": 1, "batch_size": 8, "score_threshold": 0.0, "attention_threshold": 0.5,
             "pointing_game": True, "max_images": None, "best_metric": "AP"},
    "progress": True,
}


# ==========================================================================================
# configuration
# ==========================================================================================
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
    parts = key.strip().split(".")
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
    return _merge(config, update, f"--set {assignment}")


def load_train_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
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
    for key in ("train_images", "train_annotations"):
        if not config["data"].get(key):
            raise ValueError(f"train config needs data.{key}")
    if config["precision"] not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {config['precision']!r}")
    return config


# ==========================================================================================
# model set-up
# ==========================================================================================
def unfreeze_batch_norm(module: nn.Module) -> nn.Module:
    """FrozenBatchNorm2d -> trainable nn.BatchNorm2d with the same statistics (in place).

    The inverse of `detection.models.backbone.freeze_batch_norm`: in eval mode the two compute
    the same function, so a model trained this way is saved back with frozen batch norm.
    """
    if isinstance(module, FrozenBatchNorm2d):
        bn = nn.BatchNorm2d(module.weight.numel(), eps=module.eps)
        with torch.no_grad():
            bn.weight.copy_(module.weight)
            bn.bias.copy_(module.bias)
            bn.running_mean.copy_(module.running_mean)
            bn.running_var.copy_(module.running_var)
        return bn.to(module.weight.device)
    for name, child in module.named_children():
        replaced = unfreeze_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def inference_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` in the shipped layout (frozen batch norm), eval mode."""
    from detection.models.backbone import freeze_batch_norm

    clone = copy.deepcopy(model).cpu().float().eval()
    freeze_batch_norm(clone)
    return clone


def build_training_model(config: dict[str, Any], label_map: LabelMap) -> nn.Module:
    """From scratch (config["model"]) or from `init` weights; the class head follows the data.

    A model whose category ids differ from the dataset's gets a new class head
    (`replace_class_head`), every other weight kept.
    """
    from detection.models.registry import build_model, load_config, load_model, replace_class_head

    init = config.get("init")
    if init:
        if str(init).endswith(".pt"):
            state = load_checkpoint(init)
            from detection.models.detr import DetrConfig

            model = build_model(DetrConfig.from_dict(state["model_config"], origin=str(init)))
            if any(k.endswith("num_batches_tracked") for k in state["model"]):
                unfreeze_batch_norm(model.backbone)  # saved while training batch norm
            model.load_state_dict(state["model"])
            model = inference_copy(model)  # back to frozen batch norm; `train_batch_norm` decides below
        else:
            model = load_model(init)
        overrides = dict(config.get("model_overrides") or {})
        architecture = sorted(set(overrides) - set(PREPROCESSING_FIELDS))
        if architecture:
            raise ValueError(f"model_overrides {architecture} would change the architecture of `init` "
                             f"weights; with `init` only {list(PREPROCESSING_FIELDS)} may change")
        if overrides:  # e.g. fine-tuning at a larger input size: the weights do not depend on it
            model.config = model.config.replace(**overrides)
        if list(model.config.category_ids) != list(label_map.category_ids):
            log.info("replacing the class head: %d -> %d classes", model.config.num_classes, label_map.num_classes)
            replace_class_head(model, list(label_map.class_names), list(label_map.category_ids))
        model.train()
    else:
        model_config = load_config(config["model"]).replace(
            **dict(config.get("model_overrides") or {}),
            num_classes=label_map.num_classes, class_names=list(label_map.class_names),
            category_ids=list(label_map.category_ids))
        model = build_model(model_config)
    if config["train_batch_norm"] and not config["freeze_backbone"]:
        unfreeze_batch_norm(model.backbone)
    if config["freeze_backbone"]:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return model


def _set_train_mode(model: nn.Module, freeze_backbone: bool) -> None:
    model.train()
    if freeze_backbone:
        model.backbone.eval()  # frozen: batch-norm statistics must not move either


# ==========================================================================================
# optimisation
# ==========================================================================================
def build_optimizer(model: nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # "backbone.x" on a bare DETR, "model.backbone.x" inside DenseSupervision
            (backbone if "backbone" in name.split(".")[:2] else rest).append(p)
    groups = [{"params": rest, "lr": float(optim["lr"])}]
    if backbone:
        groups.append({"params": backbone, "lr": float(optim["lr_backbone"])})
    return torch.optim.AdamW(groups, lr=float(optim["lr"]), weight_decay=float(optim["weight_decay"]))


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, optim: dict[str, Any]) -> float:
    """Multiplier of the base learning rates at optimiser step `step` (0-based).

    Linear warm-up over `warmup_steps`, then `cosine` (down to min_lr_ratio at the last step),
    `step` (x lr_drop_factor at each epoch in lr_drop_epochs) or `constant`.
    """
    warmup = int(optim.get("warmup_steps") or 0)
    factor = 1.0
    if warmup > 0 and step < warmup:
        factor = (step + 1) / warmup
    schedule = optim.get("schedule", "cosine")
    if schedule == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, max(0, step - warmup) / span)
        floor = float(optim.get("min_lr_ratio", 0.0))
        factor *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        drops = sum(1 for e in optim.get("lr_drop_epochs") or [] if epoch >= int(e))
        factor *= float(optim.get("lr_drop_factor", 0.1)) ** drops
    elif schedule != "constant":
        raise ValueError(f"unknown LR schedule {schedule!r} (cosine, step, constant)")
    return factor


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# ==========================================================================================
# evaluation (pycocotools AP + pointing game of the decoder cross-attention)
# ==========================================================================================
@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoDetection, device: torch.device, precision: str = "fp32",
             batch_size: int = 8, score_threshold: float = 0.0, attention_threshold: float = 0.5,
             pointing_game: bool = True, max_images: int | None = None, progress: bool = False) -> dict[str, Any]:
    """COCO bbox AP of `model` on `dataset` (which must use `EvalTransform`, the inference rule),
    plus the pointing game: for each detection with score >= attention_threshold matched to a GT
    of its class (IoU >= 0.5, greedy by score), is the argmax of its last-layer, head-mean
    cross-attention map (mapped to the original image) inside the GT mask?
    """
    from detection.attention.maps import detection_maps
    from detection.attention.metrics import annotation_region, match_detections
    from detection.attention.metrics import pointing_game as pointing_hit
    from detection.engine.evaluate import evaluate_bbox
    from detection.postprocess import postprocess

    was_training = model.training
    model.eval()
    indices = list(range(len(dataset)))[: max_images or None]
    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    label_map = dataset.label_map
    results, hits = [], []
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", unit="batch", leave=False)
    for images, mask, targets in loader:
        with autocast_context(device, precision):
            outputs = model(images.to(device), mask.to(device), attention=pointing_game)
        sizes = torch.stack([t["orig_size"] for t in targets])
        detections = postprocess(outputs, sizes, model.config.class_names, score_threshold=score_threshold)
        for b, (det, target) in enumerate(zip(detections, targets)):
            image_id = target["image_id"]
            boxes = det.boxes.numpy().astype(np.float64)
            categories = np.array([label_map.category_id(int(l)) for l in det.labels.tolist()], dtype=np.int64)
            for box, score, category in zip(boxes, det.scores.tolist(), categories):
                results.append({"image_id": int(image_id), "category_id": int(category), "score": float(score),
                                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
            if not pointing_game:
                continue
            confident = np.nonzero(det.scores.numpy() >= attention_threshold)[0]
            gts = [a for a in dataset.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
            if len(confident) == 0 or not gts:
                continue
            gt_boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                 for a in gts], dtype=np.float64)
            matched = match_detections(boxes[confident], det.scores.numpy()[confident], categories[confident],
                                       gt_boxes, np.array([a["category_id"] for a in gts]))
            maps = detection_maps(outputs["attention"], b, det.query_index[confident], det.image_size,
                                  heads="mean", layers="last", normalize=None)
            for k, gt_index in enumerate(matched):
                if gt_index >= 0:
                    hits.append(pointing_hit(maps[k], annotation_region(gts[gt_index], det.image_size)))
    image_ids = [dataset.image_ids[i] for i in indices]
    evaluation = evaluate_bbox(dataset.coco.dataset, results, image_ids, list(label_map.category_ids))
    metrics: dict[str, Any] = dict(evaluation.stats)
    metrics["num_images"] = len(image_ids)
    if pointing_game:
        metrics["pointing_game"] = float(np.mean(hits)) if hits else 0.0
        metrics["pointing_game_n"] = len(hits)
    if was_training:
        model.train()
    return metrics


# ==========================================================================================
# the loop
# ==========================================================================================
class JsonLog:
    """Append-only JSON-lines log (rank 0 only); each line flushed at once."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _datasets(config: dict[str, Any]) -> tuple[CocoDetection, CocoDetection | None]:
    data = config["data"]
    train = CocoDetection(data["train_images"], data["train_annotations"], seed=config["seed"])
    val = None
    if data.get("val_images") and data.get("val_annotations"):
        val = CocoDetection(data["val_images"], data["val_annotations"], label_map=train.label_map)
    return train, val


def train(config: dict[str, Any], out_dir: str | os.PathLike, resume: bool = False,
          kill_after_step: int | None = None) -> dict[str, Any]:
    """Run (or resume) training as `config` says; returns a summary dict.

    Process-wide settings it changes (thread count, deterministic algorithms) are restored
    on return, so calling it in-process (tests, notebooks) leaves no trace.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        return _train(config, Path(out_dir), resume, kill_after_step)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        dist_utils.cleanup()


def _train(config: dict[str, Any], out_dir: Path, resume: bool, kill_after_step: int | None) -> dict[str, Any]:
    device = _resolve_device(config["device"])
    rank, world_size, local_rank = dist_utils.init_from_env(device.type)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    is_main = rank == 0
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    if config["deterministic"]:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    seed = int(config["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    import random

    random.seed(seed)

    train_set, val_set = _datasets(config)
    label_map = train_set.label_map
    model = build_training_model(config, label_map).to(device)
    train_set.transform = build_transform(config["augment"], True, model.config.min_size, model.config.max_size)
    if val_set is not None:
        val_set.transform = EvalTransform(model.config.min_size, model.config.max_size)

    optim_cfg, loss_cfg = config["optim"], config["loss"]
    batch_size = int(optim_cfg["batch_size"])
    steps_per_epoch = len(_sampler(train_set, seed, 0, rank, world_size)) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {batch_size} per rank")
    epochs = int(optim_cfg["epochs"])
    total_steps = epochs * steps_per_epoch

    # EMA copies the bare model before DenseSupervision hooks into it
    ema = ModelEma(model, float(config["ema"]["decay"])) if config["ema"]["enabled"] else None
    dense_weight = float(loss_cfg.get("dense") or 0.0)
    train_module: nn.Module = DenseSupervision(model).to(device) if dense_weight > 0 else model
    optimizer = build_optimizer(train_module, optim_cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, steps_per_epoch, optim_cfg))
    scaler = torch.amp.GradScaler("cuda") if config["precision"] == "fp16" else None
    criterion = SetCriterion(
        label_map.num_classes,
        HungarianMatcher(loss_cfg["match_class"], loss_cfg["match_bbox"], loss_cfg["match_giou"]),
        eos_coef=float(loss_cfg["eos_coef"]),
        weight_dict={"loss_ce": loss_cfg["ce"], "loss_bbox": loss_cfg["bbox"], "loss_giou": loss_cfg["giou"]},
    ).to(device)

    epoch, step, step_in_epoch, best_metric = 0, 0, 0, None
    resumed_from: dict[str, Any] | None = None
    checkpoint_dir = out_dir / "checkpoints"
    if resume:
        last = checkpoint_dir / "last.pt"
        if last.is_file():
            state = load_checkpoint(last)
            model.load_state_dict(state["model"])
            if state.get("aux_heads"):
                train_module.load_state_dict({**_prefixed(model.state_dict(), "model."), **state["aux_heads"]})
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            epoch, step, step_in_epoch = int(state["epoch"]), int(state["step"]), int(state["step_in_epoch"])
            best_metric = state.get("best_metric")
            set_rng_state(state["rng"])
            if is_main:
                log.info("resumed from %s at epoch %d, step %d", last, epoch, step)
                resumed_from = {"type": "resume", "epoch": epoch, "step": step, "time": time.time(),
                                "code_version": code_version()}
        elif is_main:
            log.warning("--resume: %s does not exist; starting from scratch", last)

    ddp_model = train_module
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            train_module, device_ids=[device.index] if device.type == "cuda" else None)

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=True))
    json_log = JsonLog(out_dir / "log.jsonl", is_main)
    if resumed_from is not None:
        json_log.write(resumed_from)
    elif is_main:
        json_log.write({"type": "start", "config": config, "code_version": code_version(),
                        "world_size": world_size, "steps_per_epoch": steps_per_epoch,
                        "num_parameters": sum(p.numel() for p in model.parameters()),
                        "machine": _machine(), "time": time.time()})

    def make_state(epoch_value: int, step_in_epoch_value: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "ema": ema.state_dict() if ema is not None else None,
            "aux_heads": {k: v for k, v in train_module.state_dict().items() if not k.startswith("model.")}
            if train_module is not model else None,
            "epoch": epoch_value, "step": step, "step_in_epoch": step_in_epoch_value,
            "best_metric": best_metric, "rng": rng_state(), "config": config,
            "model_config": model.config.to_dict(), "code_version": code_version(),
        }

    start_time = time.time()
    checkpoint_every = int(config["checkpoint_every"] or 0)
    eval_cfg = config["eval"]
    last_metrics: dict[str, Any] | None = None
    progress = None
    if is_main and config["progress"]:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    running: dict[str, float] = {}
    while epoch < epochs:
        train_set.set_epoch(epoch)
        sampler = _sampler(train_set, seed, epoch, rank, world_size, skip=step_in_epoch * batch_size)
        # own generator: creating a loader must not draw from the global RNG (exact resume)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
            collate_fn=TrainCollate(float(config["data"].get("common_crop_p") or 0.0),
                                    AugmentConfig.from_dict(config["augment"]).min_visibility),
            num_workers=int(config["data"].get("num_workers") or 0),
            generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        train_module.train()
        _set_train_mode(model, config["freeze_backbone"])
        for images, mask, targets in loader:
            if step_in_epoch >= steps_per_epoch:
                break
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
            with autocast_context(device, config["precision"]):
                outputs = ddp_model(images, mask)
            if not loss_cfg.get("aux", True):
                outputs = {**outputs, "aux_outputs": []}
            loss, terms = criterion(outputs, targets)
            if dense_weight > 0:
                dense = dense_losses(outputs, targets, model.feature_stride, label_map.num_classes)
                loss = loss + dense_weight * (dense["loss_dense_ce"] + dense["loss_dense_box"])
                terms.update(dense)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; terms {_floats(terms)}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = None
            if optim_cfg.get("grad_clip"):
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float(optim_cfg["grad_clip"])))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step += 1
            step_in_epoch += 1

            values = {"loss": loss.item(), **_floats({k: v for k, v in terms.items() if not k[-1].isdigit()})}
            for k, v in values.items():
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            if progress is not None:
                progress.update(1)
                progress.set_postfix(epoch=epoch, loss=f"{running['loss']:.3f}", refresh=False)
            if step % int(config["log_every"]) == 0 or step == total_steps:
                json_log.write({"type": "train", "epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                                "grad_norm": grad_norm, "elapsed_s": round(time.time() - start_time, 2), **values})
            if checkpoint_every and step % checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                if is_main:
                    save_checkpoint(checkpoint_dir / "last.pt", make_state(epoch, step_in_epoch))
                dist_utils.barrier()
            if kill_after_step is not None and step == kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)  # crash-recovery tests: die like a killed job
        epoch += 1
        step_in_epoch = 0
        dist_utils.sync_buffers(model)
        if ema is not None:
            dist_utils.sync_buffers(ema)
        do_eval = val_set is not None and eval_cfg.get("every_epochs") and (
            epoch % int(eval_cfg["every_epochs"]) == 0 or epoch == epochs)
        if do_eval and is_main:
            eval_model = ema.module if ema is not None else model
            last_metrics = evaluate(eval_model, val_set, device, config["precision"], int(eval_cfg["batch_size"]),
                                    float(eval_cfg["score_threshold"]), float(eval_cfg["attention_threshold"]),
                                    bool(eval_cfg["pointing_game"]), eval_cfg.get("max_images"))
            json_log.write({"type": "eval", "epoch": epoch, "step": step,
                            "elapsed_s": round(time.time() - start_time, 2), **last_metrics})
            if progress is not None:
                progress.write(f"epoch {epoch}: " + ", ".join(f"{k} {last_metrics[k]:.3f}" for k in
                                                             ("AP", "AP50", "pointing_game") if k in last_metrics))
            metric = float(last_metrics[eval_cfg.get("best_metric", "AP")])
            if best_metric is None or metric > best_metric:
                best_metric = metric
                save_checkpoint(checkpoint_dir / "best.pt", make_state(epoch, 0))
                export_model(eval_model, out_dir / "best_model", source=f"training run {out_dir} epoch {epoch}")
        if is_main:
            save_checkpoint(checkpoint_dir / "last.pt", make_state(epoch, 0))
        dist_utils.barrier()
    if progress is not None:
        progress.close()
    final = ema.module if ema is not None else model
    if is_main:
        export_model(final, out_dir / "model", source=f"training run {out_dir}")
        json_log.write({"type": "end", "step": step, "epoch": epoch, "elapsed_s": round(time.time() - start_time, 2)})
    dist_utils.barrier()
    summary = {"steps": step, "epochs": epoch, "best_metric": best_metric, "metrics": last_metrics,
               "elapsed_s": time.time() - start_time, "rank": rank, "world_size": world_size,
               "weights_sha256": weights_digest(model)}
    return summary


def _sampler(dataset: CocoDetection, seed: int, epoch: int, rank: int, world_size: int, skip: int = 0):
    return dist_utils.EpochSampler(len(dataset), seed, epoch, rank=rank, num_replicas=world_size, skip=skip)


def export_model(model: nn.Module, folder: Path, source: str) -> Path:
    """Native model folder (frozen batch norm, fp32, CPU) loadable by `load_model(folder)`."""
    from detection.models.registry import save_model

    return save_model(inference_copy(model), folder, source=source)


def weights_digest(model: nn.Module) -> str:
    """sha256 over every state-dict tensor (name order), e.g. to check DDP ranks agree."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _prefixed(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in state.items()}


def _floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v.detach()), 6) for k, v in terms.items()}


def _machine() -> dict[str, Any]:
    import platform

    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ==========================================================================================
# CLI
# ==========================================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="train config YAML (configs/train/*.yaml); with --resume "
                                         "defaults to RUN_DIR/config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted keys, YAML values (repeatable)")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, model/)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    parser.add_argument("--kill-after-step", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = args.config
    if config_path is None and args.resume:
        config_path = Path(args.out) / "config.yaml"
    if config_path is None:
        print("detr-attn train: --config is required (or --resume with an existing run folder)", file=sys.stderr)
        return 2
    try:
        config = load_train_config(config_path, args.set)
    except ValueError as error:
        print(f"detr-attn train: {error}", file=sys.stderr)
        return 2
    summary = train(config, args.out, resume=args.resume, kill_after_step=args.kill_after_step)
    if summary["rank"] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "rank"}, default=float))
    return 0
