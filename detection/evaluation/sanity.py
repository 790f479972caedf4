"""Sanity check of the explanation methods (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"):
cascading randomisation of the transformer's layers from the top, and how far each method's maps of
the trained model's detections move (Spearman and Pearson correlation with the trained maps).

Native DETR only (`randomisable_layers`): its layers are re-initialised as `models.transformer` does
(each submodule's `reset_parameters`, then Xavier-uniform on every matrix), seeded per layer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from detection.attention.methods import MethodOptions, Targets
from detection.engine.explain import build_methods
from detection.engine.fast import PreparedModels
from detection.engine.predictor import Predictor, PredictorSettings

CONFIDENCE = 0.95


def randomisable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(parameter-name prefix, layer) of the transformer in cascade order, top first: the decoder
    layers from the last to the first, then the encoder layers from the last to the first.
    ValueError for a model without DETR's `transformer.decoder.layers` / `transformer.encoder.layers`."""
    transformer = getattr(model, "transformer", None)
    decoder = getattr(getattr(transformer, "decoder", None), "layers", None)
    encoder = getattr(getattr(transformer, "encoder", None), "layers", None)
    if not isinstance(decoder, nn.ModuleList) or not isinstance(encoder, nn.ModuleList):
        raise ValueError(f"the sanity check randomises native DETR's transformer layers; {type(model).__name__} "
                         "has no transformer.decoder.layers / transformer.encoder.layers")
    return ([(f"transformer.decoder.layers.{i}", decoder[i]) for i in reversed(range(len(decoder)))]
            + [(f"transformer.encoder.layers.{i}", encoder[i]) for i in reversed(range(len(encoder)))])


def layer_seed(seed: int, position: int) -> int:
    """The seed of the position-th layer of the cascade (independent streams per (seed, position))."""
    return int(np.random.SeedSequence([int(seed), int(position)]).generate_state(1)[0])


def reinitialise_layer(layer: nn.Module, seed: int) -> None:
    """Re-initialise `layer` in place as the model's own init does: `reset_parameters` of every
    submodule, children before their parent (so MultiheadAttention's zeroed out_proj bias stays
    zero), then Xavier-uniform on every matrix (`Transformer._reset_parameters`); seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for module in reversed(list(layer.modules())):
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            for parameter in layer.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)


def randomised_copy(model: nn.Module, depth: int, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A copy of `model` (eval mode) with the top `depth` layers of `randomisable_layers`
    re-initialised (layer at cascade position p with `layer_seed(seed, p)`, so every depth
    shares the weights of the layers it has in common with a shallower one), and their names."""
    layers = randomisable_layers(model)
    if not 0 <= depth <= len(layers):
        raise ValueError(f"randomisation depth {depth} is outside 0..{len(layers)} (the model's transformer layers)")
    randomised = copy.deepcopy(model).eval()
    chosen = randomisable_layers(randomised)[:depth]
    for position, (_, layer) in enumerate(chosen):
        reinitialise_layer(layer, layer_seed(seed, position))
    return randomised, [name for name, _ in chosen]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.array_equal(a, b):
        return 1.0  # identical maps: exactly 1 (the float formula may round below it)
    a, b = a - a.mean(), b - b.mean()
    scale = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    return float(np.dot(a, b) / scale) if scale > 0 else float("nan")


