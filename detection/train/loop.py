"""The training loop: train or fine-tune a DETR on COCO-format data, evaluate each epoch,
checkpoint, and resume a crashed run bit for bit (`detr-attn train` runs `train`)."""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from detection.data.coco import TrainCollate
from detection.data.transforms import AugmentConfig
from detection.io import write_text_atomic
from detection.models import digest
from detection.runtime.device import autocast, resolve_device
from detection.runtime.distributed import init_distributed
from detection.train import model_export, model_setup, precision, run_log
from detection.train.checkpoint import code_version, save_checkpoint
from detection.train.dense import dense_losses
from detection.train.evaluation import evaluate_during_training
from detection.train.parts import TrainingParts
from detection.train.sampler import sync_buffers

log = logging.getLogger("detection.train")


def train(config: dict[str, Any], out_dir: str | os.PathLike, resume: bool = False,
          kill_after_step: int | None = None) -> dict[str, Any]:
    """Run (or resume) training as `config` (see `detection.train.config`) says.

    RUN_DIR (rank 0 writes everything):
        config.yaml          the resolved config (defaults + file + --set)
        log.jsonl            one JSON object per line: {"type": "train", step, epoch, lr, loss, ...}
                             every `log_every` steps and {"type": "eval", epoch, step, AP, AP50, ...}
        checkpoints/last.pt  written every `checkpoint_every` steps and at each epoch end
        checkpoints/best.pt  the checkpoint with the best eval `best_metric` (default AP)
        model/               the final weights as a native model folder (EMA weights when EMA is
                             on): `--model RUN_DIR/model` works everywhere
        best_model/          the same for the best evaluation

    Exact resume: data order is a function of (seed, epoch) (`EpochSampler`), augmentation of
    (seed, epoch, sample index) (`CocoDetection.sample_seed`); the checkpoint holds every RNG
    state, so `resume` after a crash replays the same steps bit for bit in deterministic mode.
    Under torchrun every rank calls this; ranks join one process group (nccl on CUDA, gloo
    on CPU). Process-wide settings it changes (thread count, deterministic algorithms) are
    restored on return, so calling it in-process (tests, notebooks) leaves no trace.

    Returns {"steps", "epochs", "best_metric", "metrics" (last evaluation), "elapsed_s",
    "rank", "world_size", "weights_sha256"}: the digest (`detection.models.digest.weights_digest`)
    of the trained weights in the shipped layout (`inference_copy`), equal on every rank.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    device = resolve_device(config["device"])
    context = init_distributed(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        device = resolve_device(config["device"], context.local_rank if context.enabled else None)
        trainer = Trainer(config, Path(out_dir), device, context)
        return trainer.run(resume, kill_after_step)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        context.close()


class Trainer(TrainingParts):
    """One training run: the loop over epochs and steps that drives the parts `TrainingParts`
    builds from the config, with logging, evaluation and checkpoints along the way."""

    # -- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False, kill_after_step: int | None = None) -> dict[str, Any]:
        """Train (from checkpoints/last.pt with `resume`) to the last epoch; the summary `train`
        returns. `kill_after_step`: SIGKILL this process after that step (crash tests)."""
        resumed = self.resume_from_last_checkpoint() if resume else None
        self.ddp_model = self.train_module
        if self.context.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.config.get("compile"):  # the bare modules keep the weights: checkpoints are unchanged
            self.ddp_model = precision.compile_for_training(self.ddp_model, self.device)
        self._start_run_folder(resumed)
        initial_metrics = self.evaluate_init_weights() if resumed is None and not resume else None
        if self.context.is_main and self.config["progress"]:
            self.progress = tqdm(total=self.total_steps, initial=self.position.step, unit="step", dynamic_ncols=True,
                                 disable=None)  # terminals only: no \r noise in logs
        while self.position.epoch < self.epochs:
            self.train_epoch(kill_after_step)
            self.end_epoch()
        if self.progress is not None:
            self.progress.close()
        final = self.ema.module if self.ema is not None else self.model
        if self.context.is_main:
            model_export.export_model(final, self.out_dir / "model", source=f"training run {self.out_dir}")
            self.json_log.write({"type": "end", "step": self.position.step, "epoch": self.position.epoch,
                                 "elapsed_s": round(time.time() - self.start_time, 2)})
        self.context.barrier()
        return {"steps": self.position.step, "epochs": self.position.epoch, "best_metric": self.position.best_metric,
                "initial_metrics": initial_metrics, "metrics": self.last_metrics, "elapsed_s": time.time() - self.start_time, "rank": self.context.rank,
                "world_size": self.context.world_size,
                "weights_sha256": digest.weights_digest(model_export.inference_copy(self.model))}

    def _start_run_folder(self, resumed: dict[str, Any] | None) -> None:
        """config.yaml and the first log.jsonl record (start or resume), rank 0 only."""
        if self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out_dir / "config.yaml", yaml.safe_dump(self.config, sort_keys=True))
        self.json_log = run_log.JsonLog(self.out_dir / "log.jsonl", self.context.is_main)
        if resumed is not None:
            self.json_log.write(resumed)
        elif self.context.is_main:
            self.json_log.write({"type": "start", "config": self.config, "code_version": code_version(),
                                 "world_size": self.context.world_size, "steps_per_epoch": self.steps_per_epoch,
                                 "num_parameters": sum(p.numel() for p in self.model.parameters()),
                                 "machine": run_log.machine_info(), "time": time.time()})

    def _epoch_loader(self) -> torch.utils.data.DataLoader:
        epoch, data = self.position.epoch, self.config["data"]
        sampler = self._sampler(epoch, skip=self.position.step_in_epoch * self.batch_size)
        # own generator: creating a loader must not draw from the global RNG (exact resume)
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
            collate_fn=TrainCollate(float(data.get("common_crop_p") or 0.0),
                                    AugmentConfig.from_dict(self.config["augment"]).min_visibility),
            num_workers=int(data.get("num_workers") or 0),
            generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def train_epoch(self, kill_after_step: int | None = None) -> None:
        """The remaining optimiser steps of the epoch in progress, with logging and checkpoints."""
        position = self.position
        self.train_set.set_epoch(position.epoch)
        loader = self._epoch_loader()
        self.train_module.train()
        model_setup.set_train_mode(self.model, self.config["freeze_backbone"])
        checkpoint_every = int(self.config["checkpoint_every"] or 0)
        for images, mask, targets in loader:
            if position.step_in_epoch >= self.steps_per_epoch:
                break
            values, grad_norm = self.train_step(images, mask, targets)
            position.step += 1
            position.step_in_epoch += 1
            self._report_step(values, grad_norm)
            if checkpoint_every and position.step % checkpoint_every == 0 \
                    and position.step_in_epoch < self.steps_per_epoch:
                if self.context.is_main:
                    save_checkpoint(self.checkpoint_dir / "last.pt",
                                    self.checkpoint_state(position.epoch, position.step_in_epoch))
                self.context.barrier()
            if kill_after_step is not None and position.step == kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)  # crash-recovery tests: die like a killed job

    def train_step(self, images: torch.Tensor, mask: torch.Tensor,
                   targets: list[dict[str, Any]]) -> tuple[dict[str, float], float | None]:
        """One optimiser step on a batch: images (B, 3, H, W), mask (B, H, W) True = padding,
        targets as `CocoDetection` makes them. Returns (logged loss values, gradient norm)."""
        device = self.device
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
        with autocast(device, self.config["precision"], training=True):
            outputs = self.ddp_model(images, mask)
        if not self.loss_cfg.get("aux", True):
            outputs = {**outputs, "aux_outputs": []}
        loss, terms = self.criterion(outputs, targets)
        if self.dense_weight > 0:
            dense = dense_losses(outputs, targets, self.model.feature_stride, self.label_map.num_classes)
            loss = loss + self.dense_weight * (dense["loss_dense_ce"] + dense["loss_dense_box"])
            terms.update(dense)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.position.step}; terms {_floats(terms)}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = None
        if self.optim_cfg.get("grad_clip"):
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.optim_cfg["grad_clip"])))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": loss.item(), **_floats({k: v for k, v in terms.items() if not k[-1].isdigit()})}, grad_norm

    def _report_step(self, values: dict[str, float], grad_norm: float | None) -> None:
        """Progress bar (smoothed loss) and, every `log_every` steps, a log.jsonl train record."""
        for k, v in values.items():
            self.running[k] = v if k not in self.running else 0.9 * self.running[k] + 0.1 * v
        position = self.position
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(epoch=position.epoch, loss=f"{self.running['loss']:.3f}", refresh=False)
        if position.step % int(self.config["log_every"]) == 0 or position.step == self.total_steps:
            self.json_log.write({"type": "train", "epoch": position.epoch, "step": position.step,
                                 "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                                 "elapsed_s": round(time.time() - self.start_time, 2), **values})

    def end_epoch(self) -> None:
        """Close the epoch: sync buffers across ranks, evaluate when due, checkpoint."""
        position = self.position
        position.epoch += 1
        position.step_in_epoch = 0
        sync_buffers(self.model)
        if self.ema is not None:
            sync_buffers(self.ema)
        eval_cfg = self.config["eval"]
        do_eval = self.val_set is not None and eval_cfg.get("every_epochs") and (
            position.epoch % int(eval_cfg["every_epochs"]) == 0 or position.epoch == self.epochs)
        if do_eval and self.context.is_main:
            self.evaluate_and_keep_best()
        if self.context.is_main:
            save_checkpoint(self.checkpoint_dir / "last.pt", self.checkpoint_state(position.epoch, 0))
        self.context.barrier()

    def evaluate_init_weights(self) -> dict[str, Any] | None:
        """Fine-tuning with a validation set: the `init` weights evaluated before the first step
        (rank 0; logged as the epoch-0 eval record), so one run states the AP before and after.
        None from random weights, without a validation set, or on other ranks."""
        if not self.config.get("init") or self.val_set is None or not self.config["eval"].get("every_epochs"):
            return None
        metrics = self._evaluate(self.model) if self.context.is_main else None
        self.context.barrier()
        return metrics

    def _evaluate(self, eval_model: nn.Module) -> dict[str, Any]:
        """COCO metrics of `eval_model` on the validation set, written to log.jsonl and the log."""
        eval_cfg, position = self.config["eval"], self.position
        metrics = evaluate_during_training(
            eval_model, self.val_set, self.device, self.config["precision"], int(eval_cfg["batch_size"]),
            float(eval_cfg["score_threshold"]), float(eval_cfg["attention_threshold"]),
            bool(eval_cfg["pointing_game"]), eval_cfg.get("max_images"))
        self.json_log.write({"type": "eval", "epoch": position.epoch, "step": position.step,
                             "elapsed_s": round(time.time() - self.start_time, 2), **metrics})
        line = f"epoch {position.epoch}: " + ", ".join(
            f"{k} {metrics[k]:.3f}" for k in ("AP", "AP50", "pointing_game") if k in metrics)
        if self.progress is not None:
            self.progress.write(line)
        else:
            log.info("%s", line)
        return metrics

    def evaluate_and_keep_best(self) -> None:
        """Evaluate (the EMA weights when EMA is on), log, and keep best.pt / best_model/."""
        eval_cfg, position = self.config["eval"], self.position
        eval_model = self.ema.module if self.ema is not None else self.model
        metrics = self.last_metrics = self._evaluate(eval_model)
        metric = float(metrics[eval_cfg.get("best_metric", "AP")])
        if position.best_metric is None or metric > position.best_metric:
            position.best_metric = metric
            save_checkpoint(self.checkpoint_dir / "best.pt", self.checkpoint_state(position.epoch, 0))
            model_export.export_model(eval_model, self.out_dir / "best_model",
                         source=f"training run {self.out_dir} epoch {position.epoch}")


def _floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v.detach()), 6) for k, v in terms.items()}
