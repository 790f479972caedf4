"""Deterministic synthetic COCO-format shapes dataset: the offline testbed for training and eval
(`generate_dataset`; the same seed always yields the same bytes)."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from detection.data.ground_truth import coco_split_paths
from detection.io import write_bytes_atomic, write_text_atomic
from detection.data.image_codec import encode_image

logger = logging.getLogger(__name__)

#: Shape classes; COCO category id = index + 1.
CLASS_NAMES: tuple[str, ...] = ("circle", "triangle", "square", "star", "cross")

# Sub-pixel precision for cv2 polygon filling (coordinates are scaled by 2**_SHIFT).
_SHIFT = 4
_PNG_COMPRESSION = 3  # zlib level of the written PNGs (part of the byte-identical output)


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator. `difficulty` in [0, 1] scales clutter, distractors, occlusion,
    noise and how small objects may get; 0 is the easiest (plain backgrounds, large shapes)."""

    image_size: int = 160  # nominal side in pixels
    size_jitter: float = 0.2  # each side drawn uniformly in image_size * [1 - j, 1 + j]
    min_objects: int = 1
    max_objects: int = 8
    difficulty: float = 0.5
    min_object_size: float | None = None  # object extent in pixels; None -> from difficulty
    max_object_size: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {self.difficulty}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 0.0 <= self.size_jitter < 1.0:
            raise ValueError(f"size_jitter must be in [0, 1), got {self.size_jitter}")

    def object_size_range(self) -> tuple[float, float]:
        """(min, max) object extent (diameter of the circumscribed circle) in pixels."""
        lo = self.min_object_size
        hi = self.max_object_size
        if lo is None:
            # hard data reaches COCO "small" (< 32^2 px area); easy data stays mostly medium
            lo = self.image_size * (0.20 - 0.10 * self.difficulty)
        if hi is None:
            hi = self.image_size * 0.65
        return float(lo), float(max(hi, lo + 1))


