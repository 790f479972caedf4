"""Faithfulness of per-detection saliency maps (float (H, W) in original image pixels): pointing
game, energy, explanation masks for mask AP (Chefer et al. 2021), and their sums over a dataset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from detection.attention.floors import (CEILING, GAUSSIAN_BASELINE, CellGrid, FloorSettings, floor_maps,
                                        gaussian_box_map)
from detection.attention.mask_ap import mask_ap, mask_ap_resamples
from detection.attention.matching import annotation_region, match_detections

__all__ = ["GAUSSIAN_BASELINE", "FaithfulnessAccumulator", "check_map", "encode_mask", "energy_pointing_game",
           "explanation_mask", "gaussian_box_map", "pointing_game"]


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


# ------------------------------------------------------------------------------------------
# accumulation over a dataset
# ------------------------------------------------------------------------------------------
@dataclass
class FaithfulnessAccumulator:
    """Collects per-detection faithfulness values per map choice, image by image.

    Choices are names such as "last/mean" (layers/heads); the floors of `floor_settings`
    (`attention.floors`; default the Gaussian baseline, with `gaussian_sigma_fraction`) are added to
    every image and scored like the choices. `state()` / `merge()` make the accumulator shardable.
    """

    choices: Sequence[str]
    iou_threshold: float = 0.5
    gaussian_sigma_fraction: float = 0.25
    include_baseline: bool = True
    floor_settings: FloorSettings | None = None
    class_agnostic: bool = False  # match by IoU alone; a matched detection is scored under its GT's category
    pointing: dict[str, list[float]] = field(default_factory=dict)
    energy: dict[str, list[float]] = field(default_factory=dict)
    masks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    matched_keys: list[list[int]] = field(default_factory=list)  # [image id, category] per pointing entry
    curve_keys: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)  # the same per curve
    num_detections: int = 0
    num_matched: int = 0

    def __post_init__(self) -> None:
        if self.floor_settings is None:
            self.floor_settings = FloorSettings(gaussian_sigma=self.gaussian_sigma_fraction)
        self.floors = list(self.floor_settings.floors) if self.include_baseline else []
        self._fresh = True  # nothing added or merged yet: the first merged state sets the floors
        for choice in self.all_choices():
            self._add_choice(choice)

    def _add_choice(self, choice: str) -> None:
        self.pointing.setdefault(choice, [])
        self.energy.setdefault(choice, [])
        self.masks.setdefault(choice, [])
        self.curves.setdefault(choice, {"deletion": [], "insertion": []})
        self.curve_keys.setdefault(choice, {"deletion": [], "insertion": []})

    def all_choices(self) -> list[str]:
        return list(self.choices) + [f for f in self.floors if f not in self.choices]

    def add_image(
        self,
        image_id: int,
        image_size: tuple[int, int],
        det_boxes: np.ndarray,
        det_scores: np.ndarray,
        det_categories: np.ndarray,
        maps: dict[str, np.ndarray],
        gt_annotations: Iterable[dict[str, Any]],
        grid: CellGrid | None = None,
    ) -> np.ndarray:
        """Score the maps of one image's detections; returns the (N,) matched GT index (-1 unmatched).
        See `score_image`."""
        return self.score_image(image_id, image_size, det_boxes, det_scores, det_categories, maps, gt_annotations,
                                grid)[0]

    def score_image(
        self,
        image_id: int,
        image_size: tuple[int, int],
        det_boxes: np.ndarray,
        det_scores: np.ndarray,
        det_categories: np.ndarray,
        maps: dict[str, np.ndarray],
        gt_annotations: Iterable[dict[str, Any]],
        grid: CellGrid | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Score the maps of one image's detections and the floors made for them.

        det_boxes (N, 4) xyxy original pixels; det_scores (N,); det_categories (N,) dataset
        category ids; maps: choice -> float (N, H, W) with (H, W) == image_size;
        gt_annotations: COCO annotations of this image (already restricted to evaluated
        categories); grid: the model's cell grid of the image (needed by the GT-mask ceiling).
        With `class_agnostic`, detections match GT objects of any category and are scored (mask AP,
        per-category rows) under the matched object's category.
        Returns ((N,) matched GT index (-1 unmatched) into that list, floor -> (N, H, W) maps).
        """
        self._fresh = False
        det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
        det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
        det_categories = np.asarray(det_categories).reshape(-1)
        gts = list(gt_annotations)
        gt_boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in gts]).reshape(-1, 4)
        gt_categories = np.array([a["category_id"] for a in gts])
        matched = match_detections(
            det_boxes,
            det_scores,
            np.zeros(len(det_categories), np.int64) if self.class_agnostic else det_categories,
            gt_boxes,
            np.zeros(len(gt_categories), np.int64) if self.class_agnostic else gt_categories,
            np.array([bool(a.get("iscrowd", 0)) for a in gts]),
            self.iou_threshold,
        )
        det_categories = self.scored_categories(matched, det_categories, gts)
        regions: dict[int, np.ndarray] = {}
        for gt_index in matched[matched >= 0]:
            regions[int(gt_index)] = annotation_region(gts[int(gt_index)], image_size)
        floors = floor_maps(self.floor_settings, image_id, det_boxes, image_size,
                            [regions.get(int(g)) for g in matched], grid) if self.floors else {}
        maps = {**maps, **floors}
        for choice in self.all_choices():
            if choice not in maps:
                raise KeyError(f"no maps for choice {choice!r}" + (" (the ceiling needs the model's cell grid)"
                                                                     if choice in self.floors else ""))
            if maps[choice].shape != (len(det_boxes), *image_size):
                raise ValueError(
                    f"maps[{choice!r}] has shape {maps[choice].shape}, expected {(len(det_boxes), *image_size)}"
                )
        self.num_detections += len(det_boxes)
        self.num_matched += int((matched >= 0).sum())
        for det in range(len(det_boxes)):
            gt_index = int(matched[det])
            if gt_index >= 0:
                self.matched_keys.append([int(image_id), int(det_categories[det])])
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
        return matched, floors

    def scored_categories(self, matched: np.ndarray, det_categories: np.ndarray,
                          gts: Sequence[dict[str, Any]]) -> np.ndarray:
        """(N,) the category each detection is scored under: its own, or with `class_agnostic` the
        matched GT object's (an unmatched detection keeps its own)."""
        categories = np.asarray(det_categories).reshape(-1).copy()
        if self.class_agnostic:
            for det, gt_index in enumerate(matched):
                if gt_index >= 0:
                    categories[det] = gts[int(gt_index)]["category_id"]
        return categories

    def add_curve(self, choice: str, mode: str, auc: float, image_id: int = -1, category_id: int = -1) -> None:
        self.curves[choice][mode].append(float(auc))
        self.curve_keys[choice][mode].append([int(image_id), int(category_id)])

    def state(self) -> dict[str, Any]:
        return {
            "pointing": self.pointing,
            "energy": self.energy,
            "masks": self.masks,
            "curves": self.curves,
            "matched_keys": self.matched_keys,
            "curve_keys": self.curve_keys,
            "floors": list(self.floors),
            "num_detections": self.num_detections,
            "num_matched": self.num_matched,
        }

    def merge(self, state: dict[str, Any]) -> None:
        """Add another accumulator's `state()`; the first state merged into a fresh accumulator sets
        its floors (so a bare `FaithfulnessAccumulator(choices)` can summarise any run's state)."""
        if self._fresh and "floors" in state:
            for floor in self.floors:
                if floor not in state["floors"] and floor not in self.choices:
                    for store in (self.pointing, self.energy, self.masks, self.curves, self.curve_keys):
                        store.pop(floor, None)
            self.floors = []
        self._fresh = False
        for floor in state.get("floors", []):
            if floor not in self.floors:
                self.floors.append(floor)
        for choice in state["pointing"]:
            self._add_choice(choice)
        for choice in state["pointing"]:
            self.pointing[choice].extend(state["pointing"][choice])
            self.energy[choice].extend(state["energy"][choice])
            self.masks[choice].extend(state["masks"][choice])
            for mode in ("deletion", "insertion"):
                self.curves[choice][mode].extend(state["curves"][choice][mode])
                self.curve_keys[choice][mode].extend(state.get("curve_keys", {}).get(choice, {}).get(mode, []))
        self.matched_keys.extend(state.get("matched_keys", []))
        self.num_detections += state["num_detections"]
        self.num_matched += state["num_matched"]

    def summarize(
        self, gt_dataset: dict[str, Any], image_ids: Sequence[int], category_ids: Sequence[int],
        per_category: bool = False, bootstrap: int = 0, seed: int = 0,
    ) -> dict[str, dict[str, Any]]:
        """choice -> {pointing_game, energy_pointing_game, mask_ap, mask_ap_standard, mask_ap50,
        deletion_auc, insertion_auc (None unless computed), num_detections, num_matched}.
        Means over matched detections; None when there are none. per_category: also "per_category"
        {category id: the same metrics over that category's detections}; bootstrap > 0: also "ci95"
        {metric: [low, high]}, the 2.5 / 97.5 percentiles of the mean over `bootstrap` resamples of the
        images (seeded; mask AP's from one COCO matching, accumulated per resample: `mask_ap_resamples`),
        and for every map that is not a floor "ci95_difference" {floor: {metric: [low, high]}}: the
        interval of (map − floor) over the same resamples (paired; the ceiling is not a floor). A map
        beats a floor beyond chance where that interval excludes 0."""
        summary: dict[str, dict[str, Any]] = {}
        resampled: dict[str, dict[str, np.ndarray]] = {}
        for choice in self.all_choices():
            mask_figures = None  # the bootstrap's COCO matching gives the whole set's mask AP too
            if bootstrap > 0:
                mask_figures, resampled[choice] = self._resampled(choice, gt_dataset, image_ids, category_ids,
                                                                  bootstrap, seed)
            row = self._row(choice, gt_dataset, image_ids, category_ids, mask_figures=mask_figures)
            if per_category:
                row["per_category"] = {
                    int(c): self._row(choice, gt_dataset, image_ids, [c], category=int(c)) for c in category_ids}
            if bootstrap > 0:
                row["ci95"] = {name: interval for name, values in resampled[choice].items()
                               if (interval := _interval(values)) is not None}
            summary[choice] = row
        floors = [floor for floor in self.floors if floor != CEILING and floor in resampled]
        for choice in resampled:
            if choice in self.floors:
                continue
            # the same image draws for every map: each resample's difference is paired
            summary[choice]["ci95_difference"] = {
                floor: {name: interval for name, values in resampled[choice].items()
                        if name in resampled[floor]
                        and (interval := _interval(values - resampled[floor][name])) is not None}
                for floor in floors}
        return summary

    def _values(self, choice: str, category: int | None) -> dict[str, tuple[list[float], list[list[int]]]]:
        """metric -> (per-detection values, their [image id, category] keys) of one choice."""
        out = {"pointing_game": (self.pointing[choice], self.matched_keys),
               "energy_pointing_game": (self.energy[choice], self.matched_keys)}
        for mode in ("deletion", "insertion"):
            out[f"{mode}_auc"] = (self.curves[choice][mode], self.curve_keys[choice][mode])
        if category is None:
            return out
        return {name: ([v for v, k in zip(values, keys) if k[1] == category], [k for k in keys if k[1] == category])
                for name, (values, keys) in out.items()}

    def _row(self, choice: str, gt_dataset: dict[str, Any], image_ids: Sequence[int], category_ids: Sequence[int],
             category: int | None = None, mask_figures: dict[str, float] | None = None) -> dict[str, Any]:
        values = self._values(choice, category)
        row: dict[str, Any] = {name: float(np.mean(v)) if v else None for name, (v, _) in values.items()
                               if name in ("pointing_game", "energy_pointing_game")}
        masks = self.masks[choice] if category is None else [m for m in self.masks[choice] if m["category_id"] == category]
        row.update(mask_figures if mask_figures is not None else mask_ap(gt_dataset, masks, image_ids, category_ids))
        for mode in ("deletion", "insertion"):
            curve_values = values[f"{mode}_auc"][0]
            row[f"{mode}_auc"] = float(np.mean(curve_values)) if curve_values else None
        if category is None:
            row["num_detections"] = self.num_detections
            row["num_matched"] = self.num_matched
        else:
            row["num_detections"] = len(masks)
            row["num_matched"] = len(values["pointing_game"][0])
        return row

    def _resampled(self, choice: str, gt_dataset: dict[str, Any], image_ids: Sequence[int],
                   category_ids: Sequence[int], resamples: int,
                   seed: int) -> tuple[dict[str, float] | None, dict[str, np.ndarray]]:
        """(the whole set's mask AP figures, None without images; metric -> (resamples,) values of one
        choice over seeded resamples of the images (the same draws for every choice), NaN where a
        resample has nothing to average)."""
        images = np.asarray(list(image_ids))
        if not len(images):
            return None, {}
        draws = np.random.default_rng(seed).integers(0, len(images), size=(resamples, len(images)))
        out: dict[str, np.ndarray] = {}
        mask_figures, mask_resamples = mask_ap_resamples(gt_dataset, self.masks[choice], list(images), category_ids,
                                                         draws)
        for name, values in mask_resamples.items():
            if name != "mask_ap50":
                out[name] = np.where(values > -1, values, np.nan)
        position = {int(i): k for k, i in enumerate(images)}
        for name, (values, keys) in self._values(choice, None).items():
            if not values or len(keys) != len(values):
                continue
            per_image_sum = np.zeros(len(images))
            per_image_count = np.zeros(len(images))
            for value, (image_id, _) in zip(values, keys):
                if image_id in position:
                    per_image_sum[position[image_id]] += value
                    per_image_count[position[image_id]] += 1
            sums, counts = per_image_sum[draws].sum(axis=1), per_image_count[draws].sum(axis=1)
            out[name] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        return mask_figures, out


def _interval(values: np.ndarray) -> list[float] | None:
    """[2.5, 97.5] percentiles of the defined (non-NaN) values; None when there are none."""
    valid = values[~np.isnan(values)]
    return [float(np.percentile(valid, 2.5)), float(np.percentile(valid, 97.5))] if len(valid) else None
