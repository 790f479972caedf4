"""Box AP with pycocotools: COCOeval(bbox) of a results list over a subset of images and
categories, and the per-category table (AP, AP50, AP75, AR100, counts)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pycocotools.cocoeval import COCOeval

from detection.data.ground_truth import call_quietly, coco_from_dataset

BBOX_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class BboxEvaluation:
    """pycocotools bbox evaluation of one results list over one subset.

    stats: the twelve COCO numbers by name; precision: COCOeval's (T, R, K, A, M) array
    (IoU thresholds x 101 recall points x categories x areas x max-dets), -1 where undefined;
    category_ids: K ids in the order of the K axis (sorted); summary: pycocotools' printout.
    """

    stats: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    category_ids: list[int]
    summary: str
    empty: bool = False


def evaluate_bbox(
    gt_dataset: dict[str, Any], results: list[dict[str, Any]], image_ids: Sequence[int], category_ids: Sequence[int]
) -> BboxEvaluation:
    """COCOeval(bbox) with params.imgIds / params.catIds set (sorted, as pycocotools' defaults),
    so subset images without detections still count as misses.

    Empty results are evaluated against an empty detection set (COCO's own answer: 0 for every
    category with GT, -1 where no GT exists) because `loadRes([])` crashes.
    """
    gt = coco_from_dataset(gt_dataset)
    if results:
        dt, _ = call_quietly(lambda: gt.loadRes(copy.deepcopy(list(results))))
    else:
        dt = coco_from_dataset({"images": list(gt_dataset["images"]), "categories": list(gt_dataset["categories"]), "annotations": []})
    evaluator = COCOeval(gt, dt, iouType="bbox")
    evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.params.catIds = sorted(int(c) for c in category_ids)
    _, log = call_quietly(lambda: (evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()))
    summary = "\n".join(line for line in log.splitlines() if line.lstrip().startswith("Average"))
    return BboxEvaluation(
        stats={name: float(value) for name, value in zip(BBOX_STAT_NAMES, evaluator.stats)},
        precision=evaluator.eval["precision"],
        recall=evaluator.eval["recall"],
        iou_thresholds=np.asarray(evaluator.params.iouThrs),
        recall_thresholds=np.asarray(evaluator.params.recThrs),
        category_ids=[int(c) for c in evaluator.params.catIds],
        summary=summary,
        empty=not results,
    )


def mean_valid(values: np.ndarray) -> float:
    """Mean of the entries > -1 (COCO's "undefined" marker); -1 when there are none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def per_category_table(
    evaluation: BboxEvaluation, gt_dataset: dict[str, Any], results: list[dict[str, Any]], image_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """AP (0.5:0.95), AP50, AP75, AR100 per category (area all, 100 dets) + GT / detection counts.
    -1 where the category has no GT in the subset (COCO's convention)."""
    names = {c["id"]: c["name"] for c in gt_dataset["categories"]}
    images = set(int(i) for i in image_ids)
    num_gt: dict[int, int] = {}
    for ann in gt_dataset["annotations"]:
        if ann["image_id"] in images and not ann.get("iscrowd", 0):
            num_gt[ann["category_id"]] = num_gt.get(ann["category_id"], 0) + 1
    num_det: dict[int, int] = {}
    for entry in results:
        num_det[entry["category_id"]] = num_det.get(entry["category_id"], 0) + 1
    thresholds = evaluation.iou_thresholds
    table = []
    for k, category_id in enumerate(evaluation.category_ids):
        precision = evaluation.precision[:, :, k, 0, -1]
        table.append(
            {
                "category_id": category_id,
                "name": names[category_id],
                "AP": mean_valid(precision),
                "AP50": mean_valid(precision[np.isclose(thresholds, 0.5)]),
                "AP75": mean_valid(precision[np.isclose(thresholds, 0.75)]),
                "AR100": mean_valid(evaluation.recall[:, k, 0, -1]),
                "num_gt": num_gt.get(category_id, 0),
                "num_detections": num_det.get(category_id, 0),
            }
        )
    return table
