"""Floors and a ceiling scored like explanation methods: maps made from the box alone (a Gaussian, the
uniform box, the box-only family, the best of it frozen), a seeded random map, and the ground-truth mask
pooled to the model's cell grid (what a perfect map on that grid could reach). Their names live here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from detection.attention.maps import cells_to_image, image_to_cells
from detection.attention.matching import box_mask

GAUSSIAN_BASELINE = "gaussian-baseline"  # Gaussian in the box, sigma = --gaussian-sigma x box size
UNIFORM_BOX = "uniform-box"  # 1 inside the box, 0 outside
RANDOM_MAP = "random-map"  # uniform noise per pixel, seeded by (seed, image id, detection)
BEST_BOX_ONLY = "best-box-only"  # the box-only family member chosen on the selection split, frozen
CEILING = "gt-mask-ceiling"  # the matched GT mask pooled to the cell grid, upsampled as the maps are
#: the floors of `--floors all`, in table order (the box-only family comes with `--floors box-family`)
FLOORS: tuple[str, ...] = (GAUSSIAN_BASELINE, UNIFORM_BOX, RANDOM_MAP, BEST_BOX_ONLY, CEILING)
_SHORT = {"gaussian": GAUSSIAN_BASELINE, "uniform": UNIFORM_BOX, "random": RANDOM_MAP,
          "best-box-only": BEST_BOX_ONLY, "ceiling": CEILING}


def gaussian_box_map(box_xyxy: Sequence[float], image_size: tuple[int, int], sigma_fraction: float = 0.25) -> np.ndarray:
    """Gaussian centred on the box, sigma = sigma_fraction * box size, 0 outside; float32 (H, W).

    Any map worth showing should beat it: it knows nothing but the predicted box."""
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


def _inner_box(box_xyxy: Sequence[float], fraction: float) -> tuple[float, float, float, float]:
    """The box shrunk by `fraction` of its width / height on every side."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    dx, dy = fraction * (x1 - x0), fraction * (y1 - y0)
    return x0 + dx, y0 + dy, x1 - dx, y1 - dy


def _border_band(box_xyxy: Sequence[float], image_size: tuple[int, int]) -> np.ndarray:
    """The box without the box shrunk by a fifth of its size on every side."""
    height, width = image_size
    x0, y0, x1, y1 = _inner_box(box_xyxy, 0.2)
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    inner = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return (box_mask(box_xyxy, image_size) & ~inner).astype(np.float32)


def _box_minus_centre(box_xyxy: Sequence[float], image_size: tuple[int, int]) -> np.ndarray:
    """The box without the ellipse of half its width and height at its centre."""
    height, width = image_size
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 4, 0.5), max((y1 - y0) / 4, 0.5)
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    centre = ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2 <= 1.0
    return (box_mask(box_xyxy, image_size) & ~centre).astype(np.float32)


#: Maps computable from the box alone (xyxy, (H, W)) -> float32 (H, W); `--floors box-family` scores each.
BOX_FAMILY: dict[str, Callable[[Sequence[float], tuple[int, int]], np.ndarray]] = {
    **{f"box-gauss-{s}": (lambda box, size, s=s: gaussian_box_map(box, size, s)) for s in (0.1, 0.25, 0.5, 1.0)},
    "box-uniform": lambda box, size: box_mask(box, size).astype(np.float32),
    "box-border": _border_band,
    "box-minus-centre": _box_minus_centre,
}


