"""Running a model over a COCO subset for evaluation: detections as COCO results, attention
faithfulness of the explained ones, torchrun shards gathered and merged on rank 0."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou
from tqdm import tqdm

from detection.attention.methods import AttnGrad, Drise
from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.drise_saliency import DriseOptions
from detection.attention.methods import MethodOptions, Targets
from detection.attention.methods import choice_name as _choice_name
from detection.attention.floors import GAUSSIAN_BASELINE, CellGrid, FloorSettings
from detection.attention.metrics import FaithfulnessAccumulator
from detection.attention.perturbation import CurveRequest, perturbation_curves
from detection.boxes import coco_xywh, cxcywh_to_xyxy
from detection.data.images import load_image
from detection.data.preprocess import image_to_input, pad_batch
from detection.engine.predictor import Predictor, PredictorSettings
from detection.data.sources import SourceItem
from detection.engine.explain import build_methods, method_names
from detection.engine.fast import PreparedModels
from detection.engine.model_failure import ModelRunError, probe
from detection.evaluation.results import EvaluationError
from detection.evaluation.subsets import Subset
from detection.models.contract import Detector
from detection.runtime.device import resolve_device
from detection.runtime.distributed import DistContext

DEFAULT_LAYERS = ("last", "mean", ROLLOUT_LAYERS)
DEFAULT_HEADS = ("mean", "max")


@dataclass
class ModelRunOptions:
    """How `run_model` runs the model: inference settings, then the attention metrics, then
    deletion / insertion. explain: the explanation methods (`attention.methods`: raw, rollout,
    attn-grad, relevance, drise); None = raw for every `layers` x `heads` pair (see
    `choice_name`) plus rollout when "rollout" is among `layers`, as before #13."""

    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 2
    num_workers: int = 0
    score_threshold: float = 0.0
    attention: bool = True
    attention_threshold: float = 0.5
    layers: Sequence[str] = DEFAULT_LAYERS
    heads: Sequence[str] = DEFAULT_HEADS
    explain: Sequence[str] | None = None
    attn_grad_layers: Sequence[str] = ("last",)
    drise: DriseOptions = field(default_factory=DriseOptions)
    drise_precision: str | None = None  # None: `precision`
    in_box_power: float | None = None  # None: in-box's frozen default (`attention.methods.in_box`)
    gaussian_sigma: float = 0.25
    floors: Sequence[str] = (GAUSSIAN_BASELINE,)  # `attention.floors`: scored like the methods
    best_box_only: str | None = None  # the box-only family member frozen as the best-box-only floor
    class_agnostic_maps: bool = False  # maps: match by IoU alone, score under the GT's category
    deletion_insertion: bool = False
    di_steps: int = 16
    di_substrate: str = "mean"
    di_max_detections: int = 3
    di_batch_size: int = 32  # perturbed images per forward (every curve of an image shares the forwards)
    progress: bool = True


def choice_name(layers: str, heads: str) -> str:
    """'rollout/mean': the key of one aggregation choice in metrics.json's `attention`."""
    return _choice_name(layers, heads)


def detection_scores_fn(engine: Any, detector: Detector, boxes_xyxy: np.ndarray,
                        labels: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """Scores of T detections on perturbed copies of their image (for deletion / insertion).

    engine: the Predictor's model callable `(images, padding_mask) -> outputs` (same device,
    precision and folding as the detections came from); detector: the model, whose
    preprocess_spec prepares the perturbed images and whose postprocess_rule gives class
    probabilities; boxes_xyxy (T, 4) original pixels; labels (T,) model labels.
    Returns uint8 (K, H, W, 3) -> (K, T), one forward for the K images: for detection t, max over
    queries of p(label_t) x IoU(query box, box_t), D-RISE-style, so the detection is followed even
    if another query takes it over. On the unperturbed image this is >= the detection's own score.
    """
    targets = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4))
    label_index = torch.as_tensor(list(labels), dtype=torch.long)

    def score(batch: np.ndarray) -> np.ndarray:
        height, width = batch.shape[1:3]
        spec = detector.preprocess_spec
        images, mask = pad_batch([image_to_input(np.ascontiguousarray(im), spec) for im in batch], spec.size_divisibility)
        with torch.no_grad():
            outputs = engine(images, mask)
        probs = detector.postprocess_rule.class_probabilities(outputs["pred_logits"])[..., label_index].cpu()  # (K, Q, T)
        boxes = cxcywh_to_xyxy(outputs["pred_boxes"].float().cpu()) * torch.tensor([width, height, width, height])
        ious = torch.stack([box_iou(b, targets) for b in boxes])  # (K, Q, T)
        return (probs.float() * ious).max(dim=1).values.numpy()

    return score


