"""Raw detector outputs -> per-image Detections in ORIGINAL image pixels, by the model's rule.

Boxes are predicted as cxcywh normalised to each image's unpadded (resized) extent, so scaling
by the ORIGINAL (height, width) maps them straight to original pixels: the resize preserves
relative positions and padding is outside the normalised range.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torchvision.ops import batched_nms

from detection.boxes import cxcywh_to_xyxy
from detection.models.contract import PostprocessRule
from detection.structures import Detections

SOFTMAX_NO_OBJECT = PostprocessRule.softmax_no_object()


def postprocess(outputs: Mapping[str, Any], original_sizes: torch.Tensor | Sequence[Sequence[int]],
                class_names: Sequence[str], score_threshold: float = 0.7,
                rule: PostprocessRule | None = None) -> list[Detections]:
    """Turn model outputs into Detections, one per image.

    outputs: {"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4) normalised cxcywh}, with
        K = C + 1 for "softmax_no_object" and K = C for the sigmoid rules.
    original_sizes: (B, 2) (height, width) of each ORIGINAL image in pixels.
    class_names: C names, label index -> name (the model's config.class_names).
    score_threshold: keep detections whose score is > threshold.
    rule: the detector's PostprocessRule (`model.postprocess_rule`); None = softmax_no_object.

    softmax_no_object (DETR): softmax over all C + 1 classes; the no-object class is dropped
    and the best of the remaining C gives (score, label), as the DETR authors' PostProcess.
    sigmoid_topk: sigmoid per class, the rule's top_k best (query, class) pairs over Q x C,
    then the threshold; a query may appear once per class.
    sigmoid_max (OWL, Grounding DINO): sigmoid per class, each query's best class gives (score,
    label); where outputs hold "pred_score_logits" (B, Q) (Grounding DINO: the maximum over every
    prompt token, HF's score), the score is its sigmoid and the label still the best class.
    Each detection carries `query_index`, its decoder query, to find its attention. Where outputs
    hold "text_labeler" (a callable (image index, query) -> str: Grounding DINO's), each detection
    also carries `hf_label`, HF's own text label (the tokens above its text threshold); where they
    hold "objectness_logits" (B, Q) (OWLv2's class-agnostic objectness), `objectness_logit`.
    Detections are sorted by descending score, ties by query index (then label). Boxes are
    xyxy float32 in original pixels, not clipped (an object may extend slightly beyond the
    image, as the model predicts) -- except under a rule with `class_nms_iou` (OmDet-Turbo):
    class-wise NMS, then boxes clipped to the image.
    """
    rule = rule or SOFTMAX_NO_OBJECT
    logits = outputs["pred_logits"]
    boxes = outputs["pred_boxes"]
    extra = rule.logit_classes(0)
    if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise ValueError(f"expected pred_logits (B, Q, C{'+1' if extra else ''}) and pred_boxes (B, Q, 4), "
                         f"got {tuple(logits.shape)} and {tuple(boxes.shape)}")
    num_classes = logits.shape[-1] - extra
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes"
                         f"{' (+ no object)' if extra else ''}")
    sizes = torch.as_tensor(original_sizes, dtype=torch.float32).reshape(-1, 2)
    if sizes.shape[0] != logits.shape[0]:
        raise ValueError(f"{sizes.shape[0]} original sizes for a batch of {logits.shape[0]}")
    probs = rule.class_probabilities(logits)  # (B, Q, C)
    if rule.kind == "sigmoid_topk":
        selected = _sigmoid_topk(probs, score_threshold, rule.top_k)
    elif rule.kind == "sigmoid_max" and outputs.get("pred_score_logits") is not None:
        selected = _softmax_no_object(probs, score_threshold, outputs["pred_score_logits"].float().sigmoid())
    else:
        selected = _softmax_no_object(probs, score_threshold)
    xyxy = cxcywh_to_xyxy(boxes.float())
    labeler = outputs.get("text_labeler")  # prompted families: HF's own text label of (image, query)
    results = []
    for i, (scores, labels, queries) in enumerate(selected):
        extra = {} if labeler is None else {"hf_label": [labeler(i, int(q)) for q in queries.tolist()]}
        if outputs.get("objectness_logits") is not None:
            extra["objectness_logit"] = outputs["objectness_logits"][i, queries.to(logits.device)].float().cpu()
        height, width = sizes[i].tolist()
        image_boxes = xyxy[i, queries].cpu() * torch.tensor([width, height, width, height])
        image_labels = labels.cpu().to(torch.int64)
        if rule.class_nms_iou is not None:
            image_boxes, scores, image_labels, queries, extra = _class_nms(
                image_boxes, scores.cpu(), image_labels, queries, extra, rule.class_nms_iou, (height, width))
        results.append(Detections(
            (int(height), int(width)),
            boxes=image_boxes.to(torch.float32),
            scores=scores.cpu().to(torch.float32),
            labels=image_labels,
            query_index=queries.to(torch.int64),
            class_names=[class_names[int(label)] for label in image_labels],
            **extra,
        ))
    return results


def _softmax_no_object(probs: torch.Tensor, score_threshold: float, query_scores: torch.Tensor | None = None
                       ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """probs (B, Q, C) -> per image (scores, labels, query indices on the CPU), sorted; one
    detection per query (query_scores (B, Q): the scores, when not the best class's)."""
    scores, labels = probs.max(-1)
    if query_scores is not None:
        scores = query_scores
    selected = []
    for i in range(probs.shape[0]):
        keep = torch.nonzero(scores[i] > score_threshold).flatten()
        order = torch.argsort(scores[i, keep], descending=True, stable=True)
        keep = keep[order].cpu()
        selected.append((scores[i, keep], labels[i, keep], keep))
    return selected


def _sigmoid_topk(probs: torch.Tensor, score_threshold: float, top_k: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """probs (B, Q, C) -> per image (scores, labels, query indices on the CPU) of the top_k
    (query, class) pairs."""
    num_classes = probs.shape[-1]
    probs = probs.flatten(1)  # (B, Q * C), index = query * C + class
    selected = []
    for i in range(probs.shape[0]):
        # a stable descending sort, not topk: equal scores keep (query, class) order
        order = torch.argsort(probs[i], descending=True, stable=True)[:top_k]
        order = order[probs[i, order] > score_threshold].cpu()
        selected.append((probs[i, order], order % num_classes, order // num_classes))
    return selected


def _class_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
               extra: dict, iou: float, size: tuple[float, float]) -> tuple:
    """Class-wise NMS at `iou` on (N, 4) xyxy original-pixel boxes (kept in descending score), then the
    boxes clipped to the (height, width) image, as OmDet-Turbo's HF post-processing does."""
    keep = batched_nms(boxes.float(), scores.float(), labels, iou)
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    height, width = size
    clipped = torch.stack([boxes[keep, 0].clamp(0, width), boxes[keep, 1].clamp(0, height),
                           boxes[keep, 2].clamp(0, width), boxes[keep, 3].clamp(0, height)], dim=-1)
    kept = keep.tolist()
    return (clipped, scores[keep], labels[keep], queries[keep.to(queries.device)],
            {key: [values[k] for k in kept] for key, values in extra.items()})

