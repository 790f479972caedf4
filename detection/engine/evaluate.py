"""`detr-attn eval`: COCO(-subset) evaluation of a model or of any detector's results file.

Box AP is pycocotools' COCOeval on the results file this module writes (identical numbers to
running pycocotools yourself on that file with the same imgIds/catIds). With a model, the
attention maps of matched detections are scored for faithfulness (detection.attention.metrics)
per aggregation choice, against a Gaussian-in-the-box baseline.

Run folder written (RUN_DIR):
    detections.json   COCO results ({"image_id", "category_id", "bbox" xywh px, "score"}) that were scored
    metrics.json      {"bbox": 12 stats, "per_category": [...], "attention": {choice: {...}}, ...}
    metrics.md        the same as markdown tables
    pr_curve.png      precision-recall at IoU .50 / .75 / .50:.95 (mean over categories)
    pr_per_category.png   one curve per category at IoU .50
    errors.jsonl      images that could not be processed (model path only)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import time
import warnings as _warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from detection.engine.subsets import GroundTruthError, Subset, SubsetSpec, load_coco_gt, select_subset
from detection.io import read_json, write_json_atomic, write_text_atomic
from detection.render.overlay import write_image
from detection.render.plot import draw_pr_plot

BBOX_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
DEFAULT_LAYERS = ("last", "mean", "rollout")
DEFAULT_HEADS = ("mean", "max")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated; the message names the file and the problem."""


# ==========================================================================================
# results files
# ==========================================================================================
def validate_results(results: Any, source: str | Path) -> list[dict[str, Any]]:
    """Check a COCO bbox results list: each entry has int image_id / category_id, 4-number bbox
    with w, h >= 0 and a finite score. Raises EvaluationError naming `source` and the entry."""
    if not isinstance(results, list):
        raise EvaluationError(f"{source}: COCO results must be a JSON list of objects")
    for index, entry in enumerate(results):
        if not isinstance(entry, dict):
            raise EvaluationError(f"{source}: entry {index} is not an object")
        for key in ("image_id", "category_id"):
            if not isinstance(entry.get(key), int) or isinstance(entry.get(key), bool):
                raise EvaluationError(f"{source}: entry {index} needs an integer {key!r}, got {entry.get(key)!r}")
        bbox = entry.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox)
            or bbox[2] < 0
            or bbox[3] < 0
        ):
            raise EvaluationError(f"{source}: entry {index} has an invalid bbox {bbox!r} (need [x, y, w, h], w, h >= 0)")
        score = entry.get("score")
        if not isinstance(score, (int, float)) or not np.isfinite(score):
            raise EvaluationError(f"{source}: entry {index} has an invalid score {score!r}")
    return results