def detection_score_fn(engine: Any, detector: Detector, box_xyxy: Sequence[float], label: int) -> Callable[[np.ndarray], np.ndarray]:
    """`detection_scores_fn` of one detection: uint8 (K, H, W, 3) -> (K,) (the step-by-step path's)."""
    scores = detection_scores_fn(engine, detector, np.asarray([box_xyxy]), [label])
    return lambda batch: scores(batch)[:, 0]


def run_model(
    model: Any,
    gt_dataset: dict[str, Any],
    subset: Subset,
    images_dir: Path,
    label_to_category: dict[int, int],
    options: ModelRunOptions,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[dict[str, str]], list[str]]:
    """Detect (and explain) this rank's share of the subset (images rank, rank + world, ...).

    Returns (COCO results, FaithfulnessAccumulator state or None, errors, warnings).
    Boxes in results are xywh in original pixels; category ids are dataset ids.
    """
    images_by_id = {img["id"]: img for img in gt_dataset["images"]}
    evaluated = set(subset.category_ids)
    gt_by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in gt_dataset["annotations"]:
        if ann["category_id"] in evaluated:
            gt_by_image.setdefault(ann["image_id"], []).append(ann)
    my_ids = subset.image_ids[rank::world_size]
    # SourceItems carry the GT image id through the engine (no path matching needed)
    items = [
        SourceItem(key=f"img{image_id}", file=str(images_dir / images_by_id[image_id]["file_name"]), image_id=int(image_id), unit=unit)
        for unit, image_id in enumerate(my_ids)
    ]
    runner = None
    prepared = PreparedModels(model)  # one prepared copy per precision: the predictor's, and D-RISE's
    if options.attention:
        method_options = MethodOptions(layers=options.layers, heads=options.heads,
                                       attn_grad_layers=options.attn_grad_layers, drise=options.drise,
                                       drise_precision=options.drise_precision or options.precision,
                                       in_box_power=options.in_box_power)
        runner = build_methods(model, method_names(options.explain, options.layers), options.device, method_options,
                               prepared)
    accumulator = (
        FaithfulnessAccumulator(runner.choices(), floor_settings=floor_settings(options),
                                class_agnostic=options.class_agnostic_maps)
        if runner is not None
        else None
    )
    predictor = Predictor(model, PredictorSettings(
        device=options.device, precision=options.precision, batch_size=options.batch_size,
        num_workers=options.num_workers, score_threshold=options.score_threshold,
        cross_attention=runner is not None and runner.needs_attention,
        rollout=runner is not None and runner.needs_self_attention,
        keep_features=runner is not None and runner.needs_features,
        keep_images=options.deletion_insertion or (runner is not None and runner.needs_input)), prepared)
    try:  # before any output: a model that cannot run is an error about the model
        probe(predictor)
    except ModelRunError as error:
        raise EvaluationError(f"--model: {error}") from error
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    warnings: list[str] = []
    dropped_unmapped = 0
    images_run = explained_images = 0
    stream = predictor.run(items) if items else iter(())
    if options.progress:
        stream = tqdm(stream, total=len(items), desc=f"eval{f' rank {rank}' if world_size > 1 else ''}", unit="img",
                      disable=None)  # no bar (and no \r noise) when stderr is not a terminal
    for result in stream:
        image_id = result.item.image_id
        if result.error is not None:
            errors.append({"file": str(result.path), "reason": str(result.error)})
            continue
        info = images_by_id[image_id]
        images_run += 1
        if tuple(result.original_size) != (info["height"], info["width"]):
            warnings.append(
                f"{result.path}: image is {tuple(result.original_size)} (H, W) but the annotations say "
                f"({info['height']}, {info['width']}); boxes may not line up"
            )
        det = result.detections
        labels = det.labels.tolist()
        mapped = [k for k, label in enumerate(labels) if int(label) in label_to_category]
        dropped_unmapped += len(labels) - len(mapped)
        # only evaluated categories are written: detections.json is exactly what was scored
        keep = [k for k in mapped if label_to_category[int(labels[k])] in evaluated]
        boxes = det.boxes.numpy().astype(np.float64)
        scores = det.scores.numpy().astype(np.float64)
        categories = np.array([label_to_category.get(int(label), -1) for label in labels])
        for k, bbox in zip(keep, coco_xywh(boxes[keep])):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(categories[k]),
                    "bbox": bbox,
                    "score": float(scores[k]),
                }
            )
        if accumulator is None or runner is None:
            continue
        explain = [k for k in keep if scores[k] >= options.attention_threshold]
        if not explain:
            continue
        explained_images += 1
        cell_maps = runner.image_cell_maps(result.image, tuple(result.original_size), result.attention,
                                           Targets.from_detections(det, explain))
        maps = {choice: m.to_image(tuple(result.original_size)) for choice, m in cell_maps.items()}
        matched, floors = accumulator.score_image(
            image_id, tuple(result.original_size), boxes[explain], scores[explain], categories[explain], maps,
            gt_by_image.get(image_id, []), model_cell_grid(cell_maps.values()))
        scored = accumulator.scored_categories(matched, categories[explain], gt_by_image.get(image_id, []))
        if options.deletion_insertion:
            image = result.image if result.image is not None else load_image(result.path).rgb
            curved = explain[: options.di_max_detections]
            scores_fn = detection_scores_fn(predictor.engine, model, boxes[curved], [int(labels[k]) for k in curved])
            add_deletion_insertion(accumulator, image, {**maps, **floors}, scores_fn, len(curved), options,
                                   image_id, scored)
    if dropped_unmapped:
        warnings.append(f"{dropped_unmapped} detections of model classes without a dataset category were dropped")
    state = None
    if accumulator is not None:
        # per-method seconds ride along with the state (the accumulator's merge ignores them)
        state = dict(accumulator.state(), explain_seconds=dict(runner.seconds), explained_images=explained_images,
                     inference_seconds=predictor.model_seconds, images=images_run)
    return results, state, errors, warnings


