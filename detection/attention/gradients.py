"""Gradient-weighted attention explanations (issue #13): the native DETR and the wrapped HF detectors.

Both methods weight each attention map by its gradient, as in Chefer, Gur & Wolf, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"
(ICCV 2021; code: github.com/hila-chefer/Transformer-MM-Explainability, DETR and ViT folders):

* target of a detection = the pre-softmax logit of its class at its query (one-hot backward;
  softmax families' no-object column is not a class, sigmoid families have none);
* for every attention A (softmax output, (heads, N, M) for one image):
      Ā = E_h[(∇A ⊙ A)⁺]   (mean over heads of clamp(∇A ⊙ A, min=0))

`attn_grad` returns Ā of the decoder cross-attention row of the detection's query (one layer,
the mean of layers, or a layer index). Deformable decoders (sampled attention): the same product
per sampling point, clamp(∇w ⊙ w, 0) of the weight w of each (head, level, point) of the query,
splatted exactly as the raw sampled map is (`detection.attention.sampled.sampled_cell_maps`) and
averaged over heads -- the splat is linear, so this is E_h of the per-head gradient-weighted maps.

`relevance` applies the paper's propagation rules (raw gradient-weighted attention, no LRP):
* encoder-decoder detectors (native DETR, Conditional DETR, DAB-DETR, Table Transformer):
  encoder R_ii += Ā·R_ii, decoder self R_qq += Ā·R_qq and R_qi += Ā·R_qi, cross R_qi +=
  R̄_qqᵀ·Ā·R̄_ii with R̄ = rownorm(R − I) + I, through `detection.attention.aggregate`
  (`self_relevance`, `decoder_rollout`), which implements exactly these rules on given Ā; the
  map is row q of R_qi;
* ViT detectors (YOLOS; OWL-ViT / OWLv2): the self-attention rule over ALL tokens, as in the
  authors' ViT code (`generate_relevance`: R = I; R += Ā·R per block, every Ā over [CLS] +
  patches (+ YOLOS's detection tokens)); the map of a detection is the row of its detection
  token (YOLOS: the last `num_queries` tokens; OWL: the patch token 1 + q itself, its
  `AttentionGraph.detection_tokens` = every patch) over the valid patch tokens
  (`aggregate.self_relevance_rows` computes that row of R without forming R).

How the gradients are taken. Native DETR: the model's attention modules return the softmax
weights they multiply the values with; forward hooks on those modules capture these very tensors.
The graph is recorded over the transformer and heads only (`DETR.decode_features`): the backbone
stage runs without one, or not at all when the inference pass hands over its `TransformerInputs`.
HF detectors: `forward(..., keep_graph=True)` returns them as an `AttentionGraph`
(`detection.models.hf.capture_*`). The record of the same forward gives the geometry (valid
cells, stride, input size). All targets of one image share ONE forward pass and one batched
backward (`torch.autograd.grad(..., is_grads_batched=True)` with one-hot rows), split into
chunks only when the batched gradients would exceed `_GRADIENT_VALUES` values.

Maps are over the VALID feature cells of the image (level 0's for sampled attention), (N, hv, wv)
float32, >= 0, like `detection.attention.maps.query_cell_maps`, so `cells_to_image` takes them to
pixels. Memory: the batched gradients hold N × (every captured attention's size) values (for
relevance: every encoder self-attention, (h·w)² per head; YOLOS: (tokens)² per head and layer).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from detection.attention.aggregate import (ROLLOUT_LAYERS, LayerChoice, decoder_rollout, reduce_layers, self_relevance,
                                           self_relevance_rows)
from detection.attention.cell_maps import MethodMaps
from detection.attention.gradient_graph import hf_graph, native_graph
from detection.attention.maps import valid_feature_size, valid_flat_indices
from detection.attention.sampled import sampled_cell_maps
from detection.models.outputs import AttentionRecord, SampledAttention
from detection.models.transformer_inputs import TransformerInputs

# Batched gradient values held at once (float32: 1 GiB); more targets than fit go in chunks.
_GRADIENT_VALUES = 1 << 28

Reducer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_index_tensor(values: torch.Tensor | Sequence[int], name: str) -> torch.Tensor:
    index = torch.as_tensor(values, dtype=torch.int64).reshape(-1)
    if index.numel() == 0:
        raise ValueError(f"{name} is empty: no detection to explain")
    return index


def _class_targets(model: nn.Module, logits: torch.Tensor, queries: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N,) logits of the targets' classes at their queries, of one image's logits (Q, C[+1])."""
    if int(queries.max()) >= logits.shape[0] or int(queries.min()) < 0:
        raise ValueError(f"query index out of range for {logits.shape[0]} queries")
    rule = getattr(model, "postprocess_rule", None)
    no_object = rule is None or rule.kind == "softmax_no_object"
    columns = logits.shape[1] - (1 if no_object else 0)
    if int(classes.max()) >= columns or int(classes.min()) < 0:
        raise ValueError(f"labels must be object classes 0..{columns - 1}" + (" (no-object excluded)" if no_object else ""))
    return logits[queries.to(logits.device), classes.to(logits.device)]


