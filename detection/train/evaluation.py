"""Evaluation during training: pycocotools box AP of the model on the validation set, and
the pointing game of its last-layer, head-mean decoder cross-attention."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from detection.attention.maps import detection_maps
from detection.attention.matching import annotation_region, match_detections
from detection.attention.metrics import pointing_game as pointing_hit
from detection.boxes import coco_xywh
from detection.data.coco import CocoDetection, collate
from detection.evaluation.bbox import evaluate_bbox
from detection.postprocess import postprocess
from detection.runtime.device import autocast


@torch.no_grad()
def evaluate_during_training(model: nn.Module, dataset: CocoDetection, device: torch.device,
                             precision: str = "fp32", batch_size: int = 8, score_threshold: float = 0.0,
                             attention_threshold: float = 0.5, pointing_game: bool = True,
                             max_images: int | None = None, progress: bool = False) -> dict[str, Any]:
    """COCO bbox AP of `model` on `dataset` (which must use `EvalTransform`, the inference rule),
    plus the pointing game: for each detection with score >= attention_threshold matched to a GT
    of its class (IoU >= 0.5, greedy by score), is the argmax of its last-layer, head-mean
    cross-attention map (mapped to the original image) inside the GT mask?

    Returns {the twelve COCO stats by name, "num_images", and with `pointing_game`:
    "pointing_game" (hit rate) and "pointing_game_n" (matched detections scored)}.
    """
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset)))[: max_images or None]
    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    label_map = dataset.label_map
    results, hits = [], []
    if progress:
        loader = tqdm(loader, desc="eval", unit="batch", leave=False, disable=None)  # terminals only
    for images, mask, targets in loader:
        with autocast(device, precision, training=True):
            outputs = model(images.to(device), mask.to(device), cross_attention=pointing_game)
        sizes = torch.stack([t["orig_size"] for t in targets])
        detections = postprocess(outputs, sizes, model.config.class_names, score_threshold=score_threshold,
                                 rule=model.postprocess_rule)
        for b, (det, target) in enumerate(zip(detections, targets)):
            image_id = target["image_id"]
            boxes = det.boxes.numpy().astype(np.float64)
            categories = np.array([label_map.category_id(int(l)) for l in det.labels.tolist()], dtype=np.int64)
            for bbox, score, category in zip(coco_xywh(boxes, decimals=None), det.scores.tolist(), categories):
                results.append({"image_id": int(image_id), "category_id": int(category), "score": float(score),
                                "bbox": bbox})
            if not pointing_game:
                continue
            confident = np.nonzero(det.scores.numpy() >= attention_threshold)[0]
            gts = [a for a in dataset.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
            if len(confident) == 0 or not gts:
                continue
            gt_boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                 for a in gts], dtype=np.float64)
            matched = match_detections(boxes[confident], det.scores.numpy()[confident], categories[confident],
                                       gt_boxes, np.array([a["category_id"] for a in gts]))
            maps = detection_maps(outputs["attention"], b, det.query_index[confident], det.image_size,
                                  heads="mean", layers="last", normalize=None)
            for k, gt_index in enumerate(matched):
                if gt_index >= 0:
                    hits.append(pointing_hit(maps[k], annotation_region(gts[gt_index], det.image_size)))
    image_ids = [dataset.image_ids[i] for i in indices]
    evaluation = evaluate_bbox(dataset.coco.dataset, results, image_ids, list(label_map.category_ids))
    metrics: dict[str, Any] = dict(evaluation.stats)
    metrics["num_images"] = len(image_ids)
    if pointing_game:
        metrics["pointing_game"] = float(np.mean(hits)) if hits else 0.0
        metrics["pointing_game_n"] = len(hits)
    if was_training:
        model.train()
    return metrics
