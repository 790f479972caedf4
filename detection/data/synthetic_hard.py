"""`detr-attn synth --shapes hard`: images where an object's box is not its mask (rings, hollow frames,
L / U / chevron shapes, crescents, thin rotated bars among the convex shapes), with occluders and
same-coloured distractors; masks are written as compressed RLE (holes included)."""
from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from detection.data.synthetic_parts import (CLASS_NAMES, HARD_CLASS_NAMES, SynthConfig, SynthObject,
                                            draw_canvas, fill_polygon, object_colour, place,
                                            random_blob, unit_shape)

#: The shapes `--shapes hard` adds (HARD_CLASS_NAMES after the five convex ones).
NONCONVEX_NAMES: tuple[str, ...] = HARD_CLASS_NAMES[len(CLASS_NAMES):]

Polygons = tuple[list[np.ndarray], list[np.ndarray]]  # (filled polygons, holes cut out after), pixels around 0


# ---------------------------------------------------------------------------------------
# the shapes, in pixels around the origin: extent E, narrowest stroke s, feature cell c
# ---------------------------------------------------------------------------------------
def _ellipse(rx: float, ry: float, centre: tuple[float, float] = (0.0, 0.0), points: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([centre[0] + rx * np.cos(t), centre[1] + ry * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _centred(polygons: Polygons) -> Polygons:
    """The shape moved so that the centre of its filled polygons' extent is the origin."""
    points = np.concatenate(polygons[0])
    centre = (points.min(axis=0) + points.max(axis=0)) / 2
    return [p - centre for p in polygons[0]], [p - centre for p in polygons[1]]


def _ring(extent: float, s: float, c: float, rng: np.random.Generator) -> Polygons:
    radius, aspect = extent / 2, rng.uniform(0.85, 1.0)
    thickness = rng.uniform(s, max(s, min(1.3 * s, radius * aspect - c / 2)))  # the hole >= 1 cell across
    return [_ellipse(radius, radius * aspect)], [_ellipse(radius - thickness, radius * aspect - thickness)]


def _frame(extent: float, s: float, c: float, rng: np.random.Generator) -> Polygons:
    width = extent / math.sqrt(2)
    height = max(width * rng.uniform(0.8, 1.0), 2 * s + c)
    thickness = rng.uniform(s, max(s, min(1.2 * s, (height - c) / 2)))
    return ([_rect(-width / 2, -height / 2, width / 2, height / 2)],
            [_rect(-width / 2 + thickness, -height / 2 + thickness, width / 2 - thickness, height / 2 - thickness)])


def _ell(extent: float, s: float, c: float, rng: np.random.Generator) -> Polygons:
    width = extent / math.sqrt(2)
    height = max(width * rng.uniform(0.75, 1.0), 2 * s + c)
    arm = rng.uniform(s, max(s, min(1.2 * s, (height - c) / 2)))
    return _centred(([_rect(0, 0, arm, height), _rect(0, height - arm, width, height)], []))


def _u_shape(extent: float, s: float, c: float, rng: np.random.Generator) -> Polygons:
    width = extent / math.sqrt(2)
    height = max(width * rng.uniform(0.8, 1.0), 2 * s + c)
    arm = rng.uniform(s, max(s, min(1.2 * s, (width - c) / 2, height - c)))
    return _centred(([_rect(0, 0, arm, height), _rect(width - arm, 0, width, height),
                      _rect(0, height - arm, width, height)], []))


def _chevron(extent: float, s: float, c: float, rng: np.random.Generator) -> Polygons:
    half_angle = math.radians(rng.uniform(25, 40))  # each arm's angle from the axis
    length = extent * 0.6
    arms = []
    for side in (-1.0, 1.0):
        direction = np.array([side * math.sin(half_angle), math.cos(half_angle)])
        normal = np.array([direction[1], -direction[0]])
        start, end = -direction * s / 2, direction * length
        arms.append(np.stack([start - normal * s / 2, end - normal * s / 2, end + normal * s / 2,
                              start + normal * s / 2]))
    return _centred((arms, []))


def _crescent(extent: float, s: float, c: float, rng: np.random.Generator) -> Polygons:
    radius = extent / 2
    thickness = rng.uniform(2 * s, max(2 * s, min(2.5 * s, radius)))  # the thickest part; the tips taper
    inner = rng.uniform(max(radius - thickness / 2 + c / 2, 0.6 * radius), 0.95 * radius)
    offset = thickness - radius + inner  # the cut-out disk's centre: thickness = radius - inner + offset
    return [_ellipse(radius, radius)], [_ellipse(inner, inner, (offset, 0.0))]


def _bar(extent: float, s: float, c: float, rng: np.random.Generator) -> Polygons:
    width = s * rng.uniform(1.0, 1.15)
    return [_rect(-extent / 2, -width / 2, extent / 2, width / 2)], []


#: name -> (builder(extent, stroke, cell, rng), smallest extent(stroke, cell) that keeps the stroke and a
#: hole / gap of at least one cell). Extents are the shape's nominal size in pixels.
SHAPES: dict[str, tuple[Callable[..., Polygons], Callable[[float, float], float]]] = {
    NONCONVEX_NAMES[0]: (_ring, lambda s, c: (2 * s + c) / 0.85),
    NONCONVEX_NAMES[1]: (_frame, lambda s, c: math.sqrt(2) * (2 * s + c)),
    NONCONVEX_NAMES[2]: (_ell, lambda s, c: math.sqrt(2) * (2 * s + c)),
    NONCONVEX_NAMES[3]: (_u_shape, lambda s, c: math.sqrt(2) * (2 * s + c)),
    NONCONVEX_NAMES[4]: (_chevron, lambda s, c: (c + s / math.cos(math.radians(25))) / (2 * math.sin(math.radians(25))) / 0.6),
    NONCONVEX_NAMES[5]: (_crescent, lambda s, c: 4 * s + c),
    NONCONVEX_NAMES[6]: (_bar, lambda s, c: 3.5 * s),
}


#: Shapes turned at least 20 degrees off the image axes (an axis-aligned bar is its own box).
TILTED: frozenset[str] = frozenset({NONCONVEX_NAMES[6]})
_MIN_TILT = math.radians(20)


def shape_mask(name: str, extent: float, stroke: float, cell: float, centre: tuple[float, float], angle: float,
               canvas: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Bool (H, W) full mask of one shape (convex or not) of `extent` px rotated by `angle` (radians) about
    `centre` (x, y pixels; TILTED shapes stay 20 degrees off the axes); stroke, cell in pixels."""
    mask = np.zeros(canvas, dtype=np.uint8)
    if name in CLASS_NAMES:
        fill_polygon(mask, place(unit_shape(name, rng), centre, extent / 2, angle), 1)
        return mask.astype(bool)
    if name in TILTED:  # the angle folded into [20, 70] degrees off the axes, modulo a quarter turn
        angle = _MIN_TILT + (angle % (math.pi / 2)) * (math.pi / 2 - 2 * _MIN_TILT) / (math.pi / 2) + \
            math.pi / 2 * math.floor(angle / (math.pi / 2))
    fills, holes = SHAPES[name][0](extent, stroke, cell, rng)
    for polygon in fills:
        fill_polygon(mask, place(polygon, centre, 1.0, angle), 1)
    for polygon in holes:
        fill_polygon(mask, place(polygon, centre, 1.0, angle), 0)
    return mask.astype(bool)


# ---------------------------------------------------------------------------------------
# one image
# ---------------------------------------------------------------------------------------
def _connected(mask: np.ndarray) -> bool:
    count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return count == 2  # background + one piece


def _stays_visible(masks: list[np.ndarray], full_areas: list[int], cover: np.ndarray, max_occluded: float) -> bool:
    """True if hiding `cover` (and every later mask over each earlier one) leaves each object at most
    `max_occluded` hidden and in one piece."""
    cover = cover.copy()
    for mask, full in zip(reversed(masks), reversed(full_areas)):
        hidden = mask & cover
        if hidden.sum() > max_occluded * full or (hidden.any() and not _connected(mask & ~cover)):
            return False
        cover |= mask
    return True


def encode_rle(mask: np.ndarray) -> dict[str, object]:
    """COCO compressed RLE of a bool (H, W) mask, counts as an ASCII string (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def render_hard_image(config: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[SynthObject]]:
    """Draw one hard image. Returns (uint8 (H, W, 3) RGB, objects in drawing order).

    An object is convex with chance `config.convex_share`, else one of NONCONVEX_NAMES whose narrowest
    stroke is at least `config.stroke_pixels` (`stroke_cells` feature cells at the model's stride) and
    whose hole or gap is at least one cell (such a shape may exceed max_object_size; one that cannot fit
    in the image is drawn again). Occluders (blobs of no class) hide parts of objects; distractors of an
    object's own colour lie apart from every object. Boxes, areas and RLE masks describe the VISIBLE part.
    """
    image = draw_canvas(config, rng)
    height, width = image.shape[:2]
    difficulty = config.difficulty
    stroke = config.stroke_pixels(height, width)
    cell = stroke / config.stroke_cells
    lo, hi = config.object_size_range()
    cap = 0.9 * min(height, width)
    lo, hi = min(lo, cap), min(hi, cap)
    max_occluded = 0.15 + 0.35 * difficulty
    min_contrast = 90 - 50 * difficulty
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))

    masks: list[np.ndarray] = []
    full_areas: list[int] = []
    labels: list[int] = []
    colours: list[np.ndarray] = []
    for slot in range(wanted):
        for _attempt in range(200 if slot < config.min_objects else 15):
            convex = rng.random() < config.convex_share
            names = CLASS_NAMES if convex else NONCONVEX_NAMES
            name = names[int(rng.integers(len(names)))]
            smallest = lo if convex else max(lo, SHAPES[name][1](stroke, cell))
            if smallest > cap:
                continue
            extent = math.exp(rng.uniform(math.log(smallest), math.log(max(hi, smallest))))
            margin = extent / 2 * 0.6
            centre = (rng.uniform(margin, max(margin, width - margin)), rng.uniform(margin, max(margin, height - margin)))
            pad = int(math.ceil(extent))  # drawn on a padded canvas: what the border crops counts as hidden
            padded = shape_mask(name, extent, stroke, cell, (centre[0] + pad, centre[1] + pad), rng.uniform(0, 2 * np.pi),
                                (height + 2 * pad, width + 2 * pad), rng)
            mask = padded[pad:pad + height, pad:pad + width]
            full = int(mask.sum())
            if full < 16 or 1.0 - full / max(int(padded.sum()), 1) > max_occluded or not _connected(mask):
                continue
            if not _stays_visible(masks, full_areas, mask, max_occluded):
                continue
            colour = object_colour(image, rng, min_contrast)
            image[mask] = colour
            if rng.random() < 0.5:  # darker outline, inside the mask (keeps masks exact)
                edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                image[edge] = colour * 0.6
            masks.append(mask)
            full_areas.append(full)
            labels.append(HARD_CLASS_NAMES.index(name))
            colours.append(colour)
            break

    cover = _draw_occluders(image, masks, full_areas, stroke, max_occluded, difficulty, rng)
    _draw_same_colour_distractors(image, masks, colours, cover, stroke, difficulty, rng)

    image += rng.normal(0, 2 + 8 * difficulty, size=image.shape).astype(np.float32)
    if rng.random() < 0.3 * difficulty:
        image = cv2.GaussianBlur(image, (3, 3), 0)
    image_u8 = np.clip(np.round(image), 0, 255).astype(np.uint8)

    objects: list[SynthObject] = []
    covered = cover
    for mask, label in reversed(list(zip(masks, labels))):
        visible = mask & ~covered
        covered = covered | mask
        ys, xs = np.nonzero(visible)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        objects.append(SynthObject(category_id=label + 1, bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                   area=float(len(xs)), segmentation=encode_rle(visible), visible_mask=visible))
    objects.reverse()
    return image_u8, objects


def _draw_occluders(image: np.ndarray, masks: list[np.ndarray], full_areas: list[int], stroke: float,
                    max_occluded: float, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """Blobs of no class drawn over parts of objects; returns their bool (H, W) union."""
    height, width = image.shape[:2]
    cover = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(0, 1 + round(2 * difficulty))) if masks else 0):
        ys, xs = np.nonzero(masks[int(rng.integers(len(masks)))])
        pick = int(rng.integers(len(xs)))
        polygon = random_blob(rng, (0.3 * stroke, 0.6 * stroke), (xs[pick] - 2, xs[pick] + 2), (ys[pick] - 2, ys[pick] + 2))
        colour = rng.uniform(0, 255, size=3)
        blob = np.zeros((height, width), dtype=np.uint8)
        fill_polygon(blob, polygon, 1)
        if _stays_visible(masks, full_areas, cover | blob.astype(bool), max_occluded):
            image[blob.astype(bool)] = colour
            cover |= blob.astype(bool)
    return cover


def _draw_same_colour_distractors(image: np.ndarray, masks: list[np.ndarray], colours: list[np.ndarray],
                                  cover: np.ndarray, stroke: float, difficulty: float, rng: np.random.Generator) -> None:
    """For some objects, a blob of the object's own colour that touches no object (3 px apart)."""
    height, width = image.shape[:2]
    taken = np.zeros((height, width), dtype=np.uint8)
    for mask in masks:
        taken |= mask.astype(np.uint8)
    taken = cv2.dilate(taken | cover.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    for colour in colours:
        if rng.random() >= 0.3 + 0.4 * difficulty:
            continue
        for _try in range(10):
            polygon = random_blob(rng, (0.3 * stroke, 0.6 * stroke), (0, width), (0, height))
            blob = np.zeros((height, width), dtype=np.uint8)
            fill_polygon(blob, polygon, 1)
            blob_mask = blob.astype(bool)
            if blob_mask.any() and not (blob_mask & taken).any():
                image[blob_mask] = colour
                taken |= blob_mask
                break

