"""Inference-only model preparation: fold frozen batch norm, channels_last, bf16/fp16, compile.

`InferenceModel(model, device, precision)` wraps a DETR for prediction. It never changes the
caller's model (it works on a deep copy) and always returns float32 outputs:

* fold_bn: every (Conv2d -> FrozenBatchNorm2d / eval BatchNorm2d) pair whose BN consumes the
  conv's output directly is folded into the conv (w' = w * s, b' = (b - mean) * s + beta with
  s = gamma / sqrt(var + eps)); the BN becomes Identity. Exact math, float rounding only.
* channels_last: the CNN body runs in NHWC, the layout oneDNN / cuDNN convolutions prefer.
* precision "bf16" / "fp16": the ResNet body's weights are converted to that dtype (pure
  low-precision convolutions: no per-call weight casts), the transformer runs under autocast,
  and the class and box heads run in float32 on float32 inputs so that box coordinates are
  not rounded to 8 mantissa bits (a 2^-9 error in a normalised coordinate is ~2 px at 1066 px).
  ViT bodies are not converted (autocast only).
* CPU memory: the first InferenceModel on the CPU calls `allocator.retain_freed_memory()`
  (glibc keeps freed activations for reuse instead of page-faulting them in again; figures
  in allocator.py).
* compile: `torch.compile` of the CNN body with inductor's weight freezing (static shapes:
  it recompiles for each new input size, so use it for fixed-size inputs or exact batching
  of same-size images; the first call of each size takes seconds to minutes).

Numerics of the bf16 path are checked in tests/test_fast.py and by scripts/bench.py.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import nn

from detection.engine.allocator import retain_freed_memory

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _is_batch_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.BatchNorm2d):
        return not module.training and module.track_running_stats
    return type(module).__name__ == "FrozenBatchNorm2d" and hasattr(module, "running_var")


def _bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    eps = float(getattr(bn, "eps", 1e-5))
    weight = bn.weight if getattr(bn, "weight", None) is not None else torch.ones_like(bn.running_var)
    bias = bn.bias if getattr(bn, "bias", None) is not None else torch.zeros_like(bn.running_var)
    scale = weight.double() * (bn.running_var.double() + eps).rsqrt()
    shift = bias.double() - bn.running_mean.double() * scale
    return scale, shift


def _candidate_pairs(root: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(conv name, bn name, parent) pairs by structure: Sequential neighbours, convN/bnN names."""
    pairs = []
    for _, parent in root.named_modules():
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for a, b in zip(names, names[1:]):
                if isinstance(children[a], nn.Conv2d) and _is_batch_norm(children[b]):
                    pairs.append((a, b, parent))
        for name, child in children.items():
            if isinstance(child, nn.Conv2d) and name.startswith("conv"):
                bn_name = "bn" + name[len("conv"):]
                if bn_name in children and _is_batch_norm(children[bn_name]):
                    pairs.append((name, bn_name, parent))
    return pairs


@torch.no_grad()
def fold_batch_norms(root: nn.Module, example_input: torch.Tensor) -> int:
    """Fold BNs into the convs that feed them, in place; returns the number folded.

    A structural candidate is folded only if a forward pass on `example_input` shows that the
    BN's input IS the conv's output tensor (so nothing else sits between them).
    """
    pairs = _candidate_pairs(root)
    conv_outputs: dict[int, int] = {}
    bn_inputs: dict[int, int] = {}
    hooks = []
    for index, (conv_name, bn_name, parent) in enumerate(pairs):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        hooks.append(conv.register_forward_hook(
            lambda m, i, o, index=index: conv_outputs.__setitem__(index, id(o))))
        hooks.append(bn.register_forward_pre_hook(
            lambda m, i, index=index: bn_inputs.__setitem__(index, id(i[0]))))
    try:
        root(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    folded = 0
    for index, (conv_name, bn_name, parent) in enumerate(pairs):
        if index not in conv_outputs or conv_outputs.get(index) != bn_inputs.get(index):
            continue
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        scale, shift = _bn_scale_shift(bn)
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))
        setattr(parent, bn_name, nn.Identity())
        folded += 1
    return folded


def count_batch_norms(root: nn.Module) -> int:
    return sum(1 for m in root.modules() if _is_batch_norm(m))


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


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX512-BF16 / AMX) on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available (use --device cpu or auto)")
    return device


class InferenceModel:
    """A prepared copy of a DETR for inference. Call like the model; outputs are float32.

    precision: "fp32" | "bf16" | "fp16". fold_bn / channels_last / compile: see module doc.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: Precision = "fp32",
                 fold_bn: bool = True, channels_last: bool = True, compile: bool = False) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            retain_freed_memory()  # glibc: reuse freed activations instead of re-faulting them
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.config = model.config
        model = copy.deepcopy(model).to(self.device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.folded_batch_norms = 0
        body = getattr(getattr(model, "backbone", None), "body", None)
        is_cnn = body is not None and not hasattr(body, "forward_features")
        if fold_bn and is_cnn:
            example = torch.zeros((1, 3, 64, 64), device=self.device)
            self.folded_batch_norms = fold_batch_norms(body, example)
        if is_cnn and (channels_last or self.dtype != torch.float32 or compile):
            body = body.to(dtype=self.dtype)
            if channels_last:
                body = body.to(memory_format=torch.channels_last)
            if compile:
                # freezing: weights become constants, so inductor can pre-pack them and fuse
                # conv + bias + ReLU / residual add into oneDNN post-ops (inference only)
                body = torch.compile(body, dynamic=False, options={"freezing": True})
            model.backbone.body = _BodyCast(body, self.dtype, channels_last)
        if self.dtype != torch.float32:
            model.class_embed = _Float32Head(model.class_embed)
            model.bbox_embed = _Float32Head(model.bbox_embed)
        self.model = model

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, padding_mask: torch.Tensor, **flags: bool) -> dict[str, Any]:
        """images (B, 3, H, W) float [0, 1]; padding_mask (B, H, W) True = pad -> model outputs (fp32)."""
        images = images.to(self.device, non_blocking=True)
        padding_mask = padding_mask.to(self.device, non_blocking=True)
        with self.autocast():
            outputs = self.model(images, padding_mask, **flags)
        outputs["pred_logits"] = outputs["pred_logits"].float()
        outputs["pred_boxes"] = outputs["pred_boxes"].float()
        outputs["aux_outputs"] = [{k: v.float() for k, v in aux.items()} for aux in outputs["aux_outputs"]]
        return outputs