def load_results(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return validate_results(read_json(path, "results file", EvaluationError), path)


def image_ids_from_file_names(
    results: list[dict[str, Any]], gt_dataset: dict[str, Any], source: str | Path
) -> list[dict[str, Any]]:
    """Re-key results by their `file_name` (as `detr-attn predict` writes it) to GT image ids.

    predict numbers images by input position, not by the dataset's ids, so its results need
    this. A result's file_name matches the GT image whose file_name equals it or is its
    trailing path components ("/data/val/000001.png" matches "000001.png" and "val/000001.png").
    Unmatched or ambiguous names are errors naming `source`.
    """
    by_parts: dict[tuple[str, ...], list[int]] = {}
    for image in gt_dataset["images"]:
        parts = tuple(Path(str(image.get("file_name", ""))).parts)
        by_parts.setdefault(parts, []).append(image["id"])
    resolved: dict[str, int] = {}
    out = []
    for index, entry in enumerate(results):
        name = entry.get("file_name")
        if not isinstance(name, str):
            raise EvaluationError(f"{source}: entry {index} has no 'file_name' (needed by --match-file-names)")
        if name not in resolved:
            parts = Path(name).parts
            candidates: set[int] = set()
            for k in range(len(parts)):  # longest matching suffix wins
                ids = by_parts.get(tuple(parts[k:]), [])
                if ids:
                    candidates = set(ids)
                    break
            if len(candidates) != 1:
                problem = "matches no image" if not candidates else f"matches several images {sorted(candidates)[:5]}"
                raise EvaluationError(f"{source}: file_name {name!r} {problem} of the ground truth")
            resolved[name] = candidates.pop()
        out.append(dict(entry, image_id=resolved[name]))
    return out


def restrict_results(
    results: list[dict[str, Any]],
    gt_dataset: dict[str, Any],
    subset: Subset,
    source: str | Path,
    ann_path: str | Path,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Keep the results that the subset evaluates; refuse image ids unknown to the GT.

    pycocotools asserts that every result image is in the GT ("Results do not correspond to
    current coco set"); we name the ids instead. Results on GT images outside the subset and
    on categories outside the evaluated ones are dropped (COCOeval would ignore them too, so
    the numbers do not change), and category ids the GT does not know are reported, because
    pycocotools ignores those silently and a wrong id mapping would look like a bad model.
    Returns (kept results, counts, warnings).
    """
    gt_images = {img["id"] for img in gt_dataset["images"]}
    unknown_images = sorted({r["image_id"] for r in results} - gt_images)
    if unknown_images:
        hint = ""
        if results and "file_name" in results[0]:
            hint = " (results from `detr-attn predict` number images by input order: add --match-file-names)"
        raise EvaluationError(
            f"{source}: {len(unknown_images)} image ids are not in {ann_path} "
            f"(e.g. {unknown_images[:10]}); results must refer to images of the ground truth{hint}"
        )
    gt_categories = {c["id"] for c in gt_dataset["categories"]}
    images, categories = set(subset.image_ids), set(subset.category_ids)
    unknown_categories: dict[int, int] = {}
    kept, outside_subset = [], 0
    for entry in results:
        if entry["category_id"] not in gt_categories:
            unknown_categories[entry["category_id"]] = unknown_categories.get(entry["category_id"], 0) + 1
        elif entry["image_id"] in images and entry["category_id"] in categories:
            kept.append(entry)
        else:
            outside_subset += 1
    warnings = []
    if unknown_categories:
        warnings.append(
            f"{source}: {sum(unknown_categories.values())} detections have category ids the ground truth "
            f"does not define ({sorted(unknown_categories)[:10]}); they cannot match anything and were dropped "
            "(pycocotools would silently ignore them). Check the class -> category id mapping."
        )
    counts = {
        "results_in_file": len(results),
        "results_scored": len(kept),
        "results_outside_subset": outside_subset,
        "results_unknown_category": {str(k): v for k, v in sorted(unknown_categories.items())},
    }
    return kept, counts, warnings


# ==========================================================================================
# bbox evaluation
# ==========================================================================================
def _quiet(fn: Callable[[], Any]) -> tuple[Any, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        value = fn()
    return value, buffer.getvalue()


def coco_from_dataset(dataset: dict[str, Any]):
    """A pycocotools COCO object over an in-memory dict, without its chatter."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    _quiet(coco.createIndex)
    return coco


@dataclass
class BboxEvaluation:
    """pycocotools bbox evaluation of one results list over one subset.

    stats: the twelve COCO numbers by name; precision: COCOeval's (T, R, K, A, M) array
    (IoU thresholds x 101 recall points x categories x areas x max-dets), -1 where undefined;
    category_ids: K ids in the order of the K axis (sorted); summary: pycocotools' printout.
    """

    stats: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    category_ids: list[int]
    summary: str
    empty: bool = False


def evaluate_bbox(
    gt_dataset: dict[str, Any], results: list[dict[str, Any]], image_ids: Sequence[int], category_ids: Sequence[int]
) -> BboxEvaluation:
    """COCOeval(bbox) with params.imgIds / params.catIds set (sorted, as pycocotools' defaults),
    so subset images without detections still count as misses.

    Empty results are evaluated against an empty detection set (COCO's own answer: 0 for every
    category with GT, -1 where no GT exists) because `loadRes([])` crashes.
    """
    from pycocotools.cocoeval import COCOeval

    gt = coco_from_dataset(gt_dataset)
    if results:
        dt, _ = _quiet(lambda: gt.loadRes(copy.deepcopy(list(results))))
    else:
        dt = coco_from_dataset({"images": list(gt_dataset["images"]), "categories": list(gt_dataset["categories"]), "annotations": []})
    evaluator = COCOeval(gt, dt, iouType="bbox")
    evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.params.catIds = sorted(int(c) for c in category_ids)
    _, log = _quiet(lambda: (evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()))
    summary = "\n".join(line for line in log.splitlines() if line.lstrip().startswith("Average"))
    return BboxEvaluation(
        stats={name: float(value) for name, value in zip(BBOX_STAT_NAMES, evaluator.stats)},
        precision=evaluator.eval["precision"],
        recall=evaluator.eval["recall"],
        iou_thresholds=np.asarray(evaluator.params.iouThrs),
        recall_thresholds=np.asarray(evaluator.params.recThrs),
        category_ids=[int(c) for c in evaluator.params.catIds],
        summary=summary,
        empty=not results,
    )


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def per_category_table(
    evaluation: BboxEvaluation, gt_dataset: dict[str, Any], results: list[dict[str, Any]], image_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """AP (0.5:0.95), AP50, AP75, AR100 per category (area all, 100 dets) + GT / detection counts.
    -1 where the category has no GT in the subset (COCO's convention)."""
    names = {c["id"]: c["name"] for c in gt_dataset["categories"]}
    images = set(int(i) for i in image_ids)
    num_gt: dict[int, int] = {}
    for ann in gt_dataset["annotations"]:
        if ann["image_id"] in images and not ann.get("iscrowd", 0):
            num_gt[ann["category_id"]] = num_gt.get(ann["category_id"], 0) + 1
    num_det: dict[int, int] = {}
    for entry in results:
        num_det[entry["category_id"]] = num_det.get(entry["category_id"], 0) + 1
    thresholds = evaluation.iou_thresholds
    table = []
    for k, category_id in enumerate(evaluation.category_ids):
        precision = evaluation.precision[:, :, k, 0, -1]
        table.append(
            {
                "category_id": category_id,
                "name": names[category_id],
                "AP": _mean_valid(precision),
                "AP50": _mean_valid(precision[np.isclose(thresholds, 0.5)]),
                "AP75": _mean_valid(precision[np.isclose(thresholds, 0.75)]),
                "AR100": _mean_valid(evaluation.recall[:, k, 0, -1]),
                "num_gt": num_gt.get(category_id, 0),
                "num_detections": num_det.get(category_id, 0),
            }
        )
    return table


# ==========================================================================================
# class mapping (model label index -> dataset category id)
# ==========================================================================================
class ClassMappingError(EvaluationError):
    pass


def normalise_name(name: str) -> str:
    """'Traffic_Light ' -> 'traffic light': names compare case-, space-, '_'- and '-'-insensitively."""
    return " ".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())


def load_class_map(path: str | Path) -> dict[str, Any]:
    """JSON object {model class name: dataset category name | category id | null (ignore)}."""
    path = Path(path)
    data = read_json(path, "class-map file", ClassMappingError)
    if not isinstance(data, dict):
        raise ClassMappingError(f"{path}: expected a JSON object {{model class name: dataset category name or id}}")
    return data


def map_classes(
    class_names: Sequence[str],
    dataset_categories: Sequence[dict[str, Any]],
    evaluated_category_ids: Sequence[int],
    class_map: dict[str, Any] | None = None,
    class_map_source: str | Path = "--class-map",
    allow_unmapped: bool = False,
) -> tuple[dict[int, int], list[str]]:
    """Map model label index -> dataset category id, by name or through an explicit map.

    Without `class_map`, names match after `normalise_name`. With it, every key must be a model
    class and every value a dataset category name / id (or null to ignore that class); classes
    not in the map fall back to matching by name. Model classes that map nowhere are dropped
    (reported). An EVALUATED dataset category that no model class maps to would score AP 0
    for a reason unrelated to the model, so it is an error unless `allow_unmapped`.
    Returns (mapping, warnings).
    """
    by_name = {normalise_name(c["name"]): c["id"] for c in dataset_categories}
    known_ids = {c["id"] for c in dataset_categories}
    model_by_name = {normalise_name(n): i for i, n in enumerate(class_names)}
    mapping: dict[int, int] = {}
    explicit: set[int] = set()
    if class_map:
        for model_name, target in class_map.items():
            label = model_by_name.get(normalise_name(model_name))
            if label is None:
                raise ClassMappingError(f"{class_map_source}: {model_name!r} is not a model class; model classes: {list(class_names)}")
            explicit.add(label)
            if target is None:
                continue
            if isinstance(target, int) and not isinstance(target, bool):
                if target not in known_ids:
                    raise ClassMappingError(f"{class_map_source}: category id {target} (for {model_name!r}) is not in the dataset")
                mapping[label] = target
            elif isinstance(target, str) and normalise_name(target) in by_name:
                mapping[label] = by_name[normalise_name(target)]
            else:
                available = [c["name"] for c in dataset_categories]
                raise ClassMappingError(
                    f"{class_map_source}: {target!r} (for {model_name!r}) is not a dataset category; available: {available}"
                )
    for label, name in enumerate(class_names):
        if label not in explicit and normalise_name(name) in by_name:
            mapping[label] = by_name[normalise_name(name)]
    warnings = []
    unmapped_model = [class_names[i] for i in range(len(class_names)) if i not in mapping and i not in explicit]
    if unmapped_model and len(unmapped_model) < len(class_names):
        warnings.append(
            f"{len(unmapped_model)} model classes have no dataset category; their detections are dropped: {unmapped_model[:10]}"
        )
    covered = set(mapping.values())
    names = {c["id"]: c["name"] for c in dataset_categories}
    missing = [names[c] for c in evaluated_category_ids if c not in covered]
    if missing:
        message = (
            f"dataset categories {missing[:10]} have no model class (model classes: {list(class_names)[:20]}). "
            "Pass --class-map FILE (JSON {\"model class\": \"dataset category\"}), restrict the evaluation "
            "with --categories, or add --allow-unmapped to score them as missed."
        )
        if not allow_unmapped or len(missing) == len(evaluated_category_ids):
            raise ClassMappingError(message)
        warnings.append(message)
    return mapping, warnings


# ==========================================================================================
# PR curves (drawn by detection.render.plot)
# ==========================================================================================
def write_pr_curves(evaluation: BboxEvaluation, names: dict[int, str], out_dir: Path, max_categories: int = 10) -> list[Path]:
    """pr_curve.png (IoU .50, .75, mean over .50:.95; mean over categories with GT) and
    pr_per_category.png (IoU .50, the first `max_categories` categories with GT, in id order)."""
    recall_points = evaluation.recall_thresholds
    precision = evaluation.precision[:, :, :, 0, -1]  # (T, R, K)

    def category_mean(rows: np.ndarray) -> np.ndarray:  # (R, K) -> (R,)
        masked = np.where(rows > -1, rows, np.nan)
        with _warnings.catch_warnings():  # all-NaN rows (no category with GT) are expected
            _warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(masked, axis=-1)
        return np.nan_to_num(mean, nan=-1.0)

    at50 = np.isclose(evaluation.iou_thresholds, 0.5)
    at75 = np.isclose(evaluation.iou_thresholds, 0.75)
    stats = evaluation.stats
    overall = [
        (f"IoU 0.50 (AP50 {stats['AP50']:.3f})", recall_points, category_mean(precision[at50][0])),
        (f"IoU 0.75 (AP75 {stats['AP75']:.3f})", recall_points, category_mean(precision[at75][0])),
        (f"IoU 0.50:0.95 mean (AP {stats['AP']:.3f})", recall_points,
         category_mean(np.where(precision > -1, precision, np.nan).mean(axis=0))),
    ]
    paths = [out_dir / "pr_curve.png", out_dir / "pr_per_category.png"]
    write_image(paths[0], draw_pr_plot(overall, "precision-recall (all categories)"))
    per_category = [
        (f"{names[c]} (AP50 {_mean_valid(precision[at50][0][:, k]):.3f})", recall_points, precision[at50][0][:, k])
        for k, c in enumerate(evaluation.category_ids)
        if (precision[at50][0][:, k] > -1).any()
    ][:max_categories]
    write_image(paths[1], draw_pr_plot(per_category, "per category, IoU 0.50"))
    return paths


# ==========================================================================================
# markdown
# ==========================================================================================
def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "n/a" if value < 0 else f"{value:.3f}"
    return str(value)


def metrics_markdown(metrics: dict[str, Any]) -> str:
    lines = ["# Evaluation", ""]
    source = metrics.get("source", {})
    lines.append(f"- source: `{source.get('model') or source.get('detections')}`")
    lines.append(f"- annotations: `{metrics['dataset']['annotations']}`, images evaluated: {metrics['subset']['images_selected']}")
    lines += ["", "## Boxes (pycocotools)", ""]
    lines.append("| " + " | ".join(BBOX_STAT_NAMES) + " |")
    lines.append("|" + "---|" * len(BBOX_STAT_NAMES))
    lines.append("| " + " | ".join(_fmt(metrics["bbox"][n]) for n in BBOX_STAT_NAMES) + " |")
    lines += ["", "## Per category", "", "| category | AP | AP50 | AP75 | AR100 | GT | detections |", "|---|---|---|---|---|---|---|"]
    for row in metrics["per_category"]:
        lines.append(
            f"| {row['name']} | {_fmt(row['AP'])} | {_fmt(row['AP50'])} | {_fmt(row['AP75'])} | {_fmt(row['AR100'])} | {row['num_gt']} | {row['num_detections']} |"
        )
    attention = metrics.get("attention") or {}
    if attention:
        with_curves = any(row.get("deletion_auc") is not None for row in attention.values())
        header = "| map (layers/heads) | pointing game | energy pointing game | mask AP (0.2:0.95) | mask AP (0.5:0.95) |"
        rule = "|---|---|---|---|---|"
        if with_curves:
            header += " deletion AUC (lower better) | insertion AUC (higher better) |"
            rule += "---|---|"
        first = next(iter(attention.values()))
        lines += [
            "",
            "## Attention faithfulness",
            "",
            f"{first['num_matched']} of {first['num_detections']} explained detections matched a GT object (IoU >= 0.5, same class).",
            "",
            header,
            rule,
        ]
        for choice, row in attention.items():
            cells = [choice, _fmt(row["pointing_game"]), _fmt(row["energy_pointing_game"]), _fmt(row["mask_ap"]), _fmt(row["mask_ap_standard"])]
            if with_curves:
                cells += [_fmt(row.get("deletion_auc")), _fmt(row.get("insertion_auc"))]
            lines.append("| " + " | ".join(cells) + " |")
    if metrics.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in metrics["warnings"]]
    return "\n".join(lines) + "\n"


# ==========================================================================================
# model path: inference over the subset (+ attention metrics)
# ==========================================================================================
@dataclass
class ModelRunOptions:
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 2
    num_workers: int = 0
    score_threshold: float = 0.0
    attention: bool = True
    attention_threshold: float = 0.5
    layers: Sequence[str] = DEFAULT_LAYERS
    heads: Sequence[str] = DEFAULT_HEADS
    gaussian_sigma: float = 0.25
    deletion_insertion: bool = False
    di_steps: int = 16
    di_substrate: str = "mean"
    di_max_detections: int = 3
    progress: bool = True


def choice_name(layers: str, heads: str) -> str:
    """'rollout/mean': the key of one aggregation choice in metrics.json's `attention`."""
    return f"{layers}/{heads}"


def detection_score_fn(engine: Any, config: Any, box_xyxy: Sequence[float], label: int) -> Callable[[np.ndarray], np.ndarray]:
    """Score of one detection on perturbed copies of its image (for deletion / insertion).

    engine: the Predictor's model callable `(images, padding_mask) -> outputs` (same device,
    precision and folding as the detections came from); config: the model's DetrConfig.
    Returns uint8 (K, H, W, 3) -> (K,): max over queries of p(label) x IoU(query box,
    detection box), D-RISE-style, so the detection is followed even if another query takes
    it over. On the unperturbed image this is >= the detection's own score.
    """
    import torch
    from torchvision.ops import box_iou

    from detection.boxes import cxcywh_to_xyxy
    from detection.data.preprocess import image_to_input, pad_batch

    target = torch.tensor([list(box_xyxy)], dtype=torch.float32)

    def score(batch: np.ndarray) -> np.ndarray:
        height, width = batch.shape[1:3]
        images, mask = pad_batch([image_to_input(np.ascontiguousarray(im), config.min_size, config.max_size) for im in batch])
        with torch.no_grad():
            outputs = engine(images, mask)
        probs = outputs["pred_logits"].float().softmax(-1)[..., label].cpu()  # (K, Q)
        boxes = cxcywh_to_xyxy(outputs["pred_boxes"].float().cpu()) * torch.tensor([width, height, width, height])
        ious = torch.stack([box_iou(b, target)[:, 0] for b in boxes])  # (K, Q)
        return (probs * ious).max(dim=1).values.numpy()

    return score


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
    from tqdm import tqdm

    from detection.attention.maps import detection_maps
    from detection.attention.metrics import FaithfulnessAccumulator, perturbation_curve
    from detection.data.images import load_image
    from detection.engine.predict import Predictor
    from detection.engine.sources import SourceItem

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
    choices = [(layers, heads) for layers in options.layers for heads in options.heads]
    accumulator = (
        FaithfulnessAccumulator([choice_name(*c) for c in choices], gaussian_sigma_fraction=options.gaussian_sigma)
        if options.attention
        else None
    )
    predictor = Predictor(
        model,
        device=options.device,
        precision=options.precision,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        score_threshold=options.score_threshold,
        attention=options.attention,
        rollout=options.attention and "rollout" in options.layers,
        keep_images=options.deletion_insertion,
    )
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    warnings: list[str] = []
    dropped_unmapped = 0
    stream = predictor.run(items) if items else iter(())
    if options.progress:
        stream = tqdm(stream, total=len(items), desc=f"eval{f' rank {rank}' if world_size > 1 else ''}", unit="img")
    for result in stream:
        image_id = result.item.image_id
        if result.error is not None:
            errors.append({"file": str(result.path), "reason": str(result.error)})
            continue
        info = images_by_id[image_id]
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
        for k in keep:
            x0, y0, x1, y1 = boxes[k]
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(categories[k]),
                    "bbox": [round(float(x0), 3), round(float(y0), 3), round(float(x1 - x0), 3), round(float(y1 - y0), 3)],
                    "score": float(scores[k]),
                }
            )
        if accumulator is None or result.attention is None:
            continue
        explain = [k for k in keep if scores[k] >= options.attention_threshold]
        if not explain:
            continue
        query_index = det.query_index[explain]
        maps = {
            choice_name(layers, heads): detection_maps(
                result.attention, 0, query_index, result.original_size, heads=heads, layers=layers, normalize=None
            )
            for layers, heads in choices
        }
        accumulator.add_image(
            image_id, tuple(result.original_size), boxes[explain], scores[explain], categories[explain], maps, gt_by_image.get(image_id, [])
        )
        if options.deletion_insertion:
            from detection.attention.metrics import GAUSSIAN_BASELINE, gaussian_box_map

            image = result.image if result.image is not None else load_image(result.path).rgb
            for j, k in enumerate(explain[: options.di_max_detections]):
                score_fn = detection_score_fn(predictor.engine, model.config, boxes[k], int(labels[k]))
                candidates = {name: m[j] for name, m in maps.items()}
                candidates[GAUSSIAN_BASELINE] = gaussian_box_map(boxes[k], tuple(result.original_size), options.gaussian_sigma)
                for name, saliency in candidates.items():
                    for mode in ("deletion", "insertion"):
                        curve = perturbation_curve(
                            image, saliency, score_fn, mode, steps=options.di_steps, substrate=options.di_substrate,
                            batch_size=options.batch_size * 4,
                        )
                        accumulator.add_curve(name, mode, curve.auc)
    if dropped_unmapped:
        warnings.append(f"{dropped_unmapped} detections of model classes without a dataset category were dropped")
    return results, (accumulator.state() if accumulator is not None else None), errors, warnings


