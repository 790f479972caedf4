"""Optional training-only dense supervision of the encoder memory (dropped at export).

DETR trained from scratch sits on a long plateau where every query predicts the mean box:
the set loss is a weak, indirect signal for a randomly initialised backbone and encoder.
This auxiliary head gives every encoder cell a direct target — the class of the ground-truth
box whose interior contains the cell centre (smallest box wins, else background) and that
box (normalised cxcywh) — so the memory the decoder attends to learns "what is here and how
far it extends" from the first steps. The shipped model is plain DETR: the head lives in
`DenseSupervision`, outside `DETR`, and is never saved with the model weights.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou

from detection.boxes import cxcywh_to_xyxy


def dense_targets(targets: Sequence[dict[str, Any]], feature_size: tuple[int, int], stride: int,
                  num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell (labels (B, h*w) int64, boxes (B, h*w, 4) normalised cxcywh).

    Cell (y, x) has its centre at ((x + 0.5) * stride, (y + 0.5) * stride) input pixels; it is
    labelled with the smallest target box containing that point (normalised by the image's
    unpadded `size`), `num_classes` (background) if none, -100 (ignored) on padding.
    """
    h, w = feature_size
    labels, boxes = [], []
    for target in targets:
        height, width = (float(v) for v in target["size"])
        device = target["boxes"].device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride / height
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride / width
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        cx, cy = cx.reshape(-1), cy.reshape(-1)
        cell_labels = torch.full((h * w,), num_classes, dtype=torch.int64, device=device)
        cell_labels[(cx > 1) | (cy > 1)] = -100  # padding
        cell_boxes = torch.zeros((h * w, 4), device=device)
        gt = target["boxes"].float()
        if len(gt):
            xyxy = cxcywh_to_xyxy(gt)
            inside = ((cx[:, None] >= xyxy[None, :, 0]) & (cx[:, None] <= xyxy[None, :, 2])
                      & (cy[:, None] >= xyxy[None, :, 1]) & (cy[:, None] <= xyxy[None, :, 3]))
            area = (gt[:, 2] * gt[:, 3])[None].expand_as(inside)
            area = torch.where(inside, area, torch.full_like(area, float("inf")))
            best = area.argmin(dim=1)
            hit = inside.any(dim=1) & (cell_labels != -100)
            cell_labels[hit] = target["labels"][best[hit]]
            cell_boxes[hit] = gt[best[hit]]
        labels.append(cell_labels)
        boxes.append(cell_boxes)
    return torch.stack(labels), torch.stack(boxes)


class DenseSupervision(nn.Module):
    """Wraps a DETR for training: same forward and outputs, plus "dense_logits" (B, hw, K+1)
    and "dense_boxes" (B, hw, 4) predicted from the encoder memory (captured by a hook)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        hidden, num_classes = model.config.hidden_dim, model.config.num_classes
        self.class_head = nn.Linear(hidden, num_classes + 1)
        self.box_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4))
        self._captured: dict[str, Any] = {}
        self._active = False
        model.transformer.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active:  # the bare model runs too (evaluation): nothing to keep
            return
        self._captured["memory"] = output.memory
        self._captured["feature_size"] = tuple(args[1].shape[-2:])  # padding_mask (B, h, w)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict[str, Any]:
        self._active = True
        try:
            outputs = self.model(images, padding_mask)
        finally:
            self._active = False
        memory = self._captured.pop("memory")
        outputs["dense_logits"] = self.class_head(memory)
        outputs["dense_boxes"] = self.box_head(memory).sigmoid()
        outputs["dense_feature_size"] = self._captured.pop("feature_size")
        return outputs


def dense_losses(outputs: dict[str, Any], targets: Sequence[dict[str, Any]], stride: int,
                 num_classes: int) -> dict[str, torch.Tensor]:
    """{"loss_dense_ce": CE over non-padding cells, "loss_dense_box": L1 + (1 - GIoU) over
    cells inside an object (0 when there is none)}."""
    logits, boxes = outputs["dense_logits"].float(), outputs["dense_boxes"].float()
    labels, target_boxes = dense_targets(targets, outputs["dense_feature_size"], stride, num_classes)
    loss_ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
    fg = (labels >= 0) & (labels < num_classes)
    if fg.any():
        src, tgt = boxes[fg], target_boxes[fg]
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))
        loss_box = F.l1_loss(src, tgt, reduction="mean") * 4 + (1 - giou).mean()
    else:
        loss_box = boxes.sum() * 0.0
    return {"loss_dense_ce": loss_ce, "loss_dense_box": loss_box}
