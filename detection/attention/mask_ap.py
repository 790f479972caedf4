"""COCO segm AP of explanation masks (Chefer et al. 2021): pycocotools with IoU thresholds from 0.2.

`detection.attention.metrics` turns maps into masks and results; this module only scores them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools.cocoeval import COCOeval

from detection.data.ground_truth import call_quietly, coco_from_dataset

# Chefer et al. lower the COCO IoU thresholds to 0.2 because explanation masks are coarse.
# The 0.5..0.95 part is built exactly like pycocotools' default array, so the standard
# (0.5:0.95) mask AP read from these rows is bit-identical to a separate default run.
STANDARD_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
EXPLANATION_IOU_THRESHOLDS = np.concatenate([np.linspace(0.2, 0.45, 6), STANDARD_IOU_THRESHOLDS])


def _gt_with_segmentation(gt_dataset: dict[str, Any]) -> dict[str, Any]:
    """GT copy where annotations without a segmentation get their box as a polygon."""
    annotations = []
    for ann in gt_dataset["annotations"]:
        if not ann.get("segmentation"):
            x, y, w, h = ann["bbox"]
            ann = dict(ann, segmentation=[[x, y, x, y + h, x + w, y + h, x + w, y]])
        annotations.append(ann)
    return dict(gt_dataset, annotations=annotations)


def mask_ap(
    gt_dataset: dict[str, Any],
    mask_results: list[dict[str, Any]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
) -> dict[str, float]:
    """COCO segm AP of explanation masks.

    mask_results: [{"image_id", "category_id", "segmentation": RLE, "score"}].
    Returns mask_ap (IoU 0.2:0.95, Chefer et al.), mask_ap_standard (0.5:0.95), mask_ap50,
    each the mean of COCO precision (area "all", 100 detections) over categories with GT and
    over the thresholds; -1 when no category has GT in the subset (COCO's convention).
    Empty results are scored properly (all 0 where GT exists) instead of crashing loadRes([]).
    """
    gt = coco_from_dataset(_gt_with_segmentation(gt_dataset))
    if mask_results:
        dt, _ = call_quietly(lambda: gt.loadRes([dict(r) for r in mask_results]))
    else:
        dt = coco_from_dataset(
            {"images": list(gt_dataset["images"]), "categories": list(gt_dataset["categories"]), "annotations": []}
        )
    evaluator = COCOeval(gt, dt, iouType="segm")
    evaluator.params.imgIds = list(image_ids)
    evaluator.params.catIds = list(category_ids)
    evaluator.params.iouThrs = EXPLANATION_IOU_THRESHOLDS.copy()
    call_quietly(lambda: (evaluator.evaluate(), evaluator.accumulate()))
    # precision: (T, R, K, A, M); area "all" = 0, maxDets 100 = last
    precision = evaluator.eval["precision"][:, :, :, 0, -1]

    def mean_valid(rows: np.ndarray) -> float:
        valid = rows[rows > -1]
        return float(valid.mean()) if valid.size else -1.0

    standard_rows = np.isin(evaluator.params.iouThrs, STANDARD_IOU_THRESHOLDS)
    return {
        "mask_ap": mean_valid(precision),
        "mask_ap_standard": mean_valid(precision[standard_rows]),
        "mask_ap50": mean_valid(precision[evaluator.params.iouThrs == STANDARD_IOU_THRESHOLDS[0]]),
    }