def _gradient_products(targets: torch.Tensor, queries: torch.Tensor, tensors: Sequence[torch.Tensor],
                       image_index: int, reducers: Sequence[Reducer]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """For each chunk of targets, per tensor A (B, ...) of the graph: reducer(∇_n A[i] ⊙ A[i], queries).

    The products are (n, ...) for the chunk's n targets (∇ of target n, image `image_index`);
    a tensor the targets do not depend on has a zero gradient. Yields (chunk's queries, [per tensor]).
    """
    count = len(targets)
    per_target = sum(tensor.numel() for tensor in tensors)
    chunk = max(1, _GRADIENT_VALUES // max(1, per_target))
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        one_hot = torch.zeros((stop - start, count), dtype=targets.dtype, device=targets.device)
        one_hot[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        grads = torch.autograd.grad(targets, list(tensors), grad_outputs=one_hot, is_grads_batched=True,
                                    allow_unused=True, retain_graph=stop < count)
        reduced = []
        for tensor, grad, reducer in zip(tensors, grads, reducers):
            attention = tensor[image_index].detach()
            grad = torch.zeros((stop - start, *attention.shape), dtype=attention.dtype, device=attention.device) \
                if grad is None else grad[:, image_index]
            reduced.append(reducer(grad * attention, queries[start:stop]))
        yield queries[start:stop], reduced


def _head_mean(kind: str, flat: torch.Tensor) -> Reducer:
    """Dense (n, heads, Lq, Lk) products -> Ā (n, Lq, Lk), cells cut to the valid ones `flat`."""
    def reduce(products: torch.Tensor, _queries: torch.Tensor) -> torch.Tensor:
        weighted = products.clamp(min=0).mean(dim=1)
        if kind != "decoder_self":
            weighted = weighted[..., flat]  # keys: valid cells only
        if kind == "encoder":
            weighted = weighted[:, flat]  # queries too
        return weighted
    return reduce


def _token_reducer(flat: torch.Tensor, detections: int, all_tokens: bool) -> Reducer:
    """ViT (YOLOS, OWL) (n, heads, T, T) products -> Ā over all tokens (n, T, T), or (all_tokens False) the
    detection tokens' rows over the valid patches (n, D, K), the dense "cross" layout."""
    def reduce(products: torch.Tensor, _queries: torch.Tensor) -> torch.Tensor:
        if all_tokens:
            return products.clamp(min=0).mean(dim=1)
        tokens = products.shape[-1]
        return products[:, :, tokens - detections:, 1 + flat.to(products.device)].clamp(min=0).mean(dim=1)
    return reduce


def _point_reducer(products: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Sampled (n, Q, heads, ...) products -> the target's own query, heads kept: (n, heads, ...)."""
    return products[torch.arange(len(queries), device=products.device), queries.to(products.device)].clamp(min=0)


def _gradient_weighted(
    model: nn.Module,
    images: torch.Tensor,
    padding_mask: torch.Tensor | None,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    labels: torch.Tensor | Sequence[int],
    with_self_attention: bool,
    finish: Callable[[dict[str, torch.Tensor], torch.Tensor, AttentionRecord], dict[str, torch.Tensor]] | None = None,
    cross_layer: LayerChoice | None = None,
    features: TransformerInputs | None = None,
) -> tuple[dict[str, torch.Tensor], AttentionRecord, torch.Tensor]:
    """One forward, one batched backward -> gradient-weighted attention of image `image_index`.

    Returns ({"cross": (N, L_dec, Q, hv·wv), "decoder_self": (N, L_dec, Q, Q), "encoder": (N, L_enc,
    hv·wv, hv·wv)} (self kinds only when asked), the forward's record, query index). YOLOS: "cross"
    (N, L, D, hv·wv) over the patches, or with self-attention "tokens" (N, L, T, T). Sampled
    records: "cross" (N, L_dec, heads, levels, points) (or HF's flat (..., heads, sum(points)))
    clamp(∇w ⊙ w, 0) of each target's own query. `finish(kinds, chunk's queries, record)` turns one
    chunk's result into the result kept (default: kept as is), so that big Ā need not outlive a chunk.
    cross_layer: without self-attention, a layer choice other than "mean" ("last", an index) takes
    the gradient of that cross-attention layer only ("cross" then holds L = 1): the backward stops
    there instead of running through every layer. features: the native DETR's inference-pass
    `TransformerInputs` of the batch (`images` may then be None): the backbone is not run again.
    """
    if model.training:
        raise ValueError("put the model in eval mode (dropout would change the attention)")
    queries = _as_index_tensor(query_index, "query_index")
    classes = _as_index_tensor(labels, "labels")
    if queries.shape != classes.shape:
        raise ValueError(f"{len(queries)} query indices but {len(classes)} labels")
    capture = getattr(model, "gradient_capture", None)
    if features is not None and capture != "hooks":
        raise ValueError("features (TransformerInputs) are the native DETR's; this model takes images")
    if features is None and images is None:
        raise ValueError("give the images (or, for the native DETR, the inference pass's features)")
    batch = int(features.features.shape[0] if features is not None else images.shape[0])
    if not 0 <= int(image_index) < batch:
        raise ValueError(f"image_index {image_index} out of range for a batch of {batch}")
    image_index = int(image_index)
    detections = 0
    if capture == "hooks":
        out, names, tensors = native_graph(model, images, padding_mask, with_self_attention, features)
    elif capture == "graph":
        out, names, tensors, detections = hf_graph(model, images, padding_mask, with_self_attention)
    else:
        raise ValueError("gradient explanations need the native DETR (a model with .transformer) or a wrapped "
                         "Hugging Face detector (forward(..., keep_graph=True))")
    record = out["attention"]
    if detections and not with_self_attention and record.kind == "dense":
        # attn-grad weights the layers the record holds (OWL: the last; YOLOS: all), as raw shows them
        names, tensors = names[-record.decoder_cross.shape[0]:], tensors[-record.decoder_cross.shape[0]:]
    if cross_layer is not None and cross_layer != "mean" and not with_self_attention:
        picked = int(reduce_layers(torch.arange(len(tensors)), cross_layer, dim=0))  # validates the choice
        names, tensors = names[picked:picked + 1], tensors[picked:picked + 1]
    targets = _class_targets(model, out["pred_logits"][image_index], queries, classes)
    valid_h, valid_w = valid_feature_size(record.feature_padding_mask[image_index])
    flat = valid_flat_indices(record.feature_size, valid_h, valid_w).to(targets.device)
    if record.kind == "sampled":
        reducers = [_point_reducer] * len(tensors)
    elif detections:
        reducers = [_token_reducer(flat, detections, with_self_attention)] * len(tensors)
        names = ["tokens" if with_self_attention else "cross"] * len(tensors)
    else:
        reducers = [_head_mean(name, flat) for name in names]
    chunks = []
    for chunk_queries, reduced in _gradient_products(targets, queries.to(targets.device), tensors, image_index, reducers):
        kinds = {name: torch.stack([r for n, r in zip(names, reduced) if n == name], dim=1)
                 for name in dict.fromkeys(names)}
        chunks.append(kinds if finish is None else finish(kinds, chunk_queries, record))
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}, record, queries


def _geometry(record: AttentionRecord, image_index: int) -> tuple[int, tuple[int, int]]:
    """(stride, (h_in, w_in)) of one image's maps, from the forward's record."""
    height, width = (int(v) for v in record.image_sizes[image_index].tolist())
    return int(record.feature_stride), (height, width)


def _sampled_maps(sampled: SampledAttention, weighted: torch.Tensor, image_index: int, queries: torch.Tensor,
                  valid_size: tuple[int, int], layers: LayerChoice) -> torch.Tensor:
    """Splat per-point clamp(∇w ⊙ w) (N, L, heads, ...) at each target's query points, as raw maps are."""
    per_layer = [SampledAttention.layer_weights(weighted[:, layer][None], sampled.points_per_level)
                 for layer in range(weighted.shape[1])]  # each (1, heads, N, levels, points)
    locations = sampled.locations[:, image_index][:, :, queries.to(sampled.locations.device)]  # (L, heads, N, lv, p, 2)
    product = dataclasses.replace(sampled, locations=locations[:, None].cpu(),
                                  weights=torch.stack(per_layer).detach().cpu())
    return sampled_cell_maps(product, 0, torch.arange(len(queries)), valid_size, heads="mean", layers=layers)


def attn_grad(
    model: nn.Module,
    images: torch.Tensor,
    padding_mask: torch.Tensor | None,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    labels: torch.Tensor | Sequence[int],
    layers: LayerChoice = "last",
    features: TransformerInputs | None = None,
) -> MethodMaps:
    """Gradient-weighted decoder cross-attention of each detection: values (N, hv, wv) float32, >= 0.

    Detection n is (query_index[n], labels[n]) of image `image_index` of the padded batch
    (`images` (B, 3, H, W), `padding_mask` (B, H, W) True = pad, as for the model's forward).
    Map n = row query_index[n] of E_h[(∇A ⊙ A)⁺] for the cross-attention A of the chosen layer
    ("last", "mean" over layers, or an index), ∇ of the class logit labels[n] at that query.
    Sampled (deformable) attention: the per-point products of that query, splatted (module docstring).
    features: the native DETR's inference-pass `TransformerInputs` (then `images` may be None and
    the backbone is not run again).
    """
    if layers == ROLLOUT_LAYERS:
        raise ValueError("layers='rollout' is relevance_maps; attn_grad_maps takes 'last', 'mean' or an index")
    weighted, record, queries = _gradient_weighted(
        model, images, padding_mask, image_index, query_index, labels, with_self_attention=False, cross_layer=layers,
        features=features)
    valid_h, valid_w = valid_feature_size(record.feature_padding_mask[int(image_index)])
    computed = "mean" if layers == "mean" else "last"  # a single chosen layer is all that was computed
    if record.kind == "sampled":
        sampled = record.decoder_cross_sampled
        if layers != "mean":
            chosen = int(reduce_layers(torch.arange(int(sampled.weights.shape[0])), layers, dim=0))
            sampled = dataclasses.replace(sampled, locations=sampled.locations[chosen:chosen + 1],
                                          weights=sampled.weights[chosen:chosen + 1])
        cells = _sampled_maps(sampled, weighted["cross"], int(image_index), queries, (valid_h, valid_w), computed)
    else:
        cross = reduce_layers(weighted["cross"], computed, dim=1)  # (N, Q, K)
        cells = cross[torch.arange(len(queries)), queries.to(cross.device)].reshape(len(queries), valid_h, valid_w)
    return MethodMaps(cells.float(), *_geometry(record, int(image_index)))


def relevance(
    model: nn.Module,
    images: torch.Tensor,
    padding_mask: torch.Tensor | None,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    labels: torch.Tensor | Sequence[int],
    features: TransformerInputs | None = None,
) -> MethodMaps:
    """Chefer et al. (ICCV 2021) relevance of each detection over the valid cells: (N, hv, wv).

    Encoder-decoder detectors: Ā = E_h[(∇A ⊙ A)⁺] of every encoder self-, decoder self- and
    decoder cross-attention for the detection's class logit; R_ii = `self_relevance`(Ā_enc) and
    R_qi = `decoder_rollout`(Ā_cross, Ā_self, R_ii) (see `detection.attention.aggregate` for the
    rules); map n = row query_index[n] of its R_qi. ViT detectors (YOLOS, OWL-ViT, OWLv2): R = I,
    R += Ā·R per layer over all tokens; map n = R's row of detection token query_index[n] (the
    graph's last `record.num_queries` tokens: YOLOS's detection tokens, OWL's patch tokens) over
    the valid patches.
    Float32, >= 0. Dense attention only (ValueError for deformable families). features: as `attn_grad`.
    """
    family = getattr(model, "family", None)
    if family is not None and getattr(family, "attention", "dense") != "dense":
        raise ValueError(f"relevance needs dense attention; {getattr(family, 'title', family)} samples points")

    def tokens_rows(kinds: dict[str, torch.Tensor], chunk_queries: torch.Tensor,
                    record: AttentionRecord) -> dict[str, torch.Tensor]:
        if "tokens" not in kinds:
            return kinds
        tokens = kinds["tokens"]  # (n, L, T, T); the detection tokens are the last record.num_queries
        first_detection = tokens.shape[-1] - record.num_queries
        rows = [self_relevance_rows(tokens[n], [first_detection + int(query)])[0]
                for n, query in enumerate(chunk_queries.tolist())]
        return {"rows": torch.stack(rows)}  # (n, T)

    weighted, record, queries = _gradient_weighted(
        model, images, padding_mask, image_index, query_index, labels, with_self_attention=True, finish=tokens_rows,
        features=features)
    valid_h, valid_w = valid_feature_size(record.feature_padding_mask[int(image_index)])
    if "rows" in weighted:  # YOLOS: patch tokens 1 .. h·w, row-major
        flat = valid_flat_indices(record.feature_size, valid_h, valid_w).to(weighted["rows"].device)
        maps = weighted["rows"][:, 1 + flat]
    else:
        encoder = weighted.get("encoder")  # the rules' products batched over the detections
        relevance_ii = self_relevance(encoder) if encoder is not None else None  # (N, K, K)
        relevance_qi = decoder_rollout(weighted["cross"], weighted["decoder_self"], relevance_ii)  # (N, Q, K)
        maps = relevance_qi[torch.arange(len(queries)), queries.to(relevance_qi.device)]
    return MethodMaps(maps.reshape(len(queries), valid_h, valid_w).float(), *_geometry(record, int(image_index)))


def attn_grad_maps(
    model: nn.Module,
    images: torch.Tensor,
    padding_mask: torch.Tensor | None,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    labels: torch.Tensor | Sequence[int],
    layers: LayerChoice = "last",
    features: TransformerInputs | None = None,
) -> torch.Tensor:
    """`attn_grad`'s values: (N, hv, wv) float32, >= 0."""
    return attn_grad(model, images, padding_mask, image_index, query_index, labels, layers, features).values


def relevance_maps(
    model: nn.Module,
    images: torch.Tensor,
    padding_mask: torch.Tensor | None,
    image_index: int,
    query_index: torch.Tensor | Sequence[int],
    labels: torch.Tensor | Sequence[int],
    features: TransformerInputs | None = None,
) -> torch.Tensor:
    """`relevance`'s values: (N, hv, wv) float32, >= 0."""
    return relevance(model, images, padding_mask, image_index, query_index, labels, features).values