# ---------------------------------------------------------------------------------------
# shapes: unit polygons (radius ~1 around the origin), rotated/scaled at placement
# ---------------------------------------------------------------------------------------
def _unit_shape(name: str, rng: np.random.Generator) -> np.ndarray:
    """(N, 2) float vertices of a shape of circumradius ~1 centred on the origin."""
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        aspect = rng.uniform(0.85, 1.0)
        return np.stack([np.cos(t), aspect * np.sin(t)], axis=1)
    if name == "triangle":
        t = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.15, 0.15, size=3)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "square":
        aspect = rng.uniform(0.85, 1.0)
        s = 1 / math.sqrt(2)
        return np.array([[-s, -s * aspect], [s, -s * aspect], [s, s * aspect], [-s, s * aspect]])
    if name == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        radius = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    if name == "cross":
        a = rng.uniform(0.22, 0.3)  # half arm width
        b = 0.95
        return np.array([
            [-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
            [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a],
        ])
    raise ValueError(f"unknown shape {name!r}")


def _place(vertices: np.ndarray, centre: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return vertices @ rot.T * radius + np.asarray(centre)


def _fill(canvas: np.ndarray, polygon: np.ndarray, colour: Any) -> None:
    """Fill `polygon` (N, 2) float pixel coords (pixel centres at integers) on `canvas`."""
    pts = np.round(polygon * (1 << _SHIFT)).astype(np.int32).reshape(1, -1, 2)
    cv2.fillPoly(canvas, pts, colour, lineType=cv2.LINE_8, shift=_SHIFT)


# ---------------------------------------------------------------------------------------
# backgrounds and distractors
# ---------------------------------------------------------------------------------------
def _background(height: int, width: int, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """float32 (H, W, 3) RGB in [0, 255]: gradient, plus texture and clutter as difficulty rises."""
    base = rng.uniform(40, 215, size=3)
    tilt = rng.uniform(-60, 60, size=(2, 3))
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    image = base + ys * tilt[0] + xs * tilt[1]
    image = np.broadcast_to(image, (height, width, 3)).astype(np.float32).copy()
    if rng.random() < 0.3 + 0.7 * difficulty:
        kind = rng.integers(3)
        amplitude = rng.uniform(8, 20 + 40 * difficulty)
        if kind == 0:  # stripes at a random angle
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(6, 30)
            yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
            phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * np.pi / period
            image += (amplitude * np.sin(phase))[..., None] * rng.uniform(0.3, 1.0, size=3)
        elif kind == 1:  # checkerboard
            cell = int(rng.integers(6, 24))
            yy, xx = np.mgrid[0:height, 0:width]
            board = ((yy // cell + xx // cell) % 2).astype(np.float32) - 0.5
            image += (amplitude * board)[..., None] * rng.uniform(0.3, 1.0, size=3)
        else:  # smooth blotchy noise
            small = rng.normal(0, 1, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
            image += amplitude * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return image


def _draw_distractors(image: np.ndarray, difficulty: float, rng: np.random.Generator) -> None:
    """Non-object clutter: line segments and irregular blobs (never one of the shape classes)."""
    height, width = image.shape[:2]
    count = int(rng.integers(0, 1 + round(6 * difficulty)))
    for _ in range(count):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        if rng.random() < 0.5:
            p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(image, p0, p1, colour, int(rng.integers(1, 4)), lineType=cv2.LINE_8)
        else:
            # irregular blob: a star-convex polygon with random radii (smooth, no sharp class shape)
            n = 16
            t = np.linspace(0, 2 * np.pi, n, endpoint=False)
            r = np.exp(np.convolve(np.tile(rng.normal(0, 0.35, n), 3), np.ones(3) / 3, "same")[n : 2 * n])
            radius = rng.uniform(3, 0.08 * min(height, width) + 4)
            centre = (rng.uniform(0, width), rng.uniform(0, height))
            poly = np.stack([r * np.cos(t), r * np.sin(t)], axis=1) * radius + np.asarray(centre)
            _fill(image, poly, colour)


def _object_colour(background: np.ndarray, rng: np.random.Generator, min_contrast: float) -> np.ndarray:
    """A random colour at least `min_contrast` (L2 in RGB) away from the mean background."""
    mean = background.reshape(-1, 3).mean(axis=0)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(20):
        if np.linalg.norm(colour - mean) >= min_contrast:
            break
        colour = rng.uniform(0, 255, size=3)
    return colour


# ---------------------------------------------------------------------------------------
# one image
# ---------------------------------------------------------------------------------------
@dataclass
class SynthObject:
    category_id: int
    bbox: list[float]  # [x, y, w, h] pixels, visible part
    area: float  # visible pixel count
    segmentation: list[list[float]]  # COCO polygons of the visible part
    visible_mask: np.ndarray  # (H, W) bool


def mask_to_polygons(mask: np.ndarray, upsample: int = 4) -> list[list[float]]:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] tracing the outer boundary of a bool mask.

    COCO coordinates are continuous: pixel (row i, col j) covers [j, j+1) x [i, i+1). Tracing
    the mask itself would run through boundary pixel CENTRES and lose half a pixel all round
    (IoU ~0.92 on small shapes), so the mask is upsampled `upsample`x (nearest) first: the
    traced outline then lies within 0.5/upsample px of the true pixel edges (IoU ~0.999 after
    pycocotools rasterises it back). Holes are not representable as COCO polygons and are filled.
    """
    up = cv2.resize(mask.astype(np.uint8), None, fx=upsample, fy=upsample, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        # drop staircase vertices closer than 1 upsampled px (0.25 px) to the simplified outline
        contour = cv2.approxPolyDP(contour, 1.0, True)
        points = (contour.reshape(-1, 2).astype(np.float64) + 0.5) / upsample
        if len(points) < 3:
            continue  # pycocotools needs >= 3 points; slivers carry no area anyway
        polygons.append([round(float(v), 3) for v in points.reshape(-1)])
    return polygons


def render_image(
    config: SynthConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[SynthObject]]:
    """Draw one image. Returns (uint8 (H, W, 3) RGB, objects in drawing order)."""
    jitter = config.size_jitter
    height = int(round(config.image_size * rng.uniform(1 - jitter, 1 + jitter)))
    width = int(round(config.image_size * rng.uniform(1 - jitter, 1 + jitter)))
    difficulty = config.difficulty
    image = _background(height, width, difficulty, rng)
    _draw_distractors(image, difficulty, rng)

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
            polygon = _place(_unit_shape(CLASS_NAMES[label], rng), centre, radius, rng.uniform(0, 2 * np.pi))
            mask = np.zeros((height, width), dtype=np.uint8)
            _fill(mask, polygon, 1)
            mask = mask.astype(bool)
            full = int(mask.sum())
            if full < 16:
                continue
            # cropped by the border counts as hidden too
            clipped = 1.0 - full / max(_polygon_area(polygon), 1.0)
            if clipped > max_occluded:
                continue
            # the new object hides part of every earlier one; keep all of them visible enough
            if not _earlier_stay_visible(masks, full_areas, mask, max_occluded):
                continue
            colour = _object_colour(image, rng, min_contrast)
            _fill(image, polygon, tuple(float(c) for c in colour))
            if rng.random() < 0.5:  # darker outline, inside the mask (keeps masks exact)
                pts = np.round(polygon * (1 << _SHIFT)).astype(np.int32).reshape(1, -1, 2)
                cv2.polylines(image, pts, True, tuple(float(c) * 0.6 for c in colour), 1, cv2.LINE_8, _SHIFT)
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
        if hidden.any() and _has_hole(mask & ~cover):
            return False
        cover |= mask
    return True


def _has_hole(mask: np.ndarray) -> bool:
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    # RETR_CCOMP: entries with a parent (hierarchy[..., 3] >= 0) are hole boundaries
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# ---------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------
_SPLIT_KEYS = {"train": 1, "val": 2, "test": 3, "demo": 4}


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of every other image and of generation order."""
    key = _SPLIT_KEYS.get(split)
    if key is None:
        key = int.from_bytes(split.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng(np.random.SeedSequence([seed, key, index]))


def categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]


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
                 "generator": {"seed": seed, "split": split, **asdict(config)}},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }
    text = json.dumps(coco, sort_keys=True, separators=(",", ":")) + "\n"
    write_text_atomic(annotations_file, text)
    logger.info("wrote %d %s images and their annotations to %s", count, split, out_dir)
    return coco


def generate_dataset(out_dir: str | Path, train: int, val: int, seed: int, config: SynthConfig | None = None,
                     progress: bool = False) -> None:
    """Write `train` + `val` images and their COCO annotations under `out_dir`:

        DIR/train/000000.png ...   DIR/val/000000.png ...
        DIR/annotations/instances_train.json   DIR/annotations/instances_val.json

    Every image is drawn from its own random stream seeded by (seed, split, index), so the
    same seed always yields the same bytes (PNG with a fixed compression level, JSON with
    sorted keys). Annotations follow COCO: bbox [x, y, w, h] in pixels (pixel-edge
    convention: a box covering columns 3..7 inclusive is x=3, w=5), `area` = visible-mask
    pixel count, polygon `segmentation` of the visible part, iscrowd=0, annotation ids from 1.
    Objects are drawn back to front; boxes, areas and polygons describe the VISIBLE part.
    """
    config = config or SynthConfig()
    for split, count in (("train", train), ("val", val)):
        if count > 0:
            generate_split(out_dir, split, count, seed, config, progress=progress)
