"""The parts of one training run, built from its config in the order the RNG sees them, and
their checkpoint: what a save holds and what a resume loads back (`TrainingParts`)."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from detection.data.coco import CocoDetection
from detection.data.transforms import EvalTransform, build_transform
from detection.runtime.distributed import DistContext
from detection.train import model_setup, optim, precision
from detection.train.checkpoint import code_version, load_checkpoint, rng_state, set_rng_state
from detection.train.config import describe_training_model
from detection.train.dense import DenseSupervision
from detection.train.ema import ModelEma
from detection.train.losses import SetCriterion
from detection.train.matcher import HungarianMatcher
from detection.train.sampler import EpochSampler

log = logging.getLogger("detection.train")


def _configure_process(config: dict[str, Any]) -> None:
    """Threads, deterministic algorithms and every global RNG seeded from config["seed"]."""
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    if config["deterministic"]:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    seed = int(config["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _datasets(config: dict[str, Any]) -> tuple[CocoDetection, CocoDetection | None]:
    data = config["data"]
    train_set = CocoDetection(data["train_images"], data["train_annotations"], seed=config["seed"])
    val_set = None
    if data.get("val_images") and data.get("val_annotations"):
        val_set = CocoDetection(data["val_images"], data["val_annotations"], label_map=train_set.label_map)
    return train_set, val_set


@dataclass
class Position:
    """Where training stands: `epoch` in progress, optimiser steps done in it and in total."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    best_metric: float | None = None


class TrainingParts:
    """The parts of one training run built from the config, in the order the RNG sees them (so a
    resumed run replays the same random draws), and their checkpoint state; `Trainer` runs them."""

    def __init__(self, config: dict[str, Any], out_dir: Path, device: torch.device, context: DistContext) -> None:
        self.config, self.out_dir, self.device, self.context = config, out_dir, device, context
        self.checkpoint_dir = out_dir / "checkpoints"
        if context.is_main:  # the first line a user reads: which model trains, and how
            log.info("%s", describe_training_model(config))
        _configure_process(config)
        self.seed = int(config["seed"])
        self.train_set, self.val_set = _datasets(config)
        if self.val_set is None and context.is_main:
            log.warning("no validation data (data.val_images and data.val_annotations; with --data DIR: "
                        "DIR/val/ and DIR/annotations/instances_val.json): training without evaluation")
        self.label_map = self.train_set.label_map
        self.model = model_setup.build_training_model(config, self.label_map).to(device)
        self.channels_last = precision.prepare_for_training(self.model, config)
        note = precision.slow_precision_note(config, device)
        if note is not None and context.is_main:
            log.warning(note)
        self.train_set.transform = build_transform(config["augment"], True, self.model.config.min_size,
                                                   self.model.config.max_size)
        if self.val_set is not None:  # validation runs the model's own inference rule exactly
            self.val_set.transform = EvalTransform(self.model.preprocess_spec)

        self.optim_cfg, self.loss_cfg = config["optim"], config["loss"]
        self.batch_size = int(self.optim_cfg["batch_size"])
        self.steps_per_epoch = len(self._sampler(0)) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training images are fewer than one batch of "
                             f"{self.batch_size} per rank")
        self.epochs = int(self.optim_cfg["epochs"])
        self.total_steps = self.epochs * self.steps_per_epoch

        # EMA copies the bare model before DenseSupervision hooks into it
        self.ema = ModelEma(self.model, float(config["ema"]["decay"])) if config["ema"]["enabled"] else None
        self.dense_weight = float(self.loss_cfg.get("dense") or 0.0)
        self.train_module: nn.Module = (DenseSupervision(self.model).to(device) if self.dense_weight > 0
                                        else self.model)
        self.optimizer = optim.build_optimizer(self.train_module, self.optim_cfg)
        self.scheduler = optim.build_scheduler(self.optimizer, self.total_steps, self.steps_per_epoch, self.optim_cfg)
        self.scaler = torch.amp.GradScaler("cuda") if config["precision"] == "fp16" else None
        self.criterion = SetCriterion(
            self.label_map.num_classes,
            HungarianMatcher(self.loss_cfg["match_class"], self.loss_cfg["match_bbox"], self.loss_cfg["match_giou"]),
            eos_coef=float(self.loss_cfg["eos_coef"]),
            weight_dict={"loss_ce": self.loss_cfg["ce"], "loss_bbox": self.loss_cfg["bbox"],
                         "loss_giou": self.loss_cfg["giou"]},
        ).to(device)
        self.position = Position()
        self.last_metrics: dict[str, Any] | None = None
        self.running: dict[str, float] = {}
        self.progress: tqdm | None = None
        self.start_time = time.time()

    # -- set-up ----------------------------------------------------------------------------
    def _sampler(self, epoch: int, skip: int = 0) -> EpochSampler:
        return EpochSampler(len(self.train_set), self.seed, epoch, rank=self.context.rank,
                            num_replicas=self.context.world_size, skip=skip)

    def resume_from_last_checkpoint(self) -> dict[str, Any] | None:
        """Load checkpoints/last.pt into every part; the log record of the resume (rank 0)."""
        last = self.checkpoint_dir / "last.pt"
        if not last.is_file():
            if self.context.is_main:
                log.warning("--resume: %s does not exist; starting from scratch", last)
            return None
        state = load_checkpoint(last)
        self.model.load_state_dict(state["model"])
        if state.get("aux_heads"):
            model_state = {"model." + k: v for k, v in self.model.state_dict().items()}
            self.train_module.load_state_dict({**model_state, **state["aux_heads"]})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.position = Position(int(state["epoch"]), int(state["step"]), int(state["step_in_epoch"]),
                                 state.get("best_metric"))
        set_rng_state(state["rng"])
        if not self.context.is_main:
            return None
        log.info("resumed from %s at epoch %d, step %d", last, self.position.epoch, self.position.step)
        return {"type": "resume", "epoch": self.position.epoch, "step": self.position.step, "time": time.time(),
                "code_version": code_version()}

    def checkpoint_state(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """Everything a resume needs (see `detection.train.checkpoint`)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "aux_heads": {k: v for k, v in self.train_module.state_dict().items() if not k.startswith("model.")}
            if self.train_module is not self.model else None,
            "epoch": epoch, "step": self.position.step, "step_in_epoch": step_in_epoch,
            "best_metric": self.position.best_metric, "rng": rng_state(), "config": self.config,
            "model_config": self.model.config.to_dict(), "code_version": code_version(),
        }
