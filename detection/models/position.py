"""Sine position encoding of a feature grid, exactly as DETR's PositionEmbeddingSine."""
from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionEncoding(nn.Module):
    """2-D sine/cosine encoding computed from the feature padding mask.

    Positions are the cumulative count of real (non-padding) cells along y and x, so each image
    of a padded batch is encoded relative to its own extent; with `normalize=True` they are
    divided by the last real cell's count and scaled to [0, scale]. Output channels are
    [y features (num_pos_feats), x features (num_pos_feats)], each interleaving sin/cos.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0,
                 normalize: bool = True, scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("a position scale needs normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, feature_padding_mask: torch.Tensor) -> torch.Tensor:
        """feature_padding_mask (B, h, w) bool, True on padding -> (B, 2*num_pos_feats, h, w) float32."""
        not_mask = (~feature_padding_mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
