"""COCO ground truth, loaded in one place: read an instances file, check it, index it.

Training (`data.coco.CocoDetection`) and evaluation (`detr-attn eval`) both read annotation
files through `load_coco_gt`; every error names the file and the field.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from pycocotools.coco import COCO

from detection.io import read_json

T = TypeVar("T")


class GroundTruthError(ValueError):
    """The annotation file cannot be used; the message names the file and the problem."""


def _fail(path: Path | str, problem: str) -> None:
    raise GroundTruthError(f"{path}: {problem}")


def coco_split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """The folder layout of a COCO-format dataset (what `detr-attn synth` writes and
    `detr-attn train --data` reads): (ROOT/<split>/, ROOT/annotations/instances_<split>.json)."""
    root = Path(root)
    return root / split, root / "annotations" / f"instances_{split}.json"


def call_quietly(fn: Callable[[], T]) -> tuple[T, str]:
    """Run `fn` with stdout captured (pycocotools prints progress); -> (value, printed text)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        value = fn()
    return value, buffer.getvalue()


def coco_from_dataset(dataset: dict[str, Any]) -> COCO:
    """A pycocotools COCO object over an in-memory dict, without its chatter."""
    coco = COCO()
    coco.dataset = dataset
    call_quietly(coco.createIndex)
    return coco


def _check_structure(dataset: dict[str, Any], path: Path | str, strict: bool) -> None:
    """What any reader needs: the three lists, unique integer image / category ids, category
    names, and the annotation keys pycocotools indexes by."""
    for key in ("images", "annotations", "categories"):
        if key == "annotations" and not strict and key not in dataset:
            continue  # a dataset of unannotated images is fine for training
        if not isinstance(dataset.get(key), list):
            _fail(path, f"not a COCO instances file: missing list {key!r}")
    image_ids = [img.get("id") if isinstance(img, dict) else None for img in dataset["images"]]
    if any(not isinstance(i, int) for i in image_ids):
        _fail(path, "every image needs an integer 'id'")
    if len(set(image_ids)) != len(image_ids):
        dup = sorted({i for i in image_ids if image_ids.count(i) > 1})[:5]
        _fail(path, f"duplicate image ids {dup}")
    categories = dataset["categories"]
    cat_ids = [c.get("id") if isinstance(c, dict) else None for c in categories]
    if any(not isinstance(i, int) for i in cat_ids) or any("name" not in c for c in categories):
        _fail(path, "every category needs an integer 'id' and a 'name'")
    if len(set(cat_ids)) != len(cat_ids):
        _fail(path, "duplicate category ids")
    for index, ann in enumerate(dataset.get("annotations", [])):
        if not isinstance(ann, dict):
            _fail(path, f"annotations[{index}] is not an object")
        for key in ("id", "image_id", "category_id"):
            if key not in ann:
                _fail(path, f"annotations[{index}] has no {key!r} field")


def _check_for_evaluation(dataset: dict[str, Any], path: Path | str) -> None:
    """Everything COCOeval needs from each image and annotation (see `validate_coco_gt`)."""
    for img in dataset["images"]:
        if not isinstance(img.get("width"), int) or not isinstance(img.get("height"), int):
            _fail(path, f"image {img['id']} needs integer 'width' and 'height'")
    known_images = {img["id"] for img in dataset["images"]}
    known_cats = {c["id"] for c in dataset["categories"]}
    seen_ann_ids: set[int] = set()
    for ann in dataset["annotations"]:
        ann_id = ann.get("id")
        if not isinstance(ann_id, int):
            _fail(path, f"annotation without an integer 'id': {str(ann)[:120]}")
        if ann_id == 0:
            _fail(
                path,
                "annotation id 0 found; pycocotools treats id 0 as 'unmatched', so this object "
                "could never be matched. Renumber annotation ids from 1.",
            )
        if ann_id in seen_ann_ids:
            _fail(path, f"duplicate annotation id {ann_id}; pycocotools indexes annotations by id")
        seen_ann_ids.add(ann_id)
        if ann.get("image_id") not in known_images:
            _fail(path, f"annotation {ann_id} refers to unknown image_id {ann.get('image_id')}")
        if ann.get("category_id") not in known_cats:
            _fail(path, f"annotation {ann_id} refers to unknown category_id {ann.get('category_id')}")
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox)
            or bbox[2] < 0
            or bbox[3] < 0
        ):
            _fail(path, f"annotation {ann_id} has an invalid bbox {bbox!r} (need [x, y, w, h], w, h >= 0)")
        for needed in ("area", "iscrowd"):
            if needed not in ann:
                _fail(path, f"annotation {ann_id} has no {needed!r} field (COCOeval needs it)")


def validate_coco_gt(dataset: dict[str, Any], path: Path | str = "<ground truth>",
                     strict: bool = True) -> dict[str, Any]:
    """Check a COCO instances dict; return it unchanged.

    Always (GroundTruthError naming `path`): the `images` / `categories` lists (and
    `annotations`, which only `strict` requires), unique integer image and category ids,
    category names, and `id` / `image_id` / `category_id` on every annotation.
    strict (evaluation) also refuses what COCOeval gets wrong: images without integer
    width / height, annotation id 0 or duplicated (pycocotools records matches by annotation
    id and treats 0 as "unmatched"), annotations of unknown images or categories, boxes that
    are not 4 finite numbers with w, h >= 0, and missing `area` / `iscrowd` fields. Training
    reads non-strict and skips such annotations one by one, with a warning each.
    """
    _check_structure(dataset, path, strict)
    if strict:
        _check_for_evaluation(dataset, path)
    return dataset


def load_coco_gt(path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Read and validate a COCO instances JSON file (see `validate_coco_gt`)."""
    path = Path(path)
    dataset = read_json(path, "annotation file", GroundTruthError)
    if not isinstance(dataset, dict):
        _fail(path, "not a COCO instances file (top level is not an object)")
    return validate_coco_gt(dataset, path, strict)
