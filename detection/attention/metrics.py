"""Faithfulness of per-detection saliency maps: does the map point at the object it explains?

All maps are float (H, W) in ORIGINAL image pixels (pixel (y, x) covers [x, x+1) x [y, y+1));
boxes are xyxy in the same pixels. Metrics (D-RISE / Chefer et al. 2021 protocols):
  * pointing game: the map's maximum lies inside the matched GT mask (box when no mask);
  * energy-based pointing game: share of the (non-negative) map mass inside the GT region;
  * mask AP of explanations: min-max -> uint8 -> Otsu -> binary mask -> COCO segm AP
    (scored by `detection.attention.mask_ap`);
  * deletion / insertion curves: detection score as the most salient pixels are removed / added.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from detection.attention.mask_ap import mask_ap

GAUSSIAN_BASELINE = "gaussian-baseline"


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


# ------------------------------------------------------------------------------------------
# per-map metrics
# ------------------------------------------------------------------------------------------
def _check_map(saliency: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    saliency = np.asarray(saliency)
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be (H, W), got shape {saliency.shape}")
    if region is not None and region.shape != saliency.shape:
        raise ValueError(f"region shape {region.shape} differs from saliency shape {saliency.shape}")
    return np.nan_to_num(saliency.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def pointing_game(saliency: np.ndarray, region: np.ndarray, tolerance: int = 0) -> float:
    """1.0 when the map's maximum falls inside `region` (bool (H, W)), else 0.0.

    A flat map (max == min) points nowhere: 0.0. Plateaus of equal maxima count as a hit
    when at least half of the maximal pixels lie inside. `tolerance` grows the region by that
    many pixels (disk), as in Zhang et al.'s original 15-px pointing game.
    """
    values = _check_map(saliency, region)
    peak = values.max()
    if peak <= values.min():
        return 0.0
    if tolerance > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
        region = cv2.dilate(region.astype(np.uint8), kernel).astype(bool)
    at_peak = values == peak
    inside = np.count_nonzero(at_peak & region)
    return 1.0 if 2 * inside >= np.count_nonzero(at_peak) else 0.0


def energy_pointing_game(saliency: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's mass inside `region`: sum(map * region) / sum(map), map clipped at 0.

    A map with no positive mass scores 0.0. A uniform map scores area(region) / area(image).
    """
    values = np.clip(_check_map(saliency, region), 0.0, None)
    total = values.sum()
    if total <= 0:
        return 0.0
    return float(values[region].sum() / total)


