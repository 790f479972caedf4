"""Hungarian matching of DETR predictions to ground truth (one-to-one, scipy).

Cost of assigning prediction q to target t (DETR, Carion et al. 2020):
    cost_class * (-p_q[label_t]) + cost_bbox * L1(box_q, box_t) + cost_giou * (-GIoU(box_q, box_t))
with boxes normalised cxcywh (L1) and converted to xyxy for GIoU.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

from detection.boxes import cxcywh_to_xyxy


def matching_cost(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, tgt_labels: torch.Tensor,
                  tgt_boxes: torch.Tensor, cost_class: float = 1.0, cost_bbox: float = 5.0,
                  cost_giou: float = 2.0) -> torch.Tensor:
    """(Q, T) cost matrix of one image.

    pred_logits (Q, K+1), pred_boxes (Q, 4) normalised cxcywh, tgt_labels (T,) in 0..K-1,
    tgt_boxes (T, 4) normalised cxcywh. Computed in float32 whatever the input dtype.
    """
    prob = pred_logits.float().softmax(-1)
    pred_boxes = pred_boxes.float()
    tgt_boxes = tgt_boxes.float()
    cost = -cost_class * prob[:, tgt_labels]
    cost = cost + cost_bbox * torch.cdist(pred_boxes, tgt_boxes, p=1)
    cost = cost - cost_giou * generalized_box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(tgt_boxes))
    return cost


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment per image; predictions left over are "no object"."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, torch.Tensor]]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits (B, Q, K+1), pred_boxes (B, Q, 4); targets: per image
        {"labels": (T_b,), "boxes": (T_b, 4)}.

        Returns per image (pred_index, target_index), int64 (min(Q, T_b),) each, pred_index
        sorted ascending.
        """
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        indices = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = matching_cost(pred_logits[b], pred_boxes[b], target["labels"], target["boxes"],
                                 self.cost_class, self.cost_bbox, self.cost_giou)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
