"""Gradient-weighted attention explanations for the native DETR (issue #13).

Both methods weight each attention map by its gradient, as in Chefer, Gur & Wolf, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"
(ICCV 2021; code: github.com/hila-chefer/Transformer-MM-Explainability, DETR folder):

* target of a detection = the pre-softmax logit of its class at its query (one-hot backward);
* for every attention A (softmax output, (heads, N, M) for one image):
      Ā = E_h[(∇A ⊙ A)⁺]   (mean over heads of clamp(∇A ⊙ A, min=0))

`attn_grad_maps` returns Ā of the decoder cross-attention row of the detection's query (one
layer, the mean of layers, or a layer index). `relevance_maps` applies the paper's propagation
rules (raw gradient-weighted attention, no LRP) -- encoder R_ii += Ā·R_ii, decoder self
R_qq += Ā·R_qq and R_qi += Ā·R_qi, cross R_qi += R̄_qqᵀ·Ā·R̄_ii with R̄ = rownorm(R − I) + I --
through `detection.attention.aggregate` (`self_relevance`, `decoder_rollout`), which implements
exactly these rules on given Ā; the map is row q of R_qi.

How the gradients are taken. The model's attention modules return the softmax weights they
multiply the values with; forward hooks on those modules capture these very tensors (the ones
in the `AttentionRecord` are stacked copies, outside the path to the logits), so the model and
its inference path are unchanged. All targets of one image share ONE forward pass and ONE
batched backward (`torch.autograd.grad(..., is_grads_batched=True)` with one-hot rows).

Maps are over the VALID feature cells of the image, (N, hv, wv) float32, >= 0, like
`detection.attention.maps.query_cell_maps`, so `cells_to_image` takes them to pixels. Memory:
the batched encoder gradient holds N × L_enc × B × heads × (h·w)² values (relevance_maps only).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from detection.attention.aggregate import LayerChoice, decoder_rollout, reduce_layers, self_relevance
from detection.attention.maps import valid_feature_size, valid_flat_indices


@contextmanager
def _captured_attention(modules: Sequence[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
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


def _as_index_tensor(values: torch.Tensor | Sequence[int], name: str) -> torch.Tensor:
    index = torch.as_tensor(values, dtype=torch.int64).reshape(-1)
    if index.numel() == 0:
        raise ValueError(f"{name} is empty: no detection to explain")
    return index


def _gradient_weighted(
    model: nn.Module,
    images: torch.Tensor,
    padding_mask: torch.Tensor | None,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    labels: torch.Tensor | Sequence[int],
    with_self_attention: bool,
) -> tuple[dict[str, torch.Tensor], tuple[int, int], torch.Tensor]:
    """One forward, one batched backward -> Ā per attention kind for image `image_index`.

    Returns ({"cross": (N, L_dec, Q, hv·wv), "decoder_self": (N, L_dec, Q, Q),
    "encoder": (N, L_enc, hv·wv, hv·wv)} (self kinds only when asked), (hv, wv), query index).
    """
    transformer = getattr(model, "transformer", None)
    if transformer is None or not hasattr(transformer, "decoder"):
        raise ValueError("gradient explanations need the native DETR (a model with .transformer)")
    if model.training:
        raise ValueError("put the model in eval mode (dropout would change the attention)")
    queries = _as_index_tensor(query_index, "query_index")
    classes = _as_index_tensor(labels, "labels")
    if queries.shape != classes.shape:
        raise ValueError(f"{len(queries)} query indices but {len(classes)} labels")
    if not 0 <= int(image_index) < images.shape[0]:
        raise ValueError(f"image_index {image_index} out of range for a batch of {images.shape[0]}")
    kinds = {"cross": [layer.multihead_attn for layer in transformer.decoder.layers]}
    if with_self_attention:
        kinds["decoder_self"] = [layer.self_attn for layer in transformer.decoder.layers]
        kinds["encoder"] = [layer.self_attn for layer in transformer.encoder.layers]
    names = [name for name, modules in kinds.items() for _ in modules]
    modules = [module for group in kinds.values() for module in group]
    with torch.enable_grad(), _captured_attention(modules) as captured:
        out = model(images, padding_mask, cross_attention=True, encoder_attention=with_self_attention,
                    decoder_self_attention=with_self_attention)
    weights = [slot[0] for slot in captured]  # one call per module: (B, heads, Lq, Lk)
    logits = out["pred_logits"][int(image_index)]  # (Q, classes + 1)
    if int(queries.max()) >= logits.shape[0] or int(queries.min()) < 0:
        raise ValueError(f"query index out of range for {logits.shape[0]} queries")
    if int(classes.max()) >= logits.shape[1] - 1 or int(classes.min()) < 0:
        raise ValueError(f"labels must be object classes 0..{logits.shape[1] - 2} (no-object excluded)")
    targets = logits[queries.to(logits.device), classes.to(logits.device)]  # (N,)
    one_hot = torch.eye(len(targets), dtype=targets.dtype, device=targets.device)
    grads = torch.autograd.grad(targets, weights, grad_outputs=one_hot, is_grads_batched=True,
                                allow_unused=True)
    valid_h, valid_w = valid_feature_size(out["attention"].feature_padding_mask[int(image_index)])
    feature_size = tuple(out["attention"].feature_padding_mask.shape[-2:])
    flat = valid_flat_indices(feature_size, valid_h, valid_w).to(logits.device)
    result: dict[str, list[torch.Tensor]] = {name: [] for name in kinds}
    for name, attention, grad in zip(names, weights, grads):
        attention = attention[int(image_index)].detach()  # (heads, Lq, Lk)
        if grad is None:  # an attention the targets do not depend on
            grad = torch.zeros((len(targets), *weights[0].shape), dtype=attention.dtype, device=attention.device)
        weighted = (grad[:, int(image_index)] * attention).clamp(min=0).mean(dim=1)  # (N, Lq, Lk)
        if name != "decoder_self":
            weighted = weighted[..., flat]  # keys: valid cells only
        if name == "encoder":
            weighted = weighted[:, flat]  # queries too
        result[name].append(weighted)
    stacked = {name: torch.stack(layers, dim=1) if layers else None for name, layers in result.items()}
    return stacked, (valid_h, valid_w), queries


def attn_grad_maps(
    model: nn.Module,
    images: torch.Tensor,
    padding_mask: torch.Tensor | None,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    labels: torch.Tensor | Sequence[int],
    layers: LayerChoice = "last",
) -> torch.Tensor:
    """Gradient-weighted decoder cross-attention of each detection: (N, hv, wv) float32, >= 0.

    Detection n is (query_index[n], labels[n]) of image `image_index` of the padded batch
    (`images` (B, 3, H, W), `padding_mask` (B, H, W) True = pad, as for `DETR.forward`).
    Map n = row query_index[n] of E_h[(∇A ⊙ A)⁺] for the cross-attention A of the chosen layer
    ("last", "mean" over layers, or an index), ∇ of the class logit labels[n] at that query.
    """
    if layers == "rollout":
        raise ValueError("layers='rollout' is relevance_maps; attn_grad_maps takes 'last', 'mean' or an index")
    weighted, (valid_h, valid_w), queries = _gradient_weighted(
        model, images, padding_mask, image_index, query_index, labels, with_self_attention=False)
    cross = reduce_layers(weighted["cross"], layers, dim=1)  # (N, Q, K)
    rows = cross[torch.arange(len(queries)), queries.to(cross.device)]  # (N, K)
    return rows.reshape(len(queries), valid_h, valid_w).float()


def relevance_maps(
    model: nn.Module,
    images: torch.Tensor,
    padding_mask: torch.Tensor | None,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    labels: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """Chefer et al. (ICCV 2021) relevance of each detection over the valid cells: (N, hv, wv).

    Ā = E_h[(∇A ⊙ A)⁺] of every encoder self-, decoder self- and decoder cross-attention for
    the detection's class logit; R_ii = `self_relevance`(Ā_enc) and R_qi = `decoder_rollout`(
    Ā_cross, Ā_self, R_ii) (see `detection.attention.aggregate` for the rules); map n = row
    query_index[n] of its R_qi. Float32, >= 0.
    """
    weighted, (valid_h, valid_w), queries = _gradient_weighted(
        model, images, padding_mask, image_index, query_index, labels, with_self_attention=True)
    maps = []
    for n, query in enumerate(queries.tolist()):
        encoder = weighted["encoder"]
        relevance_ii = self_relevance(encoder[n]) if encoder is not None else None
        relevance_qi = decoder_rollout(weighted["cross"][n], weighted["decoder_self"][n], relevance_ii)
        maps.append(relevance_qi[query])
    return torch.stack(maps).reshape(len(queries), valid_h, valid_w).float()
