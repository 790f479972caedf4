"""DETR's own fast-inference preparation: BN folding, channels_last and low precision of its body.

Works on a deep copy; the class and box heads stay float32 so that boxes keep full precision.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from detection.models.fold_bn import fold_batch_norms
from detection.runtime.device import precision_dtype


class _BodyCast(nn.Module):
    """Run a CNN body in `dtype` / channels_last; features returned as they come out."""

    def __init__(self, body: nn.Module, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        self.body = body
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> Any:
        images = images.to(self.dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # autocast would re-cast the already low-precision weights on every call: switch it off
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.body(images)


class _Float32Head(nn.Module):
    """A head evaluated in float32 outside autocast (precise box coordinates and logits)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.head(hidden.float())


def prepare_detr_for_inference(model: nn.Module, device: str | torch.device, precision: str,
                               fold_bn: bool = True, channels_last: bool = True,
                               compile: bool = False) -> nn.Module:
    """A prepared deep copy of a DETR for inference on `device`; `model` is not changed.

    * fold_bn: every (Conv2d -> FrozenBatchNorm2d / eval BatchNorm2d) pair of the CNN body whose
      BN consumes the conv's output directly is folded into the conv (see fold_bn.py).
    * channels_last: the CNN body runs in NHWC, the layout oneDNN / cuDNN convolutions prefer.
    * precision "bf16" / "fp16": the CNN body's weights are converted to that dtype (pure
      low-precision convolutions: no per-call weight casts; the caller runs the rest under
      autocast), and the class and box heads run in float32 on float32 inputs so that box
      coordinates are not rounded to 8 mantissa bits (a 2^-9 error in a normalised
      coordinate is ~2 px at 1066 px). ViT bodies are not converted (autocast only).
    * compile: `torch.compile` of the CNN body with inductor's weight freezing (static shapes:
      it recompiles for each new input size).
    The copy has no gradients, is in eval mode, and carries `folded_batch_norms` (int).
    """
    dtype = precision_dtype(precision)
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    folded = 0
    body = getattr(getattr(model, "backbone", None), "body", None)
    is_cnn = body is not None and not hasattr(body, "forward_features")
    if fold_bn and is_cnn:
        example = torch.zeros((1, 3, 64, 64), device=device)
        folded = fold_batch_norms(body, example)
    if is_cnn and (channels_last or dtype != torch.float32 or compile):
        body = body.to(dtype=dtype)
        if channels_last:
            body = body.to(memory_format=torch.channels_last)
        if compile:
            # freezing: weights become constants, so inductor can pre-pack them and fuse
            # conv + bias + ReLU / residual add into oneDNN post-ops (inference only)
            body = torch.compile(body, dynamic=False, options={"freezing": True})
        model.backbone.body = _BodyCast(body, dtype, channels_last)
    if dtype != torch.float32:
        model.class_embed = _Float32Head(model.class_embed)
        model.bbox_embed = _Float32Head(model.bbox_embed)
    model.folded_batch_norms = folded
    return model
