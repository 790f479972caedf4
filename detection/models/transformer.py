"""DETR's encoder-decoder transformer, with attention weights available on request.

Layout is batch-first: sequences are (B, L, C). Parameter names follow the DETR authors'
`models/transformer.py` (self_attn / multihead_attn with in_proj_weight, in_proj_bias,
out_proj; linear1/linear2; norm1..norm3; decoder.norm), so their checkpoints map 1:1.
Post-norm by default (`pre_norm=False`), as in every published DETR checkpoint.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MultiheadAttention(nn.Module):
    """Multi-head attention with `nn.MultiheadAttention`'s parameters and two code paths.

    * fused (`need_weights=False`): F.scaled_dot_product_attention; no weight matrix exists.
    * explicit (`need_weights=True`): softmax(q k^T / sqrt(d)) materialised and returned per
      head, (B, heads, Lq, Lk), NOT averaged over heads (nn.MultiheadAttention averages).
    Keys with key_padding_mask True get weight exactly 0 in both paths.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initialisation as nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Project x (B, L, C) with the index-th third of in_proj -> (B, heads, L, head_dim)."""
        c = self.embed_dim
        y = F.linear(x, self.in_proj_weight[index * c:(index + 1) * c],
                     self.in_proj_bias[index * c:(index + 1) * c])
        return y.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (B, Lq, C), key/value (B, Lk, C), key_padding_mask (B, Lk) True = ignore.

        Returns (output (B, Lq, C), weights (B, heads, Lq, Lk) or None).
        """
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) * (self.head_dim ** -0.5)
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            # softmax in float32 even under bf16/fp16 autocast: these weights are the product
            weights = scores.float().softmax(dim=-1)
            out = torch.matmul(F.dropout(weights, dropout_p, self.training).to(v.dtype), v)
        else:
            attn_mask = None
            if key_padding_mask is not None:
                attn_mask = ~key_padding_mask[:, None, None, :]  # SDPA: True = attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).flatten(2)
        return self.out_proj(out), weights


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    """Self-attention + FFN; position encoding added to queries and keys, not values."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 pre_norm: bool = False) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src: torch.Tensor, padding_mask: torch.Tensor | None, pos: torch.Tensor | None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """src (B, hw, C), padding_mask (B, hw), pos (B, hw, C) -> (B, hw, C), weights | None."""
        x = self.norm1(src) if self.pre_norm else src
        q = k = _with_pos(x, pos)
        attended, weights = self.self_attn(q, k, x, key_padding_mask=padding_mask, need_weights=need_weights)
        src = src + self.dropout1(attended)
        if not self.pre_norm:
            src = self.norm1(src)
        x = self.norm2(src) if self.pre_norm else src
        src = src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        if not self.pre_norm:
            src = self.norm2(src)
        return src, weights


class DecoderLayer(nn.Module):
    """Query self-attention, cross-attention over the encoder memory, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 pre_norm: bool = False) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_padding_mask: torch.Tensor | None,
                pos: torch.Tensor | None, query_pos: torch.Tensor | None,
                need_self_weights: bool = False, need_cross_weights: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """tgt (B, Q, C), memory (B, hw, C) -> (B, Q, C), self weights | None, cross weights | None."""
        x = self.norm1(tgt) if self.pre_norm else tgt
        q = k = _with_pos(x, query_pos)
        attended, self_weights = self.self_attn(q, k, x, need_weights=need_self_weights)
        tgt = tgt + self.dropout1(attended)
        if not self.pre_norm:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if self.pre_norm else tgt
        attended, cross_weights = self.multihead_attn(
            _with_pos(x, query_pos), _with_pos(memory, pos), memory,
            key_padding_mask=memory_padding_mask, need_weights=need_cross_weights)
        tgt = tgt + self.dropout2(attended)
        if not self.pre_norm:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        if not self.pre_norm:
            tgt = self.norm3(tgt)
        return tgt, self_weights, cross_weights


class TransformerEncoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm  # only with pre-norm, as in the authors' code


class TransformerDecoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm  # shared final norm, applied to every layer's output (aux outputs)


@dataclass
class TransformerOutput:
    """hidden: (L_dec, B, Q, C) decoder outputs of every layer after the shared final norm.
    memory: (B, hw, C) encoder output. Attention tensors are stacked over layers or None:
    encoder_self (L_enc, B, heads, hw, hw), decoder_self (L_dec, B, heads, Q, Q),
    decoder_cross (L_dec, B, heads, Q, hw)."""

    hidden: torch.Tensor
    memory: torch.Tensor
    encoder_self: torch.Tensor | None = None
    decoder_self: torch.Tensor | None = None
    decoder_cross: torch.Tensor | None = None


class Transformer(nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 pre_norm: bool = False) -> None:
        super().__init__()
        enc_layer = EncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers,
                                          nn.LayerNorm(d_model) if pre_norm else None)
        dec_layer = DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.decoder = TransformerDecoder(dec_layer, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The authors xavier-initialise every matrix of the transformer.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, padding_mask: torch.Tensor, query_embed: torch.Tensor,
                pos: torch.Tensor, encoder_attention: bool = False, decoder_self_attention: bool = False,
                decoder_cross_attention: bool = False) -> TransformerOutput:
        """src (B, C, h, w) projected features, padding_mask (B, h, w) True = pad,
        query_embed (Q, C) learned query positions, pos (B, C, h, w) position encoding."""
        batch = src.shape[0]
        src = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        mask = padding_mask.flatten(1)
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)

        memory = src
        enc_weights = []
        for layer in self.encoder.layers:
            memory, w = layer(memory, mask, pos, need_weights=encoder_attention)
            enc_weights.append(w)
        if self.encoder.norm is not None:
            memory = self.encoder.norm(memory)

        tgt = torch.zeros_like(query_pos)
        hidden, self_weights, cross_weights = [], [], []
        for layer in self.decoder.layers:
            tgt, sw, cw = layer(tgt, memory, mask, pos, query_pos,
                                need_self_weights=decoder_self_attention,
                                need_cross_weights=decoder_cross_attention)
            hidden.append(self.decoder.norm(tgt))
            self_weights.append(sw)
            cross_weights.append(cw)

        def stack(ws: list) -> torch.Tensor | None:
            return torch.stack(ws) if ws and ws[0] is not None else None

        return TransformerOutput(hidden=torch.stack(hidden), memory=memory,
                                 encoder_self=stack(enc_weights), decoder_self=stack(self_weights),
                                 decoder_cross=stack(cross_weights))
