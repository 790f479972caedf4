"""Attention aggregation: over heads, over layers, rollout through encoder/decoder, normalisation.

Everything here works on attention already cut down to ONE image and to the VALID (unpadded)
feature cells, so no function needs to know about padding (`detection.attention.maps` does the
cutting and the mapping to image pixels). Shapes use: L layers, heads, Q queries, K valid cells.

Rollout definitions (both on raw softmax attention, no gradients):

* `encoder_rollout` -- Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020):
  per layer Ã_l = 0.5·A_l + 0.5·I with rows renormalised to sum 1 (the residual path counts
  as much as attention), and rollout = Ã_L · … · Ã_2 · Ã_1 (later layers on the left), so row i
  says how much input token j flows into output token i.

* `decoder_rollout` -- the encoder-decoder propagation rules of Chefer, Gur & Wolf, "Generic
  Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"
  (ICCV 2021), rules 6-7 and 8-11, with the head-aggregated RAW attention Ā standing in for
  their gradient-weighted E_h[(∇A ⊙ A)+] (the paper's "raw attention" variant of the rules):

      R_ii = encoder relevance (K, K); I when no encoder attention is used;
             with encoder self-attention: R_ii = I, then per encoder layer R_ii += Ā_enc · R_ii
      R_qq = I (Q, Q),  R_qi = 0 (Q, K)
      per decoder layer, in the layer's order (self-attention first, then cross-attention):
          self:   R_qq += Ā_self · R_qq ;   R_qi += Ā_self · R_qi
          cross:  R_qi += R̄_qqᵀ · Ā_cross · R̄_ii
      where R̄ = rownorm(R − I) + I ("handle residual", their eqs. 8-9): the identity part is
      removed, each row is rescaled to sum 1, and the identity is added back. One deviation:
      a row of R − I that sums to 0 (e.g. R_qq = I when no decoder self-attention is given)
      stays 0 instead of becoming NaN, so R̄ = I there and the cross term is Ā_cross · R̄_ii.
      The transpose on R̄_qq follows the rule as published and in the authors' code.
  Row q of the final R_qi is the relevance of every valid cell for query q.

Normalisation of finished maps (image coordinates) lives here too: `normalize_maps`.
"""
from __future__ import annotations

from typing import Literal, Union

import numpy as np
import torch

HeadChoice = Union[Literal["mean", "max"], int]
LayerChoice = Union[Literal["last", "mean", "rollout"], int]
#: The layer choice that propagates through the layers instead of reducing them (the maps of the
#: rollout method: `decoder_rollout`); the one spelling of that choice.
ROLLOUT_LAYERS = "rollout"
NormalizeChoice = Union[Literal["minmax", "percentile"], None]


def _as_index(choice: object) -> object:
    """"2" / "-1" (from a command line) -> 2 / -1; anything else unchanged."""
    if isinstance(choice, str) and choice.lstrip("-").isdigit():
        return int(choice)
    return choice


def reduce_heads(attention: torch.Tensor, heads: HeadChoice = "mean", dim: int = 1) -> torch.Tensor:
    """Aggregate the head dimension `dim`: "mean", "max" (element-wise) or one head index.

    The returned tensor has `dim` removed. A negative head index counts from the end; an index
    may also be given as a string ("2", "-1").
    """
    count = attention.shape[dim]
    heads = _as_index(heads)
    if heads == "mean":
        return attention.mean(dim=dim)
    if heads == "max":
        return attention.amax(dim=dim)
    if isinstance(heads, (int, np.integer)) and not isinstance(heads, bool):
        if not -count <= int(heads) < count:
            raise ValueError(f"head index {heads} out of range: the attention has {count} heads")
        return attention.select(dim, int(heads))
    raise ValueError(f"heads must be 'mean', 'max' or an int head index, got {heads!r}")