def explanation_mask(saliency: np.ndarray) -> np.ndarray:
    """Binary explanation mask (Chefer et al.): min-max to 0..255 uint8, Otsu threshold.

    Returns bool (H, W); pixels strictly above the Otsu threshold are True. A flat map gives
    an empty mask.
    """
    values = _check_map(saliency)
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, dtype=bool)
    scaled = np.round((values - low) / (high - low) * 255.0).astype(np.uint8)
    _, binary = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return binary > 0


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a bool (H, W) mask, JSON-serialisable (counts as str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def gaussian_box_map(box_xyxy: Sequence[float], image_size: tuple[int, int], sigma_fraction: float = 0.25) -> np.ndarray:
    """Baseline saliency: Gaussian centred on the box, sigma = sigma_fraction * box size, 0 outside.

    float32 (H, W). Any attention map worth showing should beat this on the metrics above,
    because it knows nothing but the predicted box.
    """
    height, width = image_size
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sigma_x = max(sigma_fraction * (x1 - x0), 0.5)
    sigma_y = max(sigma_fraction * (y1 - y0), 0.5)
    gx = np.exp(-0.5 * ((np.arange(width) + 0.5 - cx) / sigma_x) ** 2)
    gy = np.exp(-0.5 * ((np.arange(height) + 0.5 - cy) / sigma_y) ** 2)
    gauss = (gy[:, None] * gx[None, :]).astype(np.float32)
    gauss[~box_mask(box_xyxy, image_size)] = 0.0
    return gauss


# ------------------------------------------------------------------------------------------
# deletion / insertion
# ------------------------------------------------------------------------------------------
@dataclass
class Curve:
    """Score of one detection against the fraction of pixels removed (deletion) or added."""

    fractions: np.ndarray  # (S + 1,) in [0, 1]
    scores: np.ndarray  # (S + 1,)
    auc: float


def _substrate(image_rgb: np.ndarray, kind: str, blur_sigma: float) -> np.ndarray:
    if kind == "mean":
        mean = image_rgb.reshape(-1, 3).mean(axis=0)
        return np.broadcast_to(np.round(mean).astype(np.uint8), image_rgb.shape).copy()
    if kind == "blur":
        return cv2.GaussianBlur(image_rgb, (0, 0), sigmaX=blur_sigma, sigmaY=blur_sigma)
    raise ValueError(f"unknown substrate {kind!r}; use 'mean' or 'blur'")


def perturbation_curve(
    image_rgb: np.ndarray,
    saliency: np.ndarray,
    score_fn: Callable[[np.ndarray], np.ndarray],
    mode: str = "deletion",
    steps: int = 16,
    substrate: str = "mean",
    blur_sigma: float = 5.0,
    batch_size: int = 8,
) -> Curve:
    """Deletion or insertion curve of one detection.

    image_rgb: uint8 (H, W, 3); saliency: (H, W) in the same pixels.
    score_fn: uint8 (K, H, W, 3) -> (K,) detection score for each perturbed image; called in
        chunks of `batch_size` images (that is the batching: one forward pass per chunk).
    Pixels are ranked by saliency (ties by raster order). At step k of `steps`, the top
    round(k / steps * H * W) pixels are replaced by the substrate (deletion: mean colour or a
    blurred copy) or copied from the image onto the substrate (insertion).
    AUC is the trapezoidal area under score vs fraction, fraction in [0, 1].
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) image, got {image_rgb.dtype} {image_rgb.shape}")
    values = _check_map(saliency)
    if values.shape != image_rgb.shape[:2]:
        raise ValueError(f"saliency {values.shape} does not match image {image_rgb.shape[:2]}")
    height, width = values.shape
    order = np.argsort(-values.reshape(-1), kind="stable")
    fill = _substrate(image_rgb, substrate, blur_sigma)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * height * width).astype(np.int64)

    def perturbed(count: int) -> np.ndarray:
        chosen = np.zeros(height * width, dtype=bool)
        chosen[order[:count]] = True
        chosen = chosen.reshape(height, width)
        if mode == "deletion":
            return np.where(chosen[..., None], fill, image_rgb)
        return np.where(chosen[..., None], image_rgb, fill)

    scores: list[float] = []
    for start in range(0, len(counts), batch_size):
        batch = np.stack([perturbed(int(c)) for c in counts[start : start + batch_size]])
        out = np.asarray(score_fn(batch), dtype=np.float64).reshape(-1)
        if len(out) != len(batch):
            raise ValueError(f"score_fn returned {len(out)} scores for {len(batch)} images")
        scores.extend(out.tolist())
    scores_arr = np.asarray(scores)
    return Curve(fractions=fractions, scores=scores_arr, auc=float(np.trapezoid(scores_arr, fractions)))


# ------------------------------------------------------------------------------------------
# accumulation over a dataset
# ------------------------------------------------------------------------------------------
@dataclass
class FaithfulnessAccumulator:
    """Collects per-detection faithfulness values per map choice, image by image.

    Choices are names such as "last/mean" (layers/heads); the Gaussian baseline is added
    automatically. `state()` / `merge()` make the accumulator shardable across processes.
    """

    choices: Sequence[str]
    iou_threshold: float = 0.5
    gaussian_sigma_fraction: float = 0.25
    include_baseline: bool = True
    pointing: dict[str, list[float]] = field(default_factory=dict)
    energy: dict[str, list[float]] = field(default_factory=dict)
    masks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    num_detections: int = 0
    num_matched: int = 0

    def all_choices(self) -> list[str]:
        return list(self.choices) + ([GAUSSIAN_BASELINE] if self.include_baseline else [])

    def __post_init__(self) -> None:
        for choice in self.all_choices():
            self.pointing.setdefault(choice, [])
            self.energy.setdefault(choice, [])
            self.masks.setdefault(choice, [])
            self.curves.setdefault(choice, {"deletion": [], "insertion": []})

    def add_image(
        self,
        image_id: int,
        image_size: tuple[int, int],
        det_boxes: np.ndarray,
        det_scores: np.ndarray,
        det_categories: np.ndarray,
        maps: dict[str, np.ndarray],
        gt_annotations: Iterable[dict[str, Any]],
    ) -> np.ndarray:
        """Score the maps of one image's detections.

        det_boxes (N, 4) xyxy original pixels; det_scores (N,); det_categories (N,) dataset
        category ids; maps: choice -> float (N, H, W) with (H, W) == image_size;
        gt_annotations: COCO annotations of this image (already restricted to evaluated
        categories). Returns the (N,) matched GT index (-1 unmatched) into that list.
        """
        det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
        det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
        det_categories = np.asarray(det_categories).reshape(-1)
        gts = list(gt_annotations)
        maps = dict(maps)
        if self.include_baseline:
            maps[GAUSSIAN_BASELINE] = (
                np.stack([gaussian_box_map(b, image_size, self.gaussian_sigma_fraction) for b in det_boxes])
                if len(det_boxes)
                else np.zeros((0, *image_size), np.float32)
            )
        for choice in self.all_choices():
            if choice not in maps:
                raise KeyError(f"no maps for choice {choice!r}")
            if maps[choice].shape != (len(det_boxes), *image_size):
                raise ValueError(
                    f"maps[{choice!r}] has shape {maps[choice].shape}, expected {(len(det_boxes), *image_size)}"
                )
        gt_boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in gts]).reshape(-1, 4)
        matched = match_detections(
            det_boxes,
            det_scores,
            det_categories,
            gt_boxes,
            np.array([a["category_id"] for a in gts]),
            np.array([bool(a.get("iscrowd", 0)) for a in gts]),
            self.iou_threshold,
        )
        regions: dict[int, np.ndarray] = {}
        self.num_detections += len(det_boxes)
        self.num_matched += int((matched >= 0).sum())
        for det in range(len(det_boxes)):
            gt_index = int(matched[det])
            if gt_index >= 0 and gt_index not in regions:
                regions[gt_index] = annotation_region(gts[gt_index], image_size)
            for choice in self.all_choices():
                saliency = maps[choice][det]
                if gt_index >= 0:
                    self.pointing[choice].append(pointing_game(saliency, regions[gt_index]))
                    self.energy[choice].append(energy_pointing_game(saliency, regions[gt_index]))
                self.masks[choice].append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(det_categories[det]),
                        "segmentation": encode_mask(explanation_mask(saliency)),
                        "score": float(det_scores[det]),
                    }
                )
        return matched

    def add_curve(self, choice: str, mode: str, auc: float) -> None:
        self.curves[choice][mode].append(float(auc))

    def state(self) -> dict[str, Any]:
        return {
            "pointing": self.pointing,
            "energy": self.energy,
            "masks": self.masks,
            "curves": self.curves,
            "num_detections": self.num_detections,
            "num_matched": self.num_matched,
        }

    def merge(self, state: dict[str, Any]) -> None:
        for choice in self.all_choices():
            self.pointing[choice].extend(state["pointing"][choice])
            self.energy[choice].extend(state["energy"][choice])
            self.masks[choice].extend(state["masks"][choice])
            for mode in ("deletion", "insertion"):
                self.curves[choice][mode].extend(state["curves"][choice][mode])
        self.num_detections += state["num_detections"]
        self.num_matched += state["num_matched"]

    def summarize(
        self, gt_dataset: dict[str, Any], image_ids: Sequence[int], category_ids: Sequence[int]
    ) -> dict[str, dict[str, Any]]:
        """choice -> {pointing_game, energy_pointing_game, mask_ap, mask_ap_standard, mask_ap50,
        deletion_auc, insertion_auc (None unless computed), num_detections, num_matched}.
        Means over matched detections; None when there are none."""
        summary: dict[str, dict[str, Any]] = {}
        for choice in self.all_choices():
            row: dict[str, Any] = {
                "pointing_game": float(np.mean(self.pointing[choice])) if self.pointing[choice] else None,
                "energy_pointing_game": float(np.mean(self.energy[choice])) if self.energy[choice] else None,
            }
            row.update(mask_ap(gt_dataset, self.masks[choice], image_ids, category_ids))
            for mode in ("deletion", "insertion"):
                values = self.curves[choice][mode]
                row[f"{mode}_auc"] = float(np.mean(values)) if values else None
            row["num_detections"] = self.num_detections
            row["num_matched"] = self.num_matched
            summary[choice] = row
        return summary
