"""The trained model back in the shipped layout: an fp32 CPU copy with frozen batch norm,
and its export as a native model folder (`load_model(folder)` works everywhere)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from detection.models.backbone import freeze_batch_norm
from detection.models.registry import save_model


def inference_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` in the shipped layout (frozen batch norm, NCHW weights), eval mode."""
    clone = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    freeze_batch_norm(clone)
    return clone


def export_model(model: nn.Module, folder: Path, source: str) -> Path:
    """Native model folder (frozen batch norm, fp32, CPU) loadable by `load_model(folder)`."""
    return save_model(inference_copy(model), folder, source=source)