def reduce_layers(attention: torch.Tensor, layers: LayerChoice = "last", dim: int = 0) -> torch.Tensor:
    """Aggregate the layer dimension `dim`: "last", "mean" or one layer index (negative ok).

    Rollout is not a reduction of one tensor; use `decoder_rollout` / `encoder_rollout`.
    """
    count = attention.shape[dim]
    layers = _as_index(layers)
    if layers == "last":
        return attention.select(dim, count - 1)
    if layers == "mean":
        return attention.mean(dim=dim)
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        if not -count <= int(layers) < count:
            raise ValueError(f"layer index {layers} out of range: the attention has {count} layers")
        return attention.select(dim, int(layers))
    raise ValueError(f"layers must be 'last', 'mean', 'rollout' or an int layer index, got {layers!r}")


def _check_square_stack(attention: torch.Tensor, name: str, batched: bool = False) -> None:
    if attention.ndim != 3 + int(batched) or attention.shape[-1] != attention.shape[-2]:
        shape = "(B, L, N, N)" if batched else "(L, N, N)"
        raise ValueError(f"{name} must be {shape} head-aggregated attention, got {tuple(attention.shape)}")


def encoder_rollout(self_attention: torch.Tensor) -> torch.Tensor:
    """Abnar & Zuidema attention rollout of (L, K, K) head-aggregated self-attention -> (K, K).

    Ã_l = rownorm(0.5·A_l + 0.5·I); result = Ã_L · … · Ã_1. Rows of the result sum to 1.
    """
    _check_square_stack(self_attention, "self_attention")
    attention = self_attention.double()
    eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    rollout = eye
    for layer in attention:
        mixed = 0.5 * layer + 0.5 * eye
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    return rollout.to(self_attention.dtype)


def self_relevance(self_attention: torch.Tensor) -> torch.Tensor:
    """Chefer et al. rule 6 for a self-attention stack (L, N, N): R = I; R += Ā_l · R per layer.
    A batch of stacks (B, L, N, N) (e.g. one per explained detection) -> (B, N, N), batched products."""
    _check_square_stack(self_attention, "self_attention", batched=self_attention.ndim == 4)
    attention = self_attention.double()
    relevance = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    for layer in attention.unbind(-3):
        relevance = relevance + layer @ relevance
    return relevance.to(self_attention.dtype)


def self_relevance_rows(self_attention: torch.Tensor, rows: torch.Tensor | list[int]) -> torch.Tensor:
    """Rows `rows` of `self_relevance(self_attention)` without forming R: (len(rows), N).

    R = (I + Ā_L)·…·(I + Ā_1), so e_rᵀ·R is built by vector-matrix products from the last layer
    down: v ← v + v·Ā_l for l = L … 1 -- O(L·N²) per row instead of O(L·N³) for all of R
    (ViTs attend over every token: thousands of them at detection resolution). Float64 inside.
    """
    _check_square_stack(self_attention, "self_attention")
    attention = self_attention.double()
    index = torch.as_tensor(rows, dtype=torch.int64, device=attention.device).reshape(-1)
    picked = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)[index]
    for layer in reversed(attention):
        picked = picked + picked @ layer
    return picked.to(self_attention.dtype)


def residual_normalized(relevance: torch.Tensor) -> torch.Tensor:
    """R̄ = rownorm(R − I) + I (Chefer et al. eqs. 8-9); all-zero rows of R − I stay zero."""
    eye = torch.eye(relevance.shape[-1], dtype=relevance.dtype, device=relevance.device)
    without_identity = relevance - eye
    row_sums = without_identity.sum(dim=-1, keepdim=True)
    safe = torch.where(row_sums == 0, torch.ones_like(row_sums), row_sums)
    return without_identity / safe + eye