# ==========================================================================================
# distributed (torchrun) helpers
# ==========================================================================================
def distributed_context() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


# ==========================================================================================
# evaluation driver
# ==========================================================================================
def evaluate(
    gt_dataset: dict[str, Any],
    subset: Subset,
    results: list[dict[str, Any]],
    out_dir: str | Path,
    ann_path: str | Path,
    source: dict[str, Any],
    attention_state: dict[str, Any] | None = None,
    attention_choices: Sequence[str] = (),
    warnings: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write detections.json, score it with pycocotools, write metrics.json / metrics.md / PR PNGs.

    The scored results are exactly the written file's contents (read back), so running
    pycocotools on RUN_DIR/detections.json with params.imgIds / catIds = the subset gives the
    same twelve numbers. Returns the metrics dict.
    """
    from detection.attention.metrics import FaithfulnessAccumulator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings = list(warnings)
    results_path = out_dir / "detections.json"
    write_json_atomic(results_path, results, indent=None)
    with open(results_path, encoding="utf-8") as handle:
        written = json.load(handle)
    if not written:
        warnings.append(
            "no detections in the evaluated subset: every category with ground truth scores 0 "
            "(-1 where COCO has nothing to measure); pycocotools' loadRes cannot take an empty list, so the "
            "empty case is evaluated against an empty detection set"
        )
    evaluation = evaluate_bbox(gt_dataset, written, subset.image_ids, subset.category_ids)
    subset_images = set(subset.image_ids)
    annotated = {a["image_id"] for a in gt_dataset["annotations"] if a["category_id"] in set(subset.category_ids)}
    without = len(subset_images - annotated)
    if without:
        warnings.append(
            f"{without} evaluated images have no ground-truth objects of the evaluated categories; "
            "their detections count as false positives"
        )
    names = {c["id"]: c["name"] for c in gt_dataset["categories"]}
    attention_summary: dict[str, Any] = {}
    if attention_state is not None:
        accumulator = FaithfulnessAccumulator(list(attention_choices))
        accumulator.merge(attention_state)
        attention_summary = accumulator.summarize(gt_dataset, subset.image_ids, subset.category_ids)
    metrics = {
        "bbox": evaluation.stats,
        "per_category": per_category_table(evaluation, gt_dataset, written, subset.image_ids),
        "attention": attention_summary,
        "subset": dict(subset.description, images_without_annotations=without),
        "dataset": {"annotations": str(ann_path), "images": len(gt_dataset["images"]), "categories": len(gt_dataset["categories"])},
        "source": source,
        "results_file": str(results_path),
        "warnings": warnings,
        "pycocotools_summary": evaluation.summary,
    }
    if extra:
        metrics.update(extra)
    write_pr_curves(evaluation, names, out_dir)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_text_atomic(out_dir / "metrics.md", metrics_markdown(metrics))
    return metrics


# ==========================================================================================
# CLI
# ==========================================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model name (e.g. demo, detr-r50) or native model folder")
    source.add_argument("--detections", help="score an existing COCO results JSON (any detector) instead of running a model")
    parser.add_argument("--match-file-names", action="store_true",
                        help="with --detections: take image ids from each result's file_name (e.g. detr-attn predict output)")
    parser.add_argument("--ann", required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument("--images", help="image folder (file_name in the annotations is relative to it); needed with --model")
    parser.add_argument("--out", required=True, help="run folder for detections.json, metrics.json, metrics.md, PR curves")
    subset = parser.add_argument_group("subset")
    pick = subset.add_mutually_exclusive_group()
    pick.add_argument("--first", type=int, help="the first N images (annotation-file order)")
    pick.add_argument("--random", type=int, help="N random images (see --seed)")
    subset.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    subset.add_argument("--image-ids", help="file with image ids (JSON list or whitespace/comma separated)")
    subset.add_argument("--categories", nargs="+", help="evaluate only these category names (quote names with spaces)")
    subset.add_argument("--min-objects", type=int, default=0, help="only images with at least K objects of the evaluated categories")
    mapping = parser.add_argument_group("class mapping (--model)")
    mapping.add_argument("--class-map", help='JSON {"model class": "dataset category name" | id | null}')
    mapping.add_argument("--allow-unmapped", action="store_true", help="score dataset categories without a model class as missed instead of failing")
    model = parser.add_argument_group("inference (--model)")
    model.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1")
    model.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                       help="auto = bf16 where the hardware runs it natively (CUDA, CPU with AMX/AVX512-BF16)")
    model.add_argument("--batch-size", type=int, default=2)
    model.add_argument("--num-workers", type=int, default=0)
    model.add_argument("--score-threshold", type=float, default=0.0, help="keep detections above this score for AP (default 0: all queries, as DETR's COCO eval)")
    attention = parser.add_argument_group("attention faithfulness (--model)")
    attention.add_argument("--no-attention", action="store_true", help="skip the attention metrics")
    attention.add_argument("--attention-threshold", type=float, default=0.5, help="explain detections with score >= this (default 0.5)")
    attention.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="comma list of layer choices: last, mean, rollout, or an index")
    attention.add_argument("--heads", default=",".join(DEFAULT_HEADS), help="comma list of head choices: mean, max, or an index")
    attention.add_argument("--gaussian-sigma", type=float, default=0.25, help="baseline Gaussian sigma as a fraction of box width/height")
    attention.add_argument("--deletion-insertion", action="store_true", help="also compute deletion/insertion AUCs (slow: steps+1 forward passes per map)")
    attention.add_argument("--di-steps", type=int, default=16)
    attention.add_argument("--di-substrate", choices=("mean", "blur"), default="mean")
    attention.add_argument("--di-max-detections", type=int, default=3, help="per image")
    parser.add_argument("--no-progress", action="store_true")


def _parse_choice_list(text: str) -> list[Any]:
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    rank, world_size, local_rank = distributed_context()
    log = (lambda *a: print(*a, file=sys.stderr)) if rank == 0 else (lambda *a: None)
    started = time.perf_counter()
    try:
        gt_dataset = load_coco_gt(args.ann)
        spec = SubsetSpec(
            first=args.first, random=args.random, seed=args.seed, image_ids_file=args.image_ids,
            category_names=args.categories, min_objects=args.min_objects,
        )
        subset = select_subset(gt_dataset, spec, args.ann)
        warnings: list[str] = []
        attention_state, choices, extra = None, [], {}
        if args.detections:
            raw = load_results(args.detections)
            if args.match_file_names:
                raw = image_ids_from_file_names(raw, gt_dataset, args.detections)
            results, counts, warnings = restrict_results(raw, gt_dataset, subset, args.detections, args.ann)
            source = {"detections": str(args.detections), **counts}
        else:
            if not args.images:
                raise EvaluationError("--images DIR is required with --model")
            results, attention_state, choices, warnings, extra = _run_model_cli(args, gt_dataset, subset, rank, world_size, local_rank)
            if rank != 0:
                return 0
            source = {"model": str(args.model)}
    except (GroundTruthError, EvaluationError) as error:
        print(f"detr-attn eval: error: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        log(f"warning: {warning}")
    extra.setdefault("timing", {})["total_s"] = round(time.perf_counter() - started, 3)
    metrics = evaluate(gt_dataset, subset, results, args.out, args.ann, source, attention_state, choices, warnings, extra)
    log(metrics["pycocotools_summary"])
    if metrics["attention"]:
        log("attention (pointing game / energy / mask AP 0.2:0.95):")
        for choice, row in metrics["attention"].items():
            log(f"  {choice:<18} {_fmt(row['pointing_game'])}  {_fmt(row['energy_pointing_game'])}  {_fmt(row['mask_ap'])}")
    log(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'metrics.md'}")
    return 0


def _run_model_cli(args, gt_dataset, subset, rank, world_size, local_rank):
    """Load the model, run this rank's share, gather everything on rank 0."""
    import torch

    from detection.engine.distributed import init_from_env
    from detection.models.registry import load_model

    context = init_from_env()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if context.enabled and device.startswith("cuda"):
        device = f"cuda:{context.local_rank}"
    # the Predictor's engine moves (a copy of) the model to `device`; the CPU copy stays here
    model = load_model(args.model, device="cpu")
    class_map = load_class_map(args.class_map) if args.class_map else None
    label_to_category, warnings = map_classes(
        model.config.class_names, gt_dataset["categories"], subset.category_ids, class_map,
        args.class_map or "--class-map", args.allow_unmapped,
    )
    options = ModelRunOptions(
        device=device, precision=args.precision, batch_size=args.batch_size, num_workers=args.num_workers,
        score_threshold=args.score_threshold, attention=not args.no_attention,
        attention_threshold=args.attention_threshold, layers=_parse_choice_list(args.layers),
        heads=_parse_choice_list(args.heads), gaussian_sigma=args.gaussian_sigma,
        deletion_insertion=args.deletion_insertion, di_steps=args.di_steps, di_substrate=args.di_substrate,
        di_max_detections=args.di_max_detections, progress=not args.no_progress and rank == 0,
    )
    started = time.perf_counter()
    results, state, errors, run_warnings = run_model(
        model, gt_dataset, subset, Path(args.images), label_to_category, options, rank, world_size
    )
    seconds = time.perf_counter() - started
    gathered = _gather((results, state, errors, run_warnings, seconds), world_size)
    choices = [choice_name(layers, heads) for layers in options.layers for heads in options.heads]
    if rank != 0:
        context.barrier()
        context.close()
        return [], None, choices, [], {}
    merged_results: list[dict[str, Any]] = []
    merged_state: dict[str, Any] | None = None
    merged_errors: list[dict[str, str]] = []
    for part_results, part_state, part_errors, part_warnings, _ in gathered:
        merged_results.extend(part_results)
        merged_errors.extend(part_errors)
        warnings.extend(part_warnings)
        if part_state is not None:
            if merged_state is None:
                merged_state = copy.deepcopy(part_state)
            else:
                from detection.attention.metrics import FaithfulnessAccumulator

                accumulator = FaithfulnessAccumulator(choices)
                accumulator.merge(merged_state)
                accumulator.merge(part_state)
                merged_state = accumulator.state()
    # one deterministic order regardless of the number of ranks
    merged_results.sort(key=lambda r: (r["image_id"], -r["score"], r["category_id"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if merged_errors:
        write_text_atomic(out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in merged_errors))
        warnings.append(f"{len(merged_errors)} images could not be processed (errors.jsonl); they count as images without detections")
    context.barrier()
    context.close()
    extra = {
        "settings": {
            "device": device, "precision": args.precision, "batch_size": args.batch_size,
            "score_threshold": args.score_threshold, "attention_threshold": args.attention_threshold,
            "layers": list(options.layers), "heads": list(options.heads), "gaussian_sigma": args.gaussian_sigma,
            "deletion_insertion": args.deletion_insertion, "world_size": world_size,
        },
        "timing": {"inference_s_per_rank": [round(g[4], 3) for g in gathered]},
    }
    return merged_results, merged_state, choices, warnings, extra
