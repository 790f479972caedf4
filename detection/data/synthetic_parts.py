"""Parts of the synthetic shapes generator shared by its renderers (`data.synthetic`, the convex
shapes; `data.synthetic_hard`, the shapes whose box is not their mask): config, shapes, drawing."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

#: Shape classes; COCO category id = index + 1.
CLASS_NAMES: tuple[str, ...] = ("circle", "triangle", "square", "star", "cross")
#: The classes of `--shapes hard`: the five convex ones (same ids), then shapes whose box is not their
#: mask (`data.synthetic_hard`): annulus, hollow frame, L, U, chevron, crescent, thin rotated bar.
HARD_CLASS_NAMES: tuple[str, ...] = CLASS_NAMES + ("ring", "frame", "ell", "u-shape", "chevron", "crescent", "bar")
SHAPE_SETS = ("convex", "hard")

# Sub-pixel precision for cv2 polygon filling (coordinates are scaled by 2**SUBPIXEL_SHIFT).
SUBPIXEL_SHIFT = 4



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
    # --shapes hard (`data.synthetic_hard`); none of these is read for the default "convex" shapes
    shapes: str = "convex"  # "convex": the five CLASS_NAMES; "hard": HARD_CLASS_NAMES as well
    convex_share: float = 0.4  # chance that an object of a hard image is one of the five convex shapes
    stroke_cells: float = 2.0  # narrowest stroke of a hard shape, in feature cells of the model below
    feature_stride: int = 16  # the model's feature stride (the demo model: 16)
    model_min_size: int = 160  # the model's resize rule (shortest edge, capped longest edge; demo: 160, 240)
    model_max_size: int = 240

    def __post_init__(self) -> None:
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {self.difficulty}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 0.0 <= self.size_jitter < 1.0:
            raise ValueError(f"size_jitter must be in [0, 1), got {self.size_jitter}")
        if self.shapes not in SHAPE_SETS:
            raise ValueError(f"shapes must be one of {SHAPE_SETS}, got {self.shapes!r}")
        if not 0.3 <= self.convex_share <= 1.0:
            raise ValueError(f"convex_share must be in [0.3, 1] (at least 30 % convex objects), got {self.convex_share}")
        if self.stroke_cells <= 0 or self.feature_stride <= 0 or min(self.model_min_size, self.model_max_size) <= 0:
            raise ValueError("stroke_cells, feature_stride, model_min_size and model_max_size must be positive")

    def generator_info(self) -> dict[str, Any]:
        """The knobs written to the annotations' info: the hard-shape ones only for hard shapes,
        so the default output stays byte-identical to the generator before them."""
        info = asdict(self)
        if self.shapes == "convex":
            for name in HARD_FIELDS:
                info.pop(name)
        return info

    def stroke_pixels(self, height: int, width: int) -> float:
        """The narrowest stroke of a hard shape in image pixels: `stroke_cells` feature cells once the
        model has resized the (height, width) image by its rule (shortest edge to model_min_size,
        longest edge at most model_max_size)."""
        scale = min(self.model_min_size / min(height, width), self.model_max_size / max(height, width))
        return self.stroke_cells * self.feature_stride / scale

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
def unit_shape(name: str, rng: np.random.Generator) -> np.ndarray:
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


def place(vertices: np.ndarray, centre: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return vertices @ rot.T * radius + np.asarray(centre)


def fill_polygon(canvas: np.ndarray, polygon: np.ndarray, colour: Any) -> None:
    """Fill `polygon` (N, 2) float pixel coords (pixel centres at integers) on `canvas`."""
    pts = np.round(polygon * (1 << SUBPIXEL_SHIFT)).astype(np.int32).reshape(1, -1, 2)
    cv2.fillPoly(canvas, pts, colour, lineType=cv2.LINE_8, shift=SUBPIXEL_SHIFT)


# ---------------------------------------------------------------------------------------
# backgrounds and distractors
# ---------------------------------------------------------------------------------------
def draw_background(height: int, width: int, difficulty: float, rng: np.random.Generator) -> np.ndarray:
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


def draw_canvas(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """An image's size (image_size with size_jitter, drawn height first), its background and its
    non-object distractors: uint8 (H, W, 3) RGB, the start of every generated image."""
    jitter = config.size_jitter
    height = int(round(config.image_size * rng.uniform(1 - jitter, 1 + jitter)))
    width = int(round(config.image_size * rng.uniform(1 - jitter, 1 + jitter)))
    image = draw_background(height, width, config.difficulty, rng)
    draw_distractors(image, config.difficulty, rng)
    return image


def draw_distractors(image: np.ndarray, difficulty: float, rng: np.random.Generator) -> None:
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
            poly = random_blob(rng, (3, 0.08 * min(height, width) + 4), (0, width), (0, height))
            fill_polygon(image, poly, colour)


def random_blob(rng: np.random.Generator, radius_range: tuple[float, float], x_range: tuple[float, float],
                y_range: tuple[float, float]) -> np.ndarray:
    """(16, 2) pixel vertices of an irregular blob: a star-convex polygon with smooth random radii
    (no sharp class shape), its radius and centre drawn uniformly from the ranges."""
    n = 16
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.exp(np.convolve(np.tile(rng.normal(0, 0.35, n), 3), np.ones(3) / 3, "same")[n : 2 * n])
    radius = rng.uniform(*radius_range)
    centre = (rng.uniform(*x_range), rng.uniform(*y_range))
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1) * radius + np.asarray(centre)


def object_colour(background: np.ndarray, rng: np.random.Generator, min_contrast: float) -> np.ndarray:
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
    segmentation: list[list[float]] | dict[str, Any]  # COCO polygons (convex shapes) or compressed RLE (hard)
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


def has_hole(mask: np.ndarray) -> bool:
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    # RETR_CCOMP: entries with a parent (hierarchy[..., 3] >= 0) are hole boundaries
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))



HARD_FIELDS = ("shapes", "convex_share", "stroke_cells", "feature_stride", "model_min_size", "model_max_size")