def decoder_rollout(
    cross_attention: torch.Tensor,
    decoder_self_attention: torch.Tensor | None = None,
    encoder_relevance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relevance of each valid cell for each query, Chefer et al. rules on raw attention.

    cross_attention: (L, Q, K) head-aggregated decoder cross-attention, valid cells only.
    decoder_self_attention: optional (L, Q, Q) head-aggregated decoder self-attention.
    encoder_relevance: optional (K, K) R_ii (e.g. `self_relevance(encoder attention)`); I if None.
    Returns (Q, K), same dtype as `cross_attention` (computed in float64). A batch (e.g. one per
    explained detection): (B, L, Q, K), (B, L, Q, Q), (B, K, K) -> (B, Q, K), batched products.
    """
    batched = cross_attention.ndim == 4
    if cross_attention.ndim not in (3, 4):
        raise ValueError(f"cross_attention must be (L, Q, K) or (B, L, Q, K), got {tuple(cross_attention.shape)}")
    *batch, layers, queries, cells = cross_attention.shape
    cross = cross_attention.double()
    if decoder_self_attention is not None:
        _check_square_stack(decoder_self_attention, "decoder_self_attention", batched)
        if tuple(decoder_self_attention.shape) != (*batch, layers, queries, queries):
            raise ValueError(
                f"decoder_self_attention {tuple(decoder_self_attention.shape)} does not match "
                f"cross_attention (L={layers}, Q={queries})"
            )
    if encoder_relevance is not None and tuple(encoder_relevance.shape) != (*batch, cells, cells):
        raise ValueError(f"encoder_relevance must be {(*batch, cells, cells)}, got {tuple(encoder_relevance.shape)}")
    eye_cells = torch.eye(cells, dtype=torch.float64, device=cross.device)
    relevance_ii = eye_cells if encoder_relevance is None else encoder_relevance.double()
    relevance_ii_bar = residual_normalized(relevance_ii)
    relevance_qq = torch.eye(queries, dtype=torch.float64, device=cross.device)
    relevance_qi = torch.zeros((*batch, queries, cells), dtype=torch.float64, device=cross.device)
    for layer in range(layers):
        if decoder_self_attention is not None:
            self_layer = decoder_self_attention[..., layer, :, :].double()
            relevance_qq = relevance_qq + self_layer @ relevance_qq
            relevance_qi = relevance_qi + self_layer @ relevance_qi
        relevance_qi = relevance_qi + (residual_normalized(relevance_qq).transpose(-1, -2) @ cross[..., layer, :, :]
                                       @ relevance_ii_bar)
    return relevance_qi.to(cross_attention.dtype)


def normalize_maps(
    maps: np.ndarray,
    method: NormalizeChoice = "minmax",
    percentiles: tuple[float, float] = (1.0, 99.0),
    *,
    copy: bool = True,
) -> np.ndarray:
    """Normalise each map of (N, ...) to [0, 1] independently; returns float32.

    "minmax": (m − min) / (max − min). "percentile": clip to the given low/high percentiles of
    the map first (robust to a few extreme pixels), then min-max. A constant map becomes all 0
    (no location is preferred). None: returned unchanged (as float32).
    copy=False: a writeable float32 C-contiguous `maps` is normalised in place and returned (for
    callers that own a freshly made array: no second image-size buffer).
    """
    maps = np.asarray(maps, dtype=np.float32)
    in_place = not copy and maps.flags.c_contiguous and maps.flags.writeable
    if method is None:
        return maps if in_place else maps.copy()
    if method not in ("minmax", "percentile"):
        raise ValueError(f"normalize must be 'minmax', 'percentile' or None, got {method!r}")
    if maps.ndim < 2:
        raise ValueError(f"maps must be (N, ...) with one map per row, got shape {maps.shape}")
    low_q, high_q = float(percentiles[0]), float(percentiles[1])
    if method == "percentile" and not 0.0 <= low_q < high_q <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    out = maps if in_place else maps.copy()
    if out.size == 0:  # no detections (or empty maps): nothing to scale
        return out
    flat = out.reshape(len(out), -1)  # a view: the in-place steps below fill `out`
    if method == "percentile":
        low = np.percentile(flat, low_q, axis=1, keepdims=True).astype(np.float32)
        high = np.percentile(flat, high_q, axis=1, keepdims=True).astype(np.float32)
        np.clip(flat, low, high, out=flat)
    else:
        low = flat.min(axis=1, keepdims=True)
        high = flat.max(axis=1, keepdims=True)
    span = high - low
    # a constant map (span 0) carries no location information: all zeros
    scale = np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)
    flat -= low
    flat *= scale
    return out
