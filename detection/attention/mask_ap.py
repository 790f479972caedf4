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


def _evaluated(gt_dataset: dict[str, Any], mask_results: list[dict[str, Any]], image_ids: Sequence[int],
               category_ids: Sequence[int]) -> COCOeval:
    """A COCOeval (segm, explanation IoU thresholds) of the masks after `evaluate()`."""
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
    call_quietly(evaluator.evaluate)
    return evaluator


def _summary(precision: np.ndarray, iou_thresholds: np.ndarray) -> dict[str, float]:
    """mask_ap / mask_ap_standard / mask_ap50 of a (T, R, K) precision array (-1: no GT)."""
    def mean_valid(rows: np.ndarray) -> float:
        valid = rows[rows > -1]
        return float(valid.mean()) if valid.size else -1.0

    standard_rows = np.isin(iou_thresholds, STANDARD_IOU_THRESHOLDS)
    return {
        "mask_ap": mean_valid(precision),
        "mask_ap_standard": mean_valid(precision[standard_rows]),
        "mask_ap50": mean_valid(precision[iou_thresholds == STANDARD_IOU_THRESHOLDS[0]]),
    }


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
    evaluator = _evaluated(gt_dataset, mask_results, image_ids, category_ids)
    call_quietly(evaluator.accumulate)
    # precision: (T, R, K, A, M); area "all" = 0, maxDets 100 = last
    return _summary(evaluator.eval["precision"][:, :, :, 0, -1], evaluator.params.iouThrs)


def mask_ap_resamples(
    gt_dataset: dict[str, Any],
    mask_results: list[dict[str, Any]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    draws: np.ndarray,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """`mask_ap`'s figures on the whole set, and over resamples of the images: draws (R, n) int
    indices into `image_ids` (with repeats: an image drawn twice counts twice) -> ({name: value},
    {name: (R,) values}).

    One `COCOeval.evaluate()` matches every image once (the expensive part) and serves both: the
    whole set's figures are pycocotools' own `accumulate`; each resample runs that accumulation (area
    "all", 100 detections) over its images' per-image results, vectorised: the same tp / fp
    cumulative sums, precision envelope and recall-threshold lookup, so the identity draw
    (arange(n)) gives `mask_ap`'s figures exactly (tested)."""
    evaluator = _evaluated(gt_dataset, mask_results, image_ids, category_ids)
    params = evaluator.params
    images, areas = len(params.imgIds), len(params.areaRng)
    max_detections = params.maxDets[-1]
    recall_thresholds = params.recThrs
    per_category = []  # per category: per image (scores, matches (T, d), ignored (T, d), GT not ignored)
    for k in range(len(params.catIds)):
        rows = []
        for i in range(images):
            entry = evaluator.evalImgs[k * areas * images + i]  # area index 0 ("all")
            if entry is None:
                rows.append(None)
                continue
            rows.append((np.asarray(entry["dtScores"][:max_detections], dtype=np.float64),
                         np.asarray(entry["dtMatches"][:, :max_detections]),
                         np.asarray(entry["dtIgnore"][:, :max_detections]),
                         int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))))
        per_category.append(rows)
    thresholds = len(params.iouThrs)
    position = {int(image): index for index, image in enumerate(params.imgIds)}  # evaluate() sorted them
    given = [position[int(image)] for image in image_ids]
    out = {name: np.empty(len(draws)) for name in ("mask_ap", "mask_ap_standard", "mask_ap50")}
    for r, drawn in enumerate(np.asarray(draws)):
        draw = [given[j] for j in drawn]
        precision = -np.ones((thresholds, len(recall_thresholds), len(per_category)))
        for k, rows in enumerate(per_category):
            chosen = [rows[i] for i in draw if rows[i] is not None]
            positives = sum(row[3] for row in chosen)
            if not chosen or positives == 0:
                continue
            scores = np.concatenate([row[0] for row in chosen])
            order = np.argsort(-scores, kind="mergesort")
            matched = np.concatenate([row[1] for row in chosen], axis=1)[:, order]
            ignored = np.concatenate([row[2] for row in chosen], axis=1)[:, order]
            tp = np.cumsum(np.logical_and(matched, np.logical_not(ignored)), axis=1).astype(np.float64)
            fp = np.cumsum(np.logical_and(np.logical_not(matched), np.logical_not(ignored)), axis=1).astype(np.float64)
            detections = tp.shape[1]
            recall = tp / positives
            envelope = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
            for t in range(thresholds):
                at = np.searchsorted(recall[t], recall_thresholds, side="left")
                precision[t, :, k] = np.where(at < detections, envelope[t, np.minimum(at, max(detections - 1, 0))]
                                              if detections else 0.0, 0.0)
        for name, value in _summary(precision, params.iouThrs).items():
            out[name][r] = value
    call_quietly(evaluator.accumulate)
    return _summary(evaluator.eval["precision"][:, :, :, 0, -1], params.iouThrs), out
