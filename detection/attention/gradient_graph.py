"""The graph the gradient methods differentiate (`attention.gradients`): one forward of the
detector with its attention tensors in an autograd graph.

Native DETR: forward hooks on the attention modules capture the softmax weights they multiply
the values with, over a graph of the transformer and heads only (`DETR.decode_features`); the
backbone stage runs without a graph, or not at all when the inference pass hands over its
`TransformerInputs`. HF detectors: `forward(..., keep_graph=True)` returns the tensors
(`AttentionGraph`); their backbone runs inside that forward.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from detection.models.transformer_inputs import TransformerInputs


@contextmanager
def captured_attention(modules: Sequence[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Collect, per module, the attention weights (second output) each forward call returns."""
    captured: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = []
    for slot, module in zip(captured, modules):
        def hook(_module: nn.Module, _inputs: object, output: tuple, slot: list = slot) -> None:
            if output[1] is not None:
                slot.append(output[1])
        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def native_graph(model: nn.Module, images: torch.Tensor | None, padding_mask: torch.Tensor | None,
                 with_self_attention: bool, features: TransformerInputs | None
                 ) -> tuple[dict[str, Any], list[str], list[torch.Tensor]]:
    """Native DETR: transformer + heads with hooks and a graph -> (outputs, kind per tensor,
    weights (B, heads, Lq, Lk)).

    The graph covers the transformer and heads only: every attention lies downstream of the
    backbone, so the backbone's graph would never be read. `features`: the inference pass's
    `TransformerInputs` (the backbone is not run again; taken as float32 copies on the model's
    device); None: the backbone stage runs here, without a graph."""
    transformer = model.transformer
    if features is None:
        if padding_mask is None:
            padding_mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=images.device)
        with torch.no_grad():
            features = model.encode_features(images, padding_mask)
    else:
        features = features.to(next(transformer.parameters()).device, torch.float32, copy=True)
    kinds = {"cross": [layer.multihead_attn for layer in transformer.decoder.layers]}
    if with_self_attention:
        kinds["decoder_self"] = [layer.self_attn for layer in transformer.decoder.layers]
        kinds["encoder"] = [layer.self_attn for layer in transformer.encoder.layers]
    names = [name for name, modules in kinds.items() for _ in modules]
    modules = [module for group in kinds.values() for module in group]
    with torch.enable_grad(), parameters_in_graph(model), captured_attention(modules) as captured:
        out = model.decode_features(features, cross_attention=True, encoder_attention=with_self_attention,
                                    decoder_self_attention=with_self_attention)
    return out, names, [slot[0] for slot in captured]  # one call per module


@contextmanager
def parameters_in_graph(model: nn.Module) -> Iterator[None]:
    """Parameters that require no grad (a prepared inference copy, `prepare_for_inference`: BN
    folded, channels_last, bf16) require it for the forward, so every attention -- also the first
    decoder self-attention, a function of parameters only -- lies on an autograd path. Only the
    attention tensors' gradients are asked for (`autograd.grad`): no parameter gets a .grad."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def hf_graph(model: nn.Module, images: torch.Tensor, padding_mask: torch.Tensor | None,
             with_self_attention: bool) -> tuple[dict[str, Any], list[str], list[torch.Tensor], int]:
    """HF detector: forward keeping the graph -> (outputs, kind per tensor, tensors, detection tokens).

    The graph holds every attention of a dense model whatever the record holds, so the record
    is asked for the cross-attention only (its geometry is all that is read of it)."""
    with torch.enable_grad(), parameters_in_graph(model):
        out = model(images, padding_mask, cross_attention=True, keep_graph=True)
    graph = out["attention_graph"]
    if graph.tokens:
        return out, ["tokens"] * len(graph.tokens), list(graph.tokens), graph.detection_tokens
    groups = {"cross": graph.cross}
    if with_self_attention:
        groups.update(decoder_self=graph.decoder_self, encoder=graph.encoder)
    names = [name for name, tensors in groups.items() for _ in tensors]
    return out, names, [tensor for tensors in groups.values() for tensor in tensors], 0
