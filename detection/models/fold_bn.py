"""Fold inference-mode batch norms into the convolutions that feed them (any nn.Module).

w' = w * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), computed in float64;
the BN becomes Identity. Exact math, float rounding only.
"""
from __future__ import annotations

import torch
from torch import nn


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
    """Batch norms (eval BatchNorm2d or FrozenBatchNorm2d) left in `root`."""
    return sum(1 for m in root.modules() if _is_batch_norm(m))