def map_correlations(trained: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(spearman (N,), pearson (N,)) float64 between maps k of `trained` and `other`, each (N, h, w)
    on the same grid, over all cells. Equal maps give exactly 1; a constant map that differs
    from the other gives NaN (no ranking to correlate)."""
    trained, other = np.asarray(trained, np.float64), np.asarray(other, np.float64)
    if trained.shape != other.shape:
        raise ValueError(f"maps of shape {trained.shape} and {other.shape}: the grids differ")
    spearman, pearson = [], []
    for a, b in zip(trained.reshape(len(trained), -1), other.reshape(len(other), -1)):
        pearson.append(_pearson(a, b))
        spearman.append(_pearson(rankdata(a), rankdata(b)))
    return np.asarray(spearman, np.float64), np.asarray(pearson, np.float64)


def bootstrap_mean(per_image: Sequence[np.ndarray], resamples: int = 1000, seed: int = 0
                   ) -> tuple[float, float, float]:
    """(mean, low, high): the mean over all detections (NaN ignored) and its 95 % percentile
    bootstrap interval, resampling images with replacement (seeded)."""
    values = [np.asarray(v, np.float64) for v in per_image if len(v)]
    if not values:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.nanmean(np.concatenate(values)))
    rng = np.random.default_rng(seed)
    sums = np.array([np.nansum(v) for v in values])
    counts = np.array([np.count_nonzero(~np.isnan(v)) for v in values])
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.nanpercentile(means, [tail, 100 - tail])
    return mean, float(low), float(high)


@dataclass
class SanityResult:
    """The cascade's correlations. layers: cascade order (top first); choices: the methods' map
    names; detections[i]: image i's number of explained detections; depths: the randomisation
    depths run (0: nothing randomised; d: the top d layers); spearman / pearson [j][choice][i]:
    (N_i,) float64 of image i at depth depths[j]."""

    sources: list[str]
    layers: list[str]
    choices: list[str]
    detections: list[int]
    depths: list[int] = field(default_factory=list)
    spearman: list[dict[str, list[np.ndarray]]] = field(default_factory=list)
    pearson: list[dict[str, list[np.ndarray]]] = field(default_factory=list)

    def rows(self, resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
        """One row per (depth, choice): the last randomised layer, mean and 95 % bootstrap interval
        over images of each correlation, and how many detections had an undefined one."""
        rows = []
        for depth, spearman, pearson in zip(self.depths, self.spearman, self.pearson):
            for choice in self.choices:
                s_mean, s_low, s_high = bootstrap_mean(spearman[choice], resamples, seed)
                p_mean, p_low, p_high = bootstrap_mean(pearson[choice], resamples, seed)
                undefined = int(sum(np.isnan(v).sum() for v in spearman[choice]))
                rows.append({"depth": depth, "randomised_down_to": self.layers[depth - 1] if depth else None,
                             "choice": choice, "spearman": {"mean": s_mean, "low": s_low, "high": s_high},
                             "pearson": {"mean": p_mean, "low": p_low, "high": p_high}, "undefined": undefined})
        return rows

    def to_json(self, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
        """The summary rows plus every per-detection correlation (lists, per depth, choice and image)."""
        def lists(table: list[dict[str, list[np.ndarray]]]) -> list[dict[str, list[list[float]]]]:
            return [{choice: [v.tolist() for v in per_image] for choice, per_image in step.items()} for step in table]

        return {"images": self.sources, "detections": self.detections, "cascade": self.layers,
                "depths": self.depths, "choices": self.choices, "confidence": CONFIDENCE, "bootstrap_resamples": resamples,
                "rows": self.rows(resamples, seed), "per_detection": {"spearman": lists(self.spearman),
                                                                      "pearson": lists(self.pearson)}}


def _maps_of(model: nn.Module, names: Sequence[str], options: MethodOptions, device: str,
             score_threshold: float, images: Sequence[np.ndarray], targets: Sequence[Targets] | None
             ) -> tuple[list[Targets], list[dict[str, np.ndarray]]]:
    """Each image's targets (the given ones, or `model`'s detections) and choice -> (N, h, w) cell maps."""
    prepared = PreparedModels(model)
    runner = build_methods(model, names, device, options, prepared)
    predictor = Predictor(model, PredictorSettings(
        device=device, precision="fp32", score_threshold=score_threshold, cross_attention=True,
        rollout=runner.needs_self_attention), prepared)
    found, maps = [], []
    for index, rgb in enumerate(images):
        detections, record = predictor.predict_arrays([rgb])
        image_targets = Targets.from_detections(detections[0]) if targets is None else targets[index]
        found.append(image_targets)
        cells = runner.image_cell_maps(rgb, detections[0].image_size, record.select_image(0), image_targets) \
            if len(image_targets) else {choice: np.zeros((0, 1, 1), np.float32) for choice in runner.choices()}
        maps.append({choice: m if isinstance(m, np.ndarray) else m.values.numpy() for choice, m in cells.items()})
    return found, maps


def sanity_check(model: nn.Module, images: Sequence[np.ndarray], methods: Sequence[str], *,
                 sources: Sequence[str] | None = None, options: MethodOptions = MethodOptions(
                     layers=("last",), heads=("mean",), attn_grad_layers=("last",)),
                 depths: Sequence[int] | None = None, score_threshold: float = 0.7, seed: int = 0,
                 device: str = "cpu", progress: Callable[[str], None] | None = None) -> SanityResult:
    """Cascading randomisation of `model`'s transformer (`randomised_copy`), maps of `methods`.

    images: uint8 (H, W, 3) RGB. The trained model's detections (score >= score_threshold) are the
    targets at every depth: the same images, query indices, labels and boxes; each method's maps
    are compared on its own grid (feature cells, or D-RISE's pooled pixels), fp32.
    depths: the randomisation depths to run (default 0..number of layers; 0 recomputes the
    trained maps through a copy). options: the methods' options (default one choice each).
    """
    layers = [name for name, _ in randomisable_layers(model)]
    depths = list(range(len(layers) + 1)) if depths is None else list(depths)
    if any(not 0 <= depth <= len(layers) for depth in depths):
        raise ValueError(f"randomisation depths {depths}: each must be in 0..{len(layers)} (the transformer's layers)")
    targets, trained = _maps_of(model, methods, options, device, score_threshold, images, None)
    choices = list(trained[0]) if trained else []
    result = SanityResult(list(sources or [f"image {i}" for i in range(len(images))]), layers, choices,
                          [len(t) for t in targets], depths)
    for depth in depths:
        randomised, touched = randomised_copy(model, depth, seed)
        if progress is not None:
            progress(f"depth {depth}: randomised {', '.join(touched) or 'nothing'}")
        _, maps = _maps_of(randomised, methods, options, device, score_threshold, images, targets)
        spearman: dict[str, list[np.ndarray]] = {choice: [] for choice in choices}
        pearson: dict[str, list[np.ndarray]] = {choice: [] for choice in choices}
        for before, after in zip(trained, maps):
            for choice in choices:
                s, p = map_correlations(before[choice], after[choice])
                spearman[choice].append(s)
                pearson[choice].append(p)
        result.spearman.append(spearman)
        result.pearson.append(pearson)
    return result


def _cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def sanity_markdown(rows: Sequence[dict[str, Any]], choices: Sequence[str]) -> str:
    """The rows as a markdown table: one line per depth, one column per choice, each cell
    'Spearman mean [95 % interval] / Pearson mean'."""
    lines = ["| randomised (top down) | " + " | ".join(choices) + " |", "|---|" + "---|" * len(choices)]
    by_depth: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_depth.setdefault(row["depth"], {})[row["choice"]] = row
    for depth, cells in by_depth.items():
        first = next(iter(cells.values()))
        label = "nothing (trained)" if depth == 0 else f"{depth}: down to {first['randomised_down_to']}"
        lines.append(f"| {label} | " + " | ".join(
            f"{_cell(cells[c]['spearman'])} / {cells[c]['pearson']['mean']:.3f}" for c in choices) + " |")
    return "\n".join(lines)
