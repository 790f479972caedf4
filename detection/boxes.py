"""Box format conversions. Formats: xyxy (corners), cxcywh (centre + size), xywh (COCO).

The converters work on float tensors (..., 4); normalised or pixel units are the caller's
choice. `coco_xywh` is the one xyxy -> COCO [x, y, w, h] list conversion for written outputs.
IoU / GIoU come from torchvision.ops (box_iou, generalized_box_iou) on xyxy boxes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def coco_xywh(boxes_xyxy: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
              decimals: int | None = 3) -> list[list[float]]:
    """(N, 4) xyxy pixels -> N COCO [x, y, w, h] Python lists, as every written output has it.

    Arithmetic: each float32 corner is widened to float64 first, the width / height are
    float64 differences, then each value is rounded to `decimals` (None: not rounded).
    """
    rows = np.asarray(boxes_xyxy.cpu() if isinstance(boxes_xyxy, torch.Tensor) else boxes_xyxy)
    rows = rows.astype(np.float64).reshape(-1, 4).tolist()
    out = []
    for x0, y0, x1, y1 in rows:
        values = [x0, y0, x1 - x0, y1 - y0]
        out.append(values if decimals is None else [round(v, decimals) for v in values])
    return out
