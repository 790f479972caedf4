"""Raw DETR outputs -> per-image Detections in ORIGINAL image pixels.

Boxes are predicted as cxcywh normalised to each image's unpadded (resized) extent, so scaling
by the ORIGINAL (height, width) maps them straight to original pixels: the resize preserves
relative positions and padding is outside the normalised range.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from detection.boxes import cxcywh_to_xyxy
from detection.structures import Detections


def postprocess(outputs: Mapping[str, Any], original_sizes: torch.Tensor | Sequence[Sequence[int]],
                class_names: Sequence[str], score_threshold: float = 0.7) -> list[Detections]:
    """Turn model outputs into Detections, one per image.

    outputs: {"pred_logits": (B, Q, C + 1), "pred_boxes": (B, Q, 4) normalised cxcywh}.
    original_sizes: (B, 2) (height, width) of each ORIGINAL image in pixels.
    class_names: C names, label index -> name (the model's config.class_names).
    score_threshold: keep queries whose best real-class probability is > threshold.

    Scores are softmax over all C + 1 classes; the no-object class is dropped and the best of
    the remaining C gives (score, label), as the DETR authors' PostProcess. Each kept
    detection carries `query_index`, its decoder query, to find its attention. Detections are
    sorted by descending score (ties by query index). Boxes are xyxy float32 in original
    pixels, not clipped (an object may extend slightly beyond the image, as the model predicts).
    """
    logits = outputs["pred_logits"]
    boxes = outputs["pred_boxes"]
    if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise ValueError(f"expected pred_logits (B, Q, C+1) and pred_boxes (B, Q, 4), got "
                         f"{tuple(logits.shape)} and {tuple(boxes.shape)}")
    num_classes = logits.shape[-1] - 1
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes (+ no object)")
    sizes = torch.as_tensor(original_sizes, dtype=torch.float32).reshape(-1, 2)
    if sizes.shape[0] != logits.shape[0]:
        raise ValueError(f"{sizes.shape[0]} original sizes for a batch of {logits.shape[0]}")

    probs = logits.float().softmax(-1)[..., :-1]
    scores, labels = probs.max(-1)
    xyxy = cxcywh_to_xyxy(boxes.float())
    results = []
    for i in range(logits.shape[0]):
        height, width = sizes[i].tolist()
        keep = torch.nonzero(scores[i] > score_threshold).flatten()
        order = torch.argsort(scores[i, keep], descending=True, stable=True)
        keep = keep[order].cpu()
        image_boxes = xyxy[i, keep].cpu() * torch.tensor([width, height, width, height])
        image_labels = labels[i, keep].cpu().to(torch.int64)
        results.append(Detections(
            (int(height), int(width)),
            boxes=image_boxes.to(torch.float32),
            scores=scores[i, keep].cpu().to(torch.float32),
            labels=image_labels,
            query_index=keep.to(torch.int64),
            class_names=[class_names[int(label)] for label in image_labels],
        ))
    return results
