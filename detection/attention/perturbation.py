"""Deletion and insertion curves: a detection's score as its most salient pixels are replaced by
a substrate (mean colour or blur) or copied onto it (`perturbation_curve`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import cv2
import numpy as np

from detection.attention.metrics import check_map


@dataclass
class Curve:
    """Score of one detection against the fraction of pixels removed (deletion) or added."""

    fractions: np.ndarray  # (S + 1,) in [0, 1]
    scores: np.ndarray  # (S + 1,)
    auc: float


def _substrate(image_rgb: np.ndarray, kind: str, blur_sigma: float) -> np.ndarray:
    if kind == "mean":
        mean = image_rgb.reshape(-1, 3).mean(axis=0)
        return np.broadcast_to(np.round(mean).astype(np.uint8), image_rgb.shape).copy()
    if kind == "blur":
        return cv2.GaussianBlur(image_rgb, (0, 0), sigmaX=blur_sigma, sigmaY=blur_sigma)
    raise ValueError(f"unknown substrate {kind!r}; use 'mean' or 'blur'")


def saliency_order(values: np.ndarray, tie_seed: int = 0) -> np.ndarray:
    """Flat pixel indices of a (H, W) map, most salient first; equal values in a random order seeded
    by `tie_seed` (the same for every map of that size and seed)."""
    flat = values.reshape(-1)
    tie_break = np.random.default_rng(tie_seed).permutation(flat.size)
    return np.lexsort((tie_break, -flat))


def perturbation_curve(
    image_rgb: np.ndarray,
    saliency: np.ndarray,
    score_fn: Callable[[np.ndarray], np.ndarray],
    mode: str = "deletion",
    steps: int = 16,
    substrate: str = "mean",
    blur_sigma: float = 5.0,
    batch_size: int = 8,
    tie_seed: int = 0,
) -> Curve:
    """Deletion or insertion curve of one detection.

    image_rgb: uint8 (H, W, 3); saliency: (H, W) in the same pixels.
    score_fn: uint8 (K, H, W, 3) -> (K,) detection score for each perturbed image; called in
        chunks of `batch_size` images (that is the batching: one forward pass per chunk).
    Pixels are ranked by saliency, ties in a random order seeded by `tie_seed` (raster order would
    delete a flat map's top rows first, biasing flat maps and flat parts of maps). At step k of `steps`, the top
    round(k / steps * H * W) pixels are replaced by the substrate (deletion: mean colour or a
    blurred copy) or copied from the image onto the substrate (insertion).
    AUC is the trapezoidal area under score vs fraction, fraction in [0, 1].
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) image, got {image_rgb.dtype} {image_rgb.shape}")
    values = check_map(saliency)
    if values.shape != image_rgb.shape[:2]:
        raise ValueError(f"saliency {values.shape} does not match image {image_rgb.shape[:2]}")
    height, width = values.shape
    order = saliency_order(values, tie_seed)
    fill = _substrate(image_rgb, substrate, blur_sigma)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * height * width).astype(np.int64)

    def perturbed(count: int) -> np.ndarray:
        chosen = np.zeros(height * width, dtype=bool)
        chosen[order[:count]] = True
        chosen = chosen.reshape(height, width)
        if mode == "deletion":
            return np.where(chosen[..., None], fill, image_rgb)
        return np.where(chosen[..., None], image_rgb, fill)

    scores: list[float] = []
    for start in range(0, len(counts), batch_size):
        batch = np.stack([perturbed(int(c)) for c in counts[start : start + batch_size]])
        out = np.asarray(score_fn(batch), dtype=np.float64).reshape(-1)
        if len(out) != len(batch):
            raise ValueError(f"score_fn returned {len(out)} scores for {len(batch)} images")
        scores.extend(out.tolist())
    scores_arr = np.asarray(scores)
    return Curve(fractions=fractions, scores=scores_arr, auc=float(np.trapezoid(scores_arr, fractions)))


@dataclass(frozen=True)
class CurveRequest:
    """One curve `perturbation_curves` draws: `saliency` (H, W) of detection `target` (a column of the
    score function's output), in `mode` ("deletion" or "insertion"); `key` names it in the result."""

    key: Hashable
    saliency: np.ndarray
    mode: str
    target: int


def perturbation_curves(
    image_rgb: np.ndarray,
    requests: Sequence[CurveRequest],
    scores_fn: Callable[[np.ndarray], np.ndarray],
    steps: int = 16,
    substrate: str = "mean",
    blur_sigma: float = 5.0,
    batch_size: int = 32,
    tie_seed: int = 0,
) -> dict[Hashable, Curve]:
    """Every requested curve of one image in as few forward passes as `batch_size` allows; each curve
    equals `perturbation_curve` of the same map, mode, steps, substrate and tie seed.

    scores_fn: uint8 (K, H, W, 3) -> (K, T) the score of each of the image's T detections on each
    perturbed image (one forward per call). A perturbed image is the set of pixels showing the original
    (the rest is substrate): the images of every step of every request are collected, each distinct one
    (the unperturbed and the all-substrate ends, maps with the same order, steps that pick the same
    pixels) is run once, in chunks of `batch_size`, and scored for every detection at once.
    """
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) image, got {image_rgb.dtype} {image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    fill = _substrate(image_rgb, substrate, blur_sigma)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * height * width).astype(np.int64)
    shown_masks: list[np.ndarray] = []  # the distinct perturbed images, as the pixels showing the original
    index_of: dict[bytes, int] = {}
    orders: dict[bytes, np.ndarray] = {}
    rows: dict[Hashable, list[int]] = {}
    for request in requests:
        if request.mode not in ("deletion", "insertion"):
            raise ValueError(f"mode must be 'deletion' or 'insertion', got {request.mode!r}")
        values = check_map(request.saliency)
        if values.shape != (height, width):
            raise ValueError(f"saliency {values.shape} does not match image {(height, width)}")
        order_key = values.tobytes()
        order = orders.get(order_key)
        if order is None:
            order = orders[order_key] = saliency_order(values, tie_seed)
        rank = np.empty(height * width, dtype=np.int64)
        rank[order] = np.arange(height * width)
        row = []
        for count in counts:
            chosen = rank < count
            shown = ~chosen if request.mode == "deletion" else chosen
            packed = np.packbits(shown).tobytes()
            if packed not in index_of:
                index_of[packed] = len(shown_masks)
                shown_masks.append(shown.reshape(height, width))
            row.append(index_of[packed])
        rows[request.key] = row
    table: list[np.ndarray] = []
    for start in range(0, len(shown_masks), batch_size):
        batch = np.stack([np.where(mask[..., None], image_rgb, fill) for mask in shown_masks[start:start + batch_size]])
        out = np.asarray(scores_fn(batch), dtype=np.float64)
        if out.ndim != 2 or len(out) != len(batch):
            raise ValueError(f"scores_fn returned shape {out.shape} for {len(batch)} images; expected (K, T)")
        table.append(out)
    scores_table = np.concatenate(table) if table else np.zeros((0, 0))
    curves: dict[Hashable, Curve] = {}
    for request in requests:
        scores = scores_table[rows[request.key], request.target]
        curves[request.key] = Curve(fractions=fractions, scores=scores, auc=float(np.trapezoid(scores, fractions)))
    return curves