def floor_settings(options: ModelRunOptions) -> FloorSettings:
    """The floors an evaluation scores (`attention.floors`), from its options."""
    return FloorSettings(floors=tuple(options.floors), gaussian_sigma=options.gaussian_sigma,
                         best_box_only=options.best_box_only)


def model_cell_grid(cell_maps: Any) -> CellGrid | None:
    """The model's cell grid of an image: the coarsest grid among its methods' `MethodMaps` (attention
    methods are on the feature grid; D-RISE's pooled pixels are finer). None without maps."""
    grids = [CellGrid(m.stride, m.input_size, tuple(int(v) for v in m.values.shape[-2:])) for m in cell_maps]
    return max(grids, key=lambda grid: grid.stride) if grids else None


def add_deletion_insertion(
    accumulator: FaithfulnessAccumulator,
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    scores_fn: Callable[[np.ndarray], np.ndarray],
    num_detections: int,
    options: ModelRunOptions,
    image_id: int = -1,
    categories: Sequence[int] = (),
) -> None:
    """Deletion and insertion AUCs of the first `num_detections` explained detections of an image.

    image: uint8 (H, W, 3) RGB; maps: choice or floor -> (N, H, W) saliency in its pixels (the
    floors `score_image` made included); scores_fn: `detection_scores_fn` of those detections;
    categories: (N,) dataset category ids (for the per-category rows). Every curve of the image runs
    in one `perturbation_curves` call (chunks of `options.di_batch_size` images, each distinct image
    once); pixel ties are broken in one random order seeded by the image id.
    """
    requests = [CurveRequest((name, j, mode), stack[j], mode, j)
                for j in range(num_detections) for name, stack in maps.items() for mode in ("deletion", "insertion")]
    curves = perturbation_curves(image, requests, scores_fn, steps=options.di_steps, substrate=options.di_substrate,
                                 batch_size=options.di_batch_size, tie_seed=max(int(image_id), 0))
    for (name, j, mode), curve in curves.items():
        accumulator.add_curve(name, mode, curve.auc, image_id, int(categories[j]) if len(categories) else -1)


