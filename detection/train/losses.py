"""DETR set criterion: classification (with a down-weighted "no object" class), L1 and GIoU
box losses on Hungarian-matched pairs, repeated on every auxiliary decoder layer.

Normalisation as in DETR: box losses are summed over matched pairs and divided by the number
of target boxes in the whole (distributed) batch, at least 1; the classification loss is the
class-weighted mean cross-entropy over all queries (PyTorch's weighted `mean` reduction).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou

from detection.boxes import cxcywh_to_xyxy
from detection.train.matcher import HungarianMatcher

DEFAULT_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


class SetCriterion(nn.Module):
    """Losses of one DETR forward pass.

    num_classes: K (real classes); logits have K+1 columns, column K = "no object".
    eos_coef: weight of the "no object" class in the cross-entropy (DETR: 0.1).
    weight_dict: loss name -> weight for the total; aux losses "loss_ce_0", ... reuse the
        weight of their base name.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, eos_coef: float = 0.1,
                 weight_dict: dict[str, float] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.weight_dict = dict(weight_dict or DEFAULT_WEIGHTS)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, logits: torch.Tensor, targets: Sequence[dict], indices) -> torch.Tensor:
        """Weighted CE over all (B, Q) queries; unmatched queries target class K (no object)."""
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            target_classes[b, pred_idx.to(logits.device)] = targets[b]["labels"].to(logits.device)[tgt_idx.to(logits.device)]
        return F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight.to(logits.device))

    def loss_boxes(self, boxes: torch.Tensor, targets: Sequence[dict], indices, num_boxes: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L1 sum / num_boxes, (1 - GIoU) sum / num_boxes) over matched pairs."""
        src = torch.cat([boxes[b, p.to(boxes.device)] for b, (p, _) in enumerate(indices)]).float()
        tgt = torch.cat([targets[b]["boxes"].to(boxes.device)[t.to(boxes.device)]
                         for b, (_, t) in enumerate(indices)]).float()
        if src.numel() == 0:
            zero = boxes.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) connected
            return zero, zero.clone()
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
        return loss_bbox, loss_giou

    def _layer_losses(self, outputs: dict[str, Any], targets, num_boxes: float) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        loss_bbox, loss_giou = self.loss_boxes(outputs["pred_boxes"], targets, indices, num_boxes)
        return {"loss_ce": self.loss_labels(outputs["pred_logits"], targets, indices),
                "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, torch.Tensor]]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (weighted total loss (scalar), dict of every unweighted loss term)."""
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)),
                                 device=outputs["pred_logits"].device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        num_boxes = float(num_boxes.clamp(min=1).item())
        losses = self._layer_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update({f"{k}_{i}": v for k, v in self._layer_losses(aux, targets, num_boxes).items()})
        total = sum(self.weight_dict[self._base(k)] * v for k, v in losses.items())
        return total, losses

    @staticmethod
    def _base(name: str) -> str:
        head, _, tail = name.rpartition("_")
        return head if tail.isdigit() else name
