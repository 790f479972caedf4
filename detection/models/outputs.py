"""The attention a DETR forward pass returns on request, with the geometry needed to map it.

Conventions shared by every consumer (maps, metrics, rendering):
  * feature grid (h, w) is row-major; flattened index = y * w + x;
  * feature cell (y, x) covers input pixels [y*stride, (y+1)*stride) x [x*stride, (x+1)*stride)
    of the padded input batch (input = after resize, before/with padding);
  * padding masks are True where there is padding (authors' convention; HF's pixel_mask is
    the negation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionRecord:
    """Attention weights of one forward pass over a (padded) batch.

    decoder_cross: (L_dec, B, heads, Q, h, w) float32 softmax weights of each decoder query
        over the encoder memory, every layer and every head (not averaged). Padded cells are 0.
    feature_padding_mask: (B, h, w) bool, True on feature cells that are padding.
    feature_stride: input pixels per feature cell (32 for R50/R101, 16 for DC5, patch size
        for ViT backbones).
    input_size: (H, W) of the padded input batch, in input pixels.
    image_sizes: (B, 2) int64, (height, width) of each image in input pixels before padding.
    encoder_self: optional (L_enc, B, heads, h*w, h*w); [..., i, j] is how much feature
        cell i (query) attends to cell j (key), flattened row-major.
    decoder_self: optional (L_dec, B, heads, Q, Q).
    """

    decoder_cross: torch.Tensor
    feature_padding_mask: torch.Tensor
    feature_stride: int
    input_size: tuple[int, int]
    image_sizes: torch.Tensor
    encoder_self: torch.Tensor | None = None
    decoder_self: torch.Tensor | None = None

    @property
    def feature_size(self) -> tuple[int, int]:
        return int(self.decoder_cross.shape[-2]), int(self.decoder_cross.shape[-1])

    def select_image(self, index: int) -> "AttentionRecord":
        """The record of one image of the batch (batch dimension kept, size 1)."""
        sl = slice(index, index + 1)
        return AttentionRecord(
            decoder_cross=self.decoder_cross[:, sl],
            feature_padding_mask=self.feature_padding_mask[sl],
            feature_stride=self.feature_stride,
            input_size=self.input_size,
            image_sizes=self.image_sizes[sl],
            encoder_self=None if self.encoder_self is None else self.encoder_self[:, sl],
            decoder_self=None if self.decoder_self is None else self.decoder_self[:, sl],
        )