@dataclass
class ModelEvaluationRun:
    """Every rank's `run_model` output merged on rank 0, ready for `write_evaluation`.

    results: COCO results sorted by (image_id, -score, category_id), one order for any number
    of ranks; attention_state: merged FaithfulnessAccumulator state (None without attention);
    errors: {"file", "reason"} per unreadable image; extra: metrics.json's settings + timing.
    """

    results: list[dict[str, Any]]
    attention_state: dict[str, Any] | None
    choices: list[str]
    errors: list[dict[str, str]]
    warnings: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def run_model_on_ranks(
    model: Any,
    gt_dataset: dict[str, Any],
    subset: Subset,
    images_dir: Path,
    label_to_category: dict[int, int],
    options: ModelRunOptions,
    context: DistContext,
) -> ModelEvaluationRun | None:
    """Run this rank's share of the subset (`run_model`), gather every share on rank 0.

    `options.device` is resolved here ("auto", and a bare "cuda" -> this rank's local GPU).
    Returns the merged run on rank 0, None on the other ranks.
    """
    device = resolve_device(options.device, context.local_rank if context.enabled else None)
    options = dataclass_replace(options, device=str(device))
    started = time.perf_counter()
    results, state, errors, warnings = run_model(
        model, gt_dataset, subset, images_dir, label_to_category, options, context.rank, context.world_size
    )
    seconds = time.perf_counter() - started
    gathered = context.gather_objects((results, state, errors, warnings, seconds))
    states = [g[1] for g in gathered if g[1] is not None]
    # the choices, in order, as the methods named them (the accumulator keeps that order)
    choices = [c for c in states[0]["pointing"] if c not in states[0].get("floors", [GAUSSIAN_BASELINE])] if states else []
    if not context.is_main:
        return None
    merged = ModelEvaluationRun([], None, choices, [], [])
    for part_results, part_state, part_errors, part_warnings, _ in gathered:
        merged.results.extend(part_results)
        merged.errors.extend(part_errors)
        merged.warnings.extend(part_warnings)
        if part_state is not None:
            if merged.attention_state is None:
                merged.attention_state = copy.deepcopy(part_state)
            else:
                accumulator = FaithfulnessAccumulator(choices)
                accumulator.merge(merged.attention_state)
                accumulator.merge(part_state)
                merged.attention_state = accumulator.state()
    # one deterministic order regardless of the number of ranks
    merged.results.sort(key=lambda r: (r["image_id"], -r["score"], r["category_id"]))
    if merged.errors:
        merged.warnings.append(f"{len(merged.errors)} images could not be processed (errors.jsonl); "
                               "they count as images without detections")
    merged.extra = {
        "settings": {
            "device": options.device, "precision": options.precision, "batch_size": options.batch_size,
            "score_threshold": options.score_threshold, "attention_threshold": options.attention_threshold,
            "layers": list(options.layers), "heads": list(options.heads), "gaussian_sigma": options.gaussian_sigma,
            "floors": list(options.floors), "class_agnostic_maps": options.class_agnostic_maps, **({"best_box_only": options.best_box_only} if options.best_box_only else {}),
            **({} if options.explain is None else _explain_settings(options)),
            "deletion_insertion": options.deletion_insertion, "world_size": context.world_size,
        },
        "timing": {"inference_s_per_rank": [round(g[4], 3) for g in gathered], **_explain_timing(states)},
    }
    return merged


def _explain_settings(options: ModelRunOptions) -> dict[str, Any]:
    settings: dict[str, Any] = {"explain": list(options.explain or ())}
    if AttnGrad.name in settings["explain"]:
        settings["attn_grad_layers"] = list(options.attn_grad_layers)
    if options.in_box_power is not None:
        settings["in_box_power"] = options.in_box_power
    if Drise.name in settings["explain"]:
        settings[Drise.name] = dict(vars(options.drise), precision=options.drise_precision or options.precision)
    return settings


def _explain_timing(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per image of the inference pass and, per method, per explained image (all ranks)."""
    images = sum(state.get("images", 0) for state in states)
    explained = sum(state.get("explained_images", 0) for state in states)
    if not images:
        return {}
    methods: dict[str, float] = {}
    for state in states:
        for name, seconds in state.get("explain_seconds", {}).items():
            methods[name] = methods.get(name, 0.0) + seconds
    inference = sum(state.get("inference_seconds", 0.0) for state in states)
    return {"inference_s_per_image": round(inference / images, 5), "explained_images": explained,
            "explain_s_per_explained_image": {name: round(seconds / max(explained, 1), 5)
                                              for name, seconds in methods.items()}}
