"""COCO bbox results files: validate and load them, re-key predict output by file name, and
keep the part of a results list that an evaluation subset scores."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from detection.evaluation.subsets import Subset
from detection.io import read_json


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated; the message names the file and the problem."""


def validate_results(results: Any, source: str | Path) -> list[dict[str, Any]]:
    """Check a COCO bbox results list: each entry has int image_id / category_id, 4-number bbox
    with w, h >= 0 and a finite score. Raises EvaluationError naming `source` and the entry."""
    if not isinstance(results, list):
        raise EvaluationError(f"{source}: COCO results must be a JSON list of objects")
    for index, entry in enumerate(results):
        if not isinstance(entry, dict):
            raise EvaluationError(f"{source}: entry {index} is not an object")
        for key in ("image_id", "category_id"):
            if not isinstance(entry.get(key), int) or isinstance(entry.get(key), bool):
                raise EvaluationError(f"{source}: entry {index} needs an integer {key!r}, got {entry.get(key)!r}")
        bbox = entry.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox)
            or bbox[2] < 0
            or bbox[3] < 0
        ):
            raise EvaluationError(f"{source}: entry {index} has an invalid bbox {bbox!r} (need [x, y, w, h], w, h >= 0)")
        score = entry.get("score")
        if not isinstance(score, (int, float)) or not np.isfinite(score):
            raise EvaluationError(f"{source}: entry {index} has an invalid score {score!r}")
    return results


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a COCO bbox results JSON file (see `validate_results`)."""
    path = Path(path)
    return validate_results(read_json(path, "results file", EvaluationError), path)


def image_ids_from_file_names(
    results: list[dict[str, Any]], gt_dataset: dict[str, Any], source: str | Path
) -> list[dict[str, Any]]:
    """Re-key results by their `file_name` (as `detr-attn predict` writes it) to GT image ids.

    predict numbers images by input position, not by the dataset's ids, so its results need
    this. A result's file_name matches the GT image whose file_name equals it or is its
    trailing path components ("/data/val/000001.png" matches "000001.png" and "val/000001.png").
    Unmatched or ambiguous names are errors naming `source`.
    """
    by_parts: dict[tuple[str, ...], list[int]] = {}
    for image in gt_dataset["images"]:
        parts = tuple(Path(str(image.get("file_name", ""))).parts)
        by_parts.setdefault(parts, []).append(image["id"])
    resolved: dict[str, int] = {}
    out = []
    for index, entry in enumerate(results):
        name = entry.get("file_name")
        if not isinstance(name, str):
            raise EvaluationError(f"{source}: entry {index} has no 'file_name' (needed by --match-file-names)")
        if name not in resolved:
            parts = Path(name).parts
            candidates: set[int] = set()
            for k in range(len(parts)):  # longest matching suffix wins
                ids = by_parts.get(tuple(parts[k:]), [])
                if ids:
                    candidates = set(ids)
                    break
            if len(candidates) != 1:
                problem = "matches no image" if not candidates else f"matches several images {sorted(candidates)[:5]}"
                raise EvaluationError(f"{source}: file_name {name!r} {problem} of the ground truth")
            resolved[name] = candidates.pop()
        out.append(dict(entry, image_id=resolved[name]))
    return out


def restrict_results(
    results: list[dict[str, Any]],
    gt_dataset: dict[str, Any],
    subset: Subset,
    source: str | Path,
    ann_path: str | Path,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Keep the results that the subset evaluates; refuse image ids unknown to the GT.

    pycocotools asserts that every result image is in the GT ("Results do not correspond to
    current coco set"); we name the ids instead. Results on GT images outside the subset and
    on categories outside the evaluated ones are dropped (COCOeval would ignore them too, so
    the numbers do not change), and category ids the GT does not know are reported, because
    pycocotools ignores those silently and a wrong id mapping would look like a bad model.
    Returns (kept results, counts, warnings).
    """
    gt_images = {img["id"] for img in gt_dataset["images"]}
    unknown_images = sorted({r["image_id"] for r in results} - gt_images)
    if unknown_images:
        hint = ""
        if results and "file_name" in results[0]:
            hint = " (results from `detr-attn predict` number images by input order: add --match-file-names)"
        raise EvaluationError(
            f"{source}: {len(unknown_images)} image ids are not in {ann_path} "
            f"(e.g. {unknown_images[:10]}); results must refer to images of the ground truth{hint}"
        )
    gt_categories = {c["id"] for c in gt_dataset["categories"]}
    images, categories = set(subset.image_ids), set(subset.category_ids)
    unknown_categories: dict[int, int] = {}
    kept, outside_subset = [], 0
    for entry in results:
        if entry["category_id"] not in gt_categories:
            unknown_categories[entry["category_id"]] = unknown_categories.get(entry["category_id"], 0) + 1
        elif entry["image_id"] in images and entry["category_id"] in categories:
            kept.append(entry)
        else:
            outside_subset += 1
    warnings = []
    if unknown_categories:
        warnings.append(
            f"{source}: {sum(unknown_categories.values())} detections have category ids the ground truth "
            f"does not define ({sorted(unknown_categories)[:10]}); they cannot match anything and were dropped "
            "(pycocotools would silently ignore them). Check the class -> category id mapping."
        )
    counts = {
        "results_in_file": len(results),
        "results_scored": len(kept),
        "results_outside_subset": outside_subset,
        "results_unknown_category": {str(k): v for k, v in sorted(unknown_categories.items())},
    }
    return kept, counts, warnings



def results_for_subset(
    path: str | Path,
    gt_dataset: dict[str, Any],
    subset: Subset,
    ann_path: str | Path,
    match_file_names: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Load a results file for scoring on `subset`: validate, re-key by file name if asked
    (`image_ids_from_file_names`), restrict (`restrict_results`).

    Returns (kept results, the metrics' `source` entry with the counts, warnings).
    """
    raw = load_results(path)
    if match_file_names:
        raw = image_ids_from_file_names(raw, gt_dataset, path)
    results, counts, warnings = restrict_results(raw, gt_dataset, subset, path, ann_path)
    return results, {"detections": str(path), **counts}, warnings
