"""Writes an evaluation run folder: detections.json (the scored results), metrics.json,
metrics.md, the PR-curve PNGs and errors.jsonl."""
from __future__ import annotations

import json
import warnings as _warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from detection.attention.floors import BOX_FAMILY, best_box_only_choice
from detection.attention.metrics import FaithfulnessAccumulator
from detection.evaluation.bbox import BBOX_STAT_NAMES, BboxEvaluation, evaluate_bbox, mean_valid, per_category_table
from detection.evaluation.subsets import Subset
from detection.io import write_json_atomic, write_text_atomic
from detection.data.image_codec import write_image
from detection.render.plot import draw_pr_plot


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
        (f"{names[c]} (AP50 {mean_valid(precision[at50][0][:, k]):.3f})", recall_points, precision[at50][0][:, k])
        for k, c in enumerate(evaluation.category_ids)
        if (precision[at50][0][:, k] > -1).any()
    ][:max_categories]
    write_image(paths[1], draw_pr_plot(per_category, "per category, IoU 0.50"))
    return paths


def format_metric(value: Any) -> str:
    """A metric as a table cell: 3 decimals, "n/a" for COCO's -1, "–" for None."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "n/a" if value < 0 else f"{value:.3f}"
    return str(value)


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """metrics.md: the metrics dict (see `write_evaluation`) as markdown tables."""
    lines = ["# Evaluation", ""]
    source = metrics.get("source", {})
    lines.append(f"- source: `{source.get('model') or source.get('detections')}`")
    lines.append(f"- annotations: `{metrics['dataset']['annotations']}`, images evaluated: {metrics['subset']['images_selected']}")
    lines += ["", "## Boxes (pycocotools)", ""]
    lines.append("| " + " | ".join(BBOX_STAT_NAMES) + " |")
    lines.append("|" + "---|" * len(BBOX_STAT_NAMES))
    lines.append("| " + " | ".join(format_metric(metrics["bbox"][n]) for n in BBOX_STAT_NAMES) + " |")
    lines += ["", "## Per category", "", "| category | AP | AP50 | AP75 | AR100 | GT | detections |", "|---|---|---|---|---|---|---|"]
    for row in metrics["per_category"]:
        lines.append(
            f"| {row['name']} | {format_metric(row['AP'])} | {format_metric(row['AP50'])} | {format_metric(row['AP75'])} | {format_metric(row['AR100'])} | {row['num_gt']} | {row['num_detections']} |"
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
            f"{first['num_matched']} of {first['num_detections']} explained detections matched a GT object (IoU >= 0.5, "
            f"{'any class: scored under the object' + chr(39) + 's category' if metrics.get('settings', {}).get('class_agnostic_maps') else 'same class'}).",
            "",
            header,
            rule,
        ]
        for choice, row in attention.items():
            cells = [choice] + [_with_interval(row, name) for name in _TABLE_METRICS[:2]] + \
                [_with_interval(row, "mask_ap"), _with_interval(row, "mask_ap_standard")]
            if with_curves:
                cells += [_with_interval(row, name) for name in _TABLE_METRICS[4:]]
            lines.append("| " + " | ".join(cells) + " |")
        if any("ci95" in row for row in attention.values()):
            lines += ["", f"[low, high]: 95 % bootstrap interval of the mean over images "
                          f"({metrics.get('settings', {}).get('bootstrap', '?')} resamples; mask AP: the COCO evaluation of each "
                          "resample's images)."]
        if metrics.get("best_box_only"):
            lines += ["", "Best box-only map of this run, per metric (freeze one with `--best-box-only`): " +
                      ", ".join(f"{metric}: `{name}`" for metric, name in metrics["best_box_only"].items() if name)]
        lines += _difference_markdown(attention, with_curves)
        lines += _per_category_markdown(attention, metrics.get("category_names", {}), with_curves)
    if metrics.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in metrics["warnings"]]
    return "\n".join(lines) + "\n"


_TABLE_METRICS = ("pointing_game", "energy_pointing_game", "mask_ap", "mask_ap_standard", "deletion_auc",
                  "insertion_auc")
_TITLES = {"pointing_game": "pointing game", "energy_pointing_game": "energy pointing game",
           "mask_ap": "mask AP (0.2:0.95)", "mask_ap_standard": "mask AP (0.5:0.95)",
           "deletion_auc": "deletion AUC (lower better)", "insertion_auc": "insertion AUC (higher better)"}


def _with_interval(row: dict[str, Any], name: str) -> str:
    interval = row.get("ci95", {}).get(name)
    text = format_metric(row.get(name))
    return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else text


def _difference_markdown(attention: dict[str, Any], with_curves: bool) -> list[str]:
    """Per metric (mask AP 0.2:0.95, and deletion AUC with curves): each map minus each floor, the mean
    difference with its paired 95 % bootstrap interval; * where the interval excludes 0."""
    rows = {choice: row["ci95_difference"] for choice, row in attention.items() if row.get("ci95_difference")}
    if not rows:
        return []
    floors = list(next(iter(rows.values())))
    lines = ["", "## Maps against the floors", "",
             "Map minus floor, with the 95 % bootstrap interval of the difference (the same image resamples for "
             "both: paired); * where the interval excludes 0."]
    for metric in ("mask_ap", "deletion_auc") if with_curves else ("mask_ap",):
        lines += ["", f"**{_TITLES[metric]}**", "", "| map | " + " | ".join(floors) + " |", "|---|" + "---|" * len(floors)]
        for choice, differences in rows.items():
            cells = []
            for floor in floors:
                interval = differences.get(floor, {}).get(metric)
                value, base = attention[choice].get(metric), attention[floor].get(metric)
                if interval is None or value is None or base is None:
                    cells.append("n/a")
                    continue
                mark = "*" if interval[0] > 0 or interval[1] < 0 else ""
                cells.append(f"{value - base:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]{mark}")
            lines.append(f"| {choice} | " + " | ".join(cells) + " |")
    return lines


def _per_category_markdown(attention: dict[str, Any], names: dict[str, str], with_curves: bool) -> list[str]:
    """One table per metric: a row per map, a column per category (e.g. per shape)."""
    first = next(iter(attention.values()))
    if "per_category" not in first:
        return []
    categories = list(first["per_category"])
    lines = ["", "## Attention faithfulness per category"]
    for metric in _TABLE_METRICS if with_curves else _TABLE_METRICS[:4]:
        lines += ["", f"**{_TITLES[metric]}**", "",
                  "| map | " + " | ".join(names.get(str(c), str(c)) for c in categories) + " |",
                  "|---|" + "---|" * len(categories)]
        for choice, row in attention.items():
            lines.append(f"| {choice} | " + " | ".join(format_metric(row["per_category"][c].get(metric))
                                                     for c in categories) + " |")
    return lines


def write_evaluation(
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
    errors: Sequence[dict[str, str]] = (),
    per_category: bool = False,
    bootstrap: int = 0,
) -> dict[str, Any]:
    """Write detections.json, score it with pycocotools, write metrics.json / metrics.md / PR PNGs
    (and errors.jsonl when `errors`: {"file", "reason"} of images that could not be processed).

    The scored results are exactly the written file's contents (read back), so running
    pycocotools on RUN_DIR/detections.json with params.imgIds / catIds = the subset gives the
    same twelve numbers. per_category: attention metrics per category too; bootstrap: resamples of
    the 95 % intervals over images (0: none). Returns the metrics dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if errors:
        write_text_atomic(out_dir / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
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
        attention_summary = accumulator.summarize(gt_dataset, subset.image_ids, subset.category_ids,
                                                  per_category=per_category, bootstrap=bootstrap)
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
    if any(name in BOX_FAMILY for name in attention_summary):
        metrics["best_box_only"] = {metric: best_box_only_choice(attention_summary, metric) for metric in _TABLE_METRICS}
    if per_category:
        metrics["category_names"] = {str(k): v for k, v in names.items()}
    if bootstrap:
        metrics.setdefault("settings", {})["bootstrap"] = bootstrap
    write_pr_curves(evaluation, names, out_dir)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_text_atomic(out_dir / "metrics.md", metrics_markdown(metrics))
    return metrics
