"""Deterministic synthetic COCO-format shapes dataset: the offline testbed for training and eval
(`generate_dataset`; the same seed always yields the same bytes)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from detection.data.ground_truth import coco_split_paths
from detection.io import write_bytes_atomic, write_text_atomic
from detection.data.image_codec import encode_image
from detection.data.synthetic_hard import render_hard_image
from detection.data.synthetic_parts import (CLASS_NAMES, HARD_CLASS_NAMES, SHAPE_SETS, SUBPIXEL_SHIFT, SynthConfig, SynthObject,
                                            draw_canvas, fill_polygon, has_hole,
                                            mask_to_polygons, object_colour, place, polygon_area, unit_shape)

__all__ = ["CLASS_NAMES", "HARD_CLASS_NAMES", "SHAPE_SETS", "SynthConfig", "SynthObject", "categories", "generate_dataset",
           "generate_split", "image_rng", "mask_to_polygons", "render_image"]

logger = logging.getLogger(__name__)

_PNG_COMPRESSION = 3  # zlib level of the written PNGs (part of the byte-identical output)


def render_image(
    config: SynthConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[SynthObject]]:
    """Draw one image. Returns (uint8 (H, W, 3) RGB, objects in drawing order).

    `config.shapes == "hard"` draws it with `data.synthetic_hard.render_hard_image`."""
    if config.shapes == "hard":
        return render_hard_image(config, rng)
    image = draw_canvas(config, rng)
    height, width = image.shape[:2]
    difficulty = config.difficulty

    lo, hi = config.object_size_range()
    lo, hi = min(lo, 0.9 * min(height, width)), min(hi, 0.9 * min(height, width))
    max_occluded = 0.15 + 0.35 * difficulty  # fraction of an object that may be hidden
    min_contrast = 90 - 50 * difficulty
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))

    masks: list[np.ndarray] = []  # full (amodal) masks in drawing order
    full_areas: list[int] = []
    labels: list[int] = []
    for slot in range(wanted):
        # the first min_objects get many tries so every image has at least min_objects
        for _attempt in range(200 if slot < config.min_objects else 15):
            label = int(rng.integers(len(CLASS_NAMES)))
            # log-uniform extent so small, medium and large objects are all common
            extent = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            radius = extent / 2
            centre = (rng.uniform(radius * 0.6, width - radius * 0.6), rng.uniform(radius * 0.6, height - radius * 0.6))
            polygon = place(unit_shape(CLASS_NAMES[label], rng), centre, radius, rng.uniform(0, 2 * np.pi))
            mask = np.zeros((height, width), dtype=np.uint8)
            fill_polygon(mask, polygon, 1)
            mask = mask.astype(bool)
            full = int(mask.sum())
            if full < 16:
                continue
            # cropped by the border counts as hidden too
            clipped = 1.0 - full / max(polygon_area(polygon), 1.0)
            if clipped > max_occluded:
                continue
            # the new object hides part of every earlier one; keep all of them visible enough
            if not _earlier_stay_visible(masks, full_areas, mask, max_occluded):
                continue
            colour = object_colour(image, rng, min_contrast)
            fill_polygon(image, polygon, tuple(float(c) for c in colour))
            if rng.random() < 0.5:  # darker outline, inside the mask (keeps masks exact)
                pts = np.round(polygon * (1 << SUBPIXEL_SHIFT)).astype(np.int32).reshape(1, -1, 2)
                cv2.polylines(image, pts, True, tuple(float(c) * 0.6 for c in colour), 1, cv2.LINE_8, SUBPIXEL_SHIFT)
            masks.append(mask)
            full_areas.append(full)
            labels.append(label)
            break

    # noise and mild blur over everything: photometric only, masks are unchanged
    noise_sigma = 2 + 8 * difficulty
    image += rng.normal(0, noise_sigma, size=image.shape).astype(np.float32)
    if rng.random() < 0.3 * difficulty:
        image = cv2.GaussianBlur(image, (3, 3), 0)
    image_u8 = np.clip(np.round(image), 0, 255).astype(np.uint8)

    objects: list[SynthObject] = []
    covered = np.zeros((height, width), dtype=bool)
    for mask, label in reversed(list(zip(masks, labels))):
        visible = mask & ~covered
        covered |= mask
        ys, xs = np.nonzero(visible)
        if len(xs) == 0:
            continue
        polygons = mask_to_polygons(visible)
        if not polygons:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        objects.append(SynthObject(
            category_id=label + 1,
            bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            area=float(len(xs)),
            segmentation=polygons,
            visible_mask=visible,
        ))
    objects.reverse()  # back to drawing order
    return image_u8, objects


def _earlier_stay_visible(masks: list[np.ndarray], full_areas: list[int], new_mask: np.ndarray,
                          max_occluded: float) -> bool:
    """True if drawing `new_mask` on top keeps every earlier object visible enough and whole.

    Rejected when an earlier object would lose more than `max_occluded` of its area, or its
    visible part would get a hole (COCO polygons cannot represent holes, and a shape seen
    through a ring of another is not "partial occlusion").
    """
    cover = new_mask.copy()  # union of everything drawn after object i, built back to front
    for mask, full in zip(reversed(masks), reversed(full_areas)):
        hidden = mask & cover
        if hidden.sum() > max_occluded * full:
            return False
        if hidden.any() and has_hole(mask & ~cover):
            return False
        cover |= mask
    return True


# ---------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------
_SPLIT_KEYS = {"train": 1, "val": 2, "test": 3, "demo": 4, "selection": 5}


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of every other image and of generation order."""
    key = _SPLIT_KEYS.get(split)
    if key is None:
        key = int.from_bytes(split.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng(np.random.SeedSequence([seed, key, index]))


def categories(shapes: str = "convex") -> list[dict[str, Any]]:
    """COCO categories of a shape set (`SynthConfig.shapes`); id = index + 1 in both sets."""
    names = HARD_CLASS_NAMES if shapes == "hard" else CLASS_NAMES
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(names)]


