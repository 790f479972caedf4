"""Exponential moving average of model weights (optional in training; evaluated and exported
in place of the raw weights when enabled)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """ema = decay * ema + (1 - decay) * weights, for every floating-point parameter and buffer;
    integer buffers (e.g. BatchNorm's num_batches_tracked) are copied.

    `warmup_steps`: the effective decay ramps as min(decay, (1 + n) / (10 + n)) over the first
    updates so the average is not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            new = source[name].detach()
            if value.dtype.is_floating_point:
                value.mul_(decay).add_(new.to(value.dtype), alpha=1 - decay)
            else:
                value.copy_(new)
        self.num_updates += 1
