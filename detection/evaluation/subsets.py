"""The evaluated part of a COCO ground truth: image and category subsets picked by an ids
file, category names, object counts, first N or random N."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from detection.data.ground_truth import GroundTruthError


@dataclass
class SubsetSpec:
    """Which part of the dataset to evaluate. Filters apply in this order:
    image-ids file -> category names -> at least `min_objects` objects -> first N or random N.

    first / random count images in annotation-file order; `random` draws without replacement
    with numpy's `default_rng(seed)` and keeps the drawn images in file order.
    `min_objects` counts non-crowd annotations of the selected categories.
    """

    first: int | None = None
    random: int | None = None
    seed: int = 0
    image_ids_file: str | Path | None = None
    category_names: Sequence[str] | None = None
    min_objects: int = 0


@dataclass
class Subset:
    """The evaluated part: image ids (file order) and category ids (file order)."""

    image_ids: list[int]
    category_ids: list[int]
    description: dict[str, Any] = field(default_factory=dict)


def read_image_ids_file(path: str | Path) -> list[int]:
    """Image ids from a JSON list or a text file (ids separated by whitespace or commas)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GroundTruthError(f"{path}: image-ids file not found") from None
    stripped = text.strip()
    try:
        if stripped.startswith("["):
            values = json.loads(stripped)
        else:
            values = [token for token in stripped.replace(",", " ").split() if not token.startswith("#")]
        ids = [int(v) for v in values]
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        raise GroundTruthError(f"{path}: cannot read image ids ({error})") from None
    return ids


def select_subset(dataset: dict[str, Any], spec: SubsetSpec, ann_path: str | Path = "<ground truth>") -> Subset:
    """Apply `spec` to a validated COCO dict; errors name `ann_path` or the ids file."""
    if spec.first is not None and spec.random is not None:
        raise ValueError("choose either first N or random N images, not both")
    images = [img["id"] for img in dataset["images"]]
    categories = dataset["categories"]
    description: dict[str, Any] = {"images_in_file": len(images)}

    if spec.image_ids_file is not None:
        wanted = read_image_ids_file(spec.image_ids_file)
        unknown = sorted(set(wanted) - set(images))
        if unknown:
            raise GroundTruthError(
                f"{spec.image_ids_file}: {len(unknown)} image ids are not in {ann_path}: {unknown[:10]}"
            )
        wanted_set = set(wanted)
        images = [i for i in images if i in wanted_set]
        description["image_ids_file"] = str(spec.image_ids_file)

    category_ids = [c["id"] for c in categories]
    if spec.category_names:
        by_name = {c["name"].strip().lower(): c["id"] for c in categories}
        missing = [n for n in spec.category_names if n.strip().lower() not in by_name]
        if missing:
            available = ", ".join(c["name"] for c in categories)
            raise GroundTruthError(f"{ann_path}: unknown category names {missing}; available: {available}")
        chosen = {by_name[n.strip().lower()] for n in spec.category_names}
        category_ids = [c for c in category_ids if c in chosen]
        description["category_names"] = list(spec.category_names)

    if spec.min_objects > 0:
        chosen_cats = set(category_ids)
        counts: dict[int, int] = {}
        for ann in dataset["annotations"]:
            if ann["category_id"] in chosen_cats and not ann.get("iscrowd", 0):
                counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
        images = [i for i in images if counts.get(i, 0) >= spec.min_objects]
        description["min_objects"] = spec.min_objects

    if spec.first is not None:
        if spec.first < 1:
            raise ValueError("first N needs N >= 1")
        images = images[: spec.first]
        description["first"] = spec.first
    elif spec.random is not None:
        if spec.random < 1:
            raise ValueError("random N needs N >= 1")
        if spec.random < len(images):
            rng = np.random.default_rng(spec.seed)
            picked = set(rng.choice(len(images), size=spec.random, replace=False).tolist())
            images = [i for k, i in enumerate(images) if k in picked]
        description["random"] = spec.random
        description["seed"] = spec.seed

    if not images:
        raise GroundTruthError(f"{ann_path}: the subset selects no images ({description})")
    description["images_selected"] = len(images)
    description["categories_selected"] = len(category_ids)
    return Subset(image_ids=images, category_ids=category_ids, description=description)
