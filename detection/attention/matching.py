"""Which ground-truth object a detection explains (greedy IoU matching) and that object's region
as a bool (H, W) mask in original image pixels (pixel (y, x) covers [x, x+1) x [y, y+1))."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils


# ------------------------------------------------------------------------------------------
# regions
# ------------------------------------------------------------------------------------------
def box_mask(box_xyxy: Sequence[float], image_size: tuple[int, int]) -> np.ndarray:
    """Bool (H, W): pixels whose centre lies inside the xyxy box.

    A box too thin to contain any pixel centre still gets the pixel containing its centre,
    so every object has a non-empty region.
    """
    height, width = image_size
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    cols = np.arange(width) + 0.5
    rows = np.arange(height) + 0.5
    inside_x = (cols >= x0) & (cols <= x1)
    inside_y = (rows >= y0) & (rows <= y1)
    region = inside_y[:, None] & inside_x[None, :]
    if not region.any():
        cx = int(np.clip(np.floor((x0 + x1) / 2), 0, width - 1))
        cy = int(np.clip(np.floor((y0 + y1) / 2), 0, height - 1))
        region[cy, cx] = True
    return region


def annotation_region(annotation: dict[str, Any], image_size: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) region of a COCO annotation: its segmentation mask if any, else its box."""
    height, width = image_size
    segmentation = annotation.get("segmentation")
    if segmentation:
        if isinstance(segmentation, list):  # polygons
            rles = mask_utils.frPyObjects(segmentation, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        region = mask_utils.decode(rle).astype(bool)
        if region.any():
            return region
    x, y, w, h = annotation["bbox"]
    return box_mask((x, y, x + w, y + h), image_size)


# ------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------
def box_iou_np(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU (A, B) of xyxy boxes (continuous pixel coordinates, no +1)."""
    boxes_a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    boxes_b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(boxes_a[:, 2] - boxes_a[:, 0], 0, None) * np.clip(boxes_a[:, 3] - boxes_a[:, 1], 0, None)
    area_b = np.clip(boxes_b[:, 2] - boxes_b[:, 0], 0, None) * np.clip(boxes_b[:, 3] - boxes_b[:, 1], 0, None)
    lt = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    rb = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_detections(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_categories: np.ndarray,
    gt_boxes: np.ndarray,
    gt_categories: np.ndarray,
    gt_ignore: np.ndarray | None = None,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """Greedy one-to-one matching, highest score first: (N,) GT index per detection, -1 if none.

    A detection takes the unmatched, non-ignored GT of the same category with the highest
    IoU, provided IoU >= iou_threshold. Ties in score keep the input order (stable sort).
    """
    num_det = len(det_scores)
    matched = np.full(num_det, -1, dtype=np.int64)
    if num_det == 0 or len(gt_categories) == 0:
        return matched
    ious = box_iou_np(det_boxes, gt_boxes)
    gt_categories = np.asarray(gt_categories)
    available = np.ones(len(gt_categories), dtype=bool)
    if gt_ignore is not None:
        available &= ~np.asarray(gt_ignore, dtype=bool)
    for det in np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable"):
        candidates = available & (gt_categories == det_categories[det]) & (ious[det] >= iou_threshold)
        if not candidates.any():
            continue
        best = int(np.argmax(np.where(candidates, ious[det], -1.0)))
        matched[det] = best
        available[best] = False
    return matched
