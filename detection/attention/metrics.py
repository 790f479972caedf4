"""Faithfulness of per-detection saliency maps (float (H, W) in original image pixels): pointing
game, energy, explanation masks for mask AP (Chefer et al. 2021), and their sums over a dataset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from detection.attention.mask_ap import mask_ap
from detection.attention.matching import annotation_region, box_mask, match_detections

GAUSSIAN_BASELINE = "gaussian-baseline"


# ------------------------------------------------------------------------------------------
# per-map metrics
# ------------------------------------------------------------------------------------------
def check_map(saliency: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Float64 copy of a (H, W) map with NaN / inf as 0; raises ValueError on a bad shape."""
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
    values = check_map(saliency, region)
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
    values = np.clip(check_map(saliency, region), 0.0, None)
    total = values.sum()
    if total <= 0:
        return 0.0
    return float(values[region].sum() / total)


def explanation_mask(saliency: np.ndarray) -> np.ndarray:
    """Binary explanation mask (Chefer et al.): min-max to 0..255 uint8, Otsu threshold.

    Returns bool (H, W); pixels strictly above the Otsu threshold are True. A flat map gives
    an empty mask.
    """
    values = check_map(saliency)
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
