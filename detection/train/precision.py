"""The fast train path: a channels_last CNN backbone under bf16/fp16 autocast with the class and
box heads kept in float32 (the loss is computed outside autocast, in float32, from their outputs)."""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from detection.runtime.device import cpu_supports_bf16


def uses_channels_last(config: dict[str, Any], model: nn.Module) -> bool:
    """config["channels_last"]: True/False, or None = on for a CNN backbone under bf16 / fp16
    autocast (oneDNN and cuDNN convolutions prefer NHWC there) and off in fp32."""
    setting = config.get("channels_last")
    is_cnn = not hasattr(getattr(model.backbone, "body", None), "forward_features")  # timm ViTs have it
    if setting is None:
        return is_cnn and config["precision"] in ("bf16", "fp16")
    return bool(setting) and is_cnn


def _float32_forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return type(self).forward(self, hidden.float())


def float32_heads(model: nn.Module) -> nn.Module:
    """The class and box heads of a DETR run in float32 on float32 inputs even under autocast
    (in place; parameter names and the state dict are unchanged). A bf16 box head would round
    normalised box coordinates to 8 mantissa bits before the L1 / GIoU losses see them."""
    for name in ("class_embed", "bbox_embed"):
        head = getattr(model, name)
        head.forward = types.MethodType(_float32_forward, head)
    return model


def prepare_for_training(model: nn.Module, config: dict[str, Any]) -> bool:
    """The fast train path on `model` in place: channels_last backbone (see `uses_channels_last`)
    and float32 heads under bf16 / fp16. Returns whether inputs should be channels_last."""
    channels_last = uses_channels_last(config, model)
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    if config["precision"] != "fp32":
        float32_heads(model)
    return channels_last


def slow_precision_note(config: dict[str, Any], device: torch.device) -> str | None:
    """A warning for bf16 / fp16 training on a CPU without native bf16 kernels (neither AVX512-BF16
    nor AMX: `runtime.device.cpu_supports_bf16`), or None. There oneDNN emulates bf16 and every
    convolution, forward and backward, runs slower than in fp32, so fp32 is the faster choice."""
    if device.type != "cpu" or config["precision"] == "fp32" or cpu_supports_bf16():
        return None
    return (f"precision {config['precision']} on a CPU without native bf16 (no AVX512-BF16 or AMX): it is "
            "emulated and slower than fp32 here; precision: fp32 trains faster on this machine")


def compile_unavailable(device: torch.device) -> str | None:
    """Why `torch.compile` (the inductor backend) cannot run training on `device` here, or None.

    Inductor generates C++ for the CPU (it needs a C++ compiler: `CXX` or g++/clang++ on PATH)
    and Triton kernels for CUDA."""
    # torch._dynamo / torch._inductor load on first attribute access (torch's lazy modules)
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported with this Python / torch build"
    if device.type == "cpu":
        try:
            torch._inductor.cpp_builder.get_cpp_compiler()
        except Exception as error:  # InvalidCxxCompiler and friends
            return f"the inductor backend needs a C++ compiler on the CPU ({type(error).__name__}: {error})"
    elif device.type == "cuda" and not torch.utils._triton.has_triton():
        return "the inductor backend needs Triton on CUDA (pip install triton)"
    return None


def compile_for_training(module: nn.Module, device: torch.device) -> nn.Module:
    """`torch.compile(module)` for training: an `OptimizedModule` sharing `module`'s parameters
    (checkpoints keep saving the bare module). Shapes that change from batch to batch (multi-scale
    augmentation) are compiled once as dynamic after the first recompilation. Raises ValueError
    saying why when the backend is unavailable (`compile_unavailable`)."""
    reason = compile_unavailable(device)
    if reason is not None:
        raise ValueError(f"compile: {reason}; train without --compile")
    return torch.compile(module)