def parse_floors(text: str | None) -> tuple[str, ...]:
    """--floors: comma list of gaussian, uniform, random, best-box-only, ceiling, box-family, or all
    (every floor but the family); None or "" -> the Gaussian alone (as before the floors)."""
    if not text:
        return (GAUSSIAN_BASELINE,)
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            names += FLOORS
        elif part == "box-family":
            names += BOX_FAMILY
        elif part in _SHORT or part in FLOORS or part in BOX_FAMILY:
            names.append(_SHORT.get(part, part))
        else:
            raise ValueError(f"--floors: unknown floor {part!r}; use {', '.join([*_SHORT, 'box-family', 'all'])}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class CellGrid:
    """The model's cell grid of one image: cell (y, x) covers model-input pixels [y·stride, (y+1)·stride)
    x [x·stride, (x+1)·stride) of an input of `input_size` (h_in, w_in); `grid_size` (hv, wv)."""

    stride: int
    input_size: tuple[int, int]
    grid_size: tuple[int, int]


def ceiling_maps(regions: Sequence[np.ndarray | None], grid: CellGrid, image_size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) float32: each region (bool (H, W) GT mask, None for an unmatched detection -> zeros)
    averaged over the cells of `grid` and brought back to pixels by `cells_to_image`, the maps' path."""
    out = np.zeros((len(regions), *image_size), dtype=np.float32)
    present = [k for k, region in enumerate(regions) if region is not None]
    if present:
        stacked = np.stack([regions[k].astype(np.float32) for k in present])
        cells = image_to_cells(stacked, grid.stride, grid.input_size, grid.grid_size)
        out[present] = cells_to_image(cells, grid.stride, grid.input_size, image_size)
    return out


@dataclass(frozen=True)
class FloorSettings:
    """Which floors an evaluation scores. best_box_only: the BOX_FAMILY member frozen as BEST_BOX_ONLY
    (chosen on the selection split: `best_box_only_choice`); seed: of the random maps."""

    floors: tuple[str, ...] = (GAUSSIAN_BASELINE,)
    gaussian_sigma: float = 0.25
    best_box_only: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if BEST_BOX_ONLY in self.floors and self.best_box_only not in BOX_FAMILY:
            raise ValueError(f"the {BEST_BOX_ONLY} floor needs --best-box-only, one of {sorted(BOX_FAMILY)} "
                             f"(chosen on the selection split with --floors box-family), got {self.best_box_only!r}")


def floor_maps(settings: FloorSettings, image_id: int, boxes_xyxy: np.ndarray, image_size: tuple[int, int],
               regions: Sequence[np.ndarray | None], grid: CellGrid | None) -> dict[str, np.ndarray]:
    """floor -> (N, H, W) float32 maps of one image's N detections (boxes xyxy in original pixels; regions:
    the matched GT mask per detection or None). The ceiling needs `grid`; without one it is left out."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    out: dict[str, np.ndarray] = {}

    def stack(make: Callable[[Sequence[float]], np.ndarray]) -> np.ndarray:
        return np.stack([make(b) for b in boxes]) if len(boxes) else np.zeros((0, *image_size), np.float32)

    for name in settings.floors:
        if name == GAUSSIAN_BASELINE:
            out[name] = stack(lambda b: gaussian_box_map(b, image_size, settings.gaussian_sigma))
        elif name == UNIFORM_BOX:
            out[name] = stack(lambda b: box_mask(b, image_size).astype(np.float32))
        elif name == RANDOM_MAP:
            out[name] = np.stack([np.random.default_rng([settings.seed, int(image_id), k]).random(image_size, np.float32)
                                  for k in range(len(boxes))]) if len(boxes) else np.zeros((0, *image_size), np.float32)
        elif name == BEST_BOX_ONLY:
            out[name] = stack(lambda b: BOX_FAMILY[settings.best_box_only](b, image_size))
        elif name == CEILING:
            if grid is not None:
                out[name] = ceiling_maps(regions, grid, image_size)
        else:
            out[name] = stack(lambda b, name=name: BOX_FAMILY[name](b, image_size))
    return out


def best_box_only_choice(attention: dict[str, dict[str, Any]], metric: str = "mask_ap") -> str | None:
    """The BOX_FAMILY member with the best `metric` in an evaluation's `attention` rows (lower is better for
    deletion_auc, higher for the rest); None when the family was not scored."""
    rows = {name: row.get(metric) for name, row in attention.items() if name in BOX_FAMILY and row.get(metric) is not None}
    if not rows:
        return None
    pick = min if metric == "deletion_auc" else max
    return pick(rows, key=lambda name: rows[name])