def generate_split(out_dir: str | Path, split: str, count: int, seed: int, config: SynthConfig,
                   progress: bool = False) -> dict[str, Any]:
    """Write `count` images to OUT/split/ and OUT/annotations/instances_<split>.json.

    Returns the COCO dict written.
    """
    out_dir = Path(out_dir)
    image_dir, annotations_file = coco_split_paths(out_dir, split)
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    next_ann_id = 1  # COCO: annotation id 0 breaks pycocotools matching
    for index in tqdm(range(count), desc=f"synth {split}", unit="img",
                      disable=None if progress else True):  # terminals only
        rng = image_rng(seed, split, index)
        image, objects = render_image(config, rng)
        file_name = f"{index:06d}.png"
        write_bytes_atomic(image_dir / file_name, encode_image(image, ".png", png_compression=_PNG_COMPRESSION))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": int(image.shape[0]),
                       "width": int(image.shape[1])})
        for obj in objects:
            annotations.append({
                "id": next_ann_id, "image_id": image_id, "category_id": obj.category_id,
                "bbox": obj.bbox, "area": obj.area, "segmentation": obj.segmentation, "iscrowd": 0,
            })
            next_ann_id += 1
    coco = {
        "info": {"description": "detr-attn synthetic shapes", "version": "1",
                 "generator": {"seed": seed, "split": split, **config.generator_info()}},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(config.shapes),
    }
    text = json.dumps(coco, sort_keys=True, separators=(",", ":")) + "\n"
    write_text_atomic(annotations_file, text)
    logger.info("wrote %d %s images and their annotations to %s", count, split, out_dir)
    return coco


def generate_dataset(out_dir: str | Path, train: int, val: int, seed: int, config: SynthConfig | None = None,
                     progress: bool = False, selection: int = 0, test: int = 0) -> None:
    """Write `train` + `val` (+ `selection` + `test`) images and their COCO annotations under `out_dir`:

        DIR/train/000000.png ...   DIR/val/000000.png ...
        DIR/annotations/instances_train.json   DIR/annotations/instances_val.json

    Every image is drawn from its own random stream seeded by (seed, split, index), so the
    same seed always yields the same bytes (PNG with a fixed compression level, JSON with
    sorted keys). Annotations follow COCO: bbox [x, y, w, h] in pixels (pixel-edge
    convention: a box covering columns 3..7 inclusive is x=3, w=5), `area` = visible-mask
    pixel count, polygon `segmentation` of the visible part, iscrowd=0, annotation ids from 1.
    Objects are drawn back to front; boxes, areas and polygons describe the VISIBLE part.
    Hard shapes (`config.shapes == "hard"`) carry compressed-RLE masks instead of polygons (a ring's
    hole is part of its mask's outline). Each split has its own streams: the selection split (for
    choices made before a test) and the test split never share an image with train or val.
    """
    config = config or SynthConfig()
    for split, count in (("train", train), ("val", val), ("selection", selection), ("test", test)):
        if count > 0:
            generate_split(out_dir, split, count, seed, config, progress=progress)
