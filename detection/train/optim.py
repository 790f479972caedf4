"""Optimisation for training: AdamW with a lower learning rate for the backbone, and the
learning-rate schedule (linear warm-up, then cosine, step or constant)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def build_optimizer(model: nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: `lr` for the heads and transformer, `lr_backbone`
    for the backbone (a group only when some backbone parameter trains)."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # "backbone.x" on a bare DETR, "model.backbone.x" inside DenseSupervision
            (backbone if "backbone" in name.split(".")[:2] else rest).append(p)
    groups = [{"params": rest, "lr": float(optim["lr"])}]
    if backbone:
        groups.append({"params": backbone, "lr": float(optim["lr_backbone"])})
    implementation = optim.get("adamw", "fused")
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"optim.adamw must be one of {list(ADAMW_IMPLEMENTATIONS)}, got {implementation!r}")
    return torch.optim.AdamW(groups, lr=float(optim["lr"]), weight_decay=float(optim["weight_decay"]),
                             **ADAMW_IMPLEMENTATIONS[implementation])


# AdamW's implementations: one kernel over all parameters (CPU and CUDA), multi-tensor ops, or
# torch's per-parameter loop (torch's CPU default).
ADAMW_IMPLEMENTATIONS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


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


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                    optim: dict[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler applying `lr_factor` to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, steps_per_epoch, optim))
