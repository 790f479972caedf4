"""COCO explanation-mask results from a predict run folder (`detr-attn export --format coco-masks`).

Each detection's saved saliency map (OUT/attention/<key>.npz, written by `predict --save-attention`)
becomes its Otsu explanation mask (`attention.metrics.explanation_mask`, the mask eval scores),
stored as compressed RLE `segmentation` (`attention.metrics.encode_mask`) in a COCO results entry
that keeps the run's `bbox`, `score`, `category_id`, `file_name`, `class_name`, `query_index`.
The file is what pycocotools `COCO.loadRes` reads for `iouType="segm"`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from detection.attention.methods import DEFAULT_METHOD
from detection.runfolder.maps_npz import load_maps_npz
from detection.attention.metrics import encode_mask, explanation_mask
from detection.runfolder.layout import ATTENTION_DIR
from detection.runfolder.reader import RunReader
from detection.evaluation.results import image_ids_from_file_names
from detection.io import read_json, write_json_atomic

logger = logging.getLogger(__name__)


class MissingAttentionError(ValueError):
    """The run folder has detections but no saved attention maps for them."""


def _check_maps(path: Path, maps_shape: tuple[int, ...], meta: dict[str, Any], record: dict[str, Any]) -> None:
    """The npz must hold one map per detection of the record, in the same order and image size."""
    detections = record["detections"]
    if maps_shape[0] != len(detections):
        raise ValueError(f"{path}: {maps_shape[0]} maps for {len(detections)} detections of {record['file']}")
    queries = meta.get("query_index")
    if queries and [int(q) for q in queries] != [int(d.get("query_index", -1)) for d in detections]:
        raise ValueError(f"{path}: query indices {queries} differ from the run's detections of {record['file']}")
    size = [record.get("height"), record.get("width")]
    if None not in size and list(maps_shape[1:]) != size:
        raise ValueError(f"{path}: map size {list(maps_shape[1:])} differs from the image size {size} of {record['file']}")


def record_maps(reader: RunReader, record: dict[str, Any], method: str = DEFAULT_METHOD) -> np.ndarray:
    """The saved saliency maps (N, H, W) float32 of one predictions.jsonl record, checked against
    it (one per detection, same order and image size). method: "raw" (attention/<key>.npz,
    `--save-attention`) or an `--explain` method (attention/<method>/<key>.npz).
    MissingAttentionError, naming the folder and the predict option, when the npz is absent."""
    key = reader.image_key(record)
    if method == DEFAULT_METHOD:
        path = reader.attention(key) if key is not None else None
        expected, option = f"{ATTENTION_DIR}/{key or '<key>'}.npz", "--save-attention"
    else:
        path = reader.method_attention(key, method) if key is not None else None
        expected, option = f"{ATTENTION_DIR}/{method}/{key or '<key>'}.npz", f"--explain {method}"
    if path is None:
        raise MissingAttentionError(
            f"{reader.root}: no saved {method} maps for {record['file']} ({expected} missing); rerun "
            f"`detr-attn predict` with {option}")
    maps, meta = load_maps_npz(path, size="original")
    _check_maps(path, maps.shape, meta, record)
    return maps


def coco_mask_results(run_dir: str | os.PathLike, method: str = DEFAULT_METHOD) -> list[dict[str, Any]]:
    """COCO segm results (one per detection, predictions.jsonl order) of a predict run folder,
    from the maps of `method` ("raw" or a method saved by `predict --explain`).

    Raises FileNotFoundError / ValueError (RunReader) for a missing or unreadable folder, and
    MissingAttentionError, naming the folder and `--save-attention`, when a record with
    detections has no attention npz.
    """
    reader = RunReader(run_dir)
    results: list[dict[str, Any]] = []
    for record in reader.predictions():
        if not record["detections"]:
            continue
        maps = record_maps(reader, record, method)
        for det, saliency in zip(record["detections"], maps):
            entry = {
                "image_id": record.get("image_id"),
                "category_id": det["category_id"],
                "bbox": det["bbox"],
                "score": det["score"],
                "segmentation": encode_mask(explanation_mask(saliency)),
                "file_name": record["file"],
                "class_name": det.get("class_name"),
                "query_index": det.get("query_index"),
            }
            if "frame_index" in record:
                entry["frame_index"] = record["frame_index"]
            results.append(entry)
    return results


def export_coco_masks(
    run_dir: str | os.PathLike, out_file: str | os.PathLike, ann_file: str | os.PathLike | None = None,
    method: str = DEFAULT_METHOD,
) -> list[dict[str, Any]]:
    """Write `coco_mask_results(run_dir)` to `out_file` atomically and return them.

    With `ann_file` (COCO ground truth), image ids are the GT's, matched by file name
    (`evaluation.results.image_ids_from_file_names`; an unmatched name is an EvaluationError);
    without it, the run's own image ids.
    """
    results = coco_mask_results(run_dir, method)
    if ann_file is not None:
        gt = read_json(ann_file, "annotation file")
        if not isinstance(gt, dict) or not isinstance(gt.get("images"), list):
            raise ValueError(f"{ann_file}: not a COCO ground truth (needs an 'images' list)")
        results = image_ids_from_file_names(results, gt, Path(run_dir))
    write_json_atomic(out_file, results, indent=None)
    logger.info("wrote %d explanation masks to %s", len(results), out_file)
    return results


def scored_mask_results(attention_state: dict[str, Any], choices: list[str]) -> list[dict[str, Any]]:
    """The explanation masks an evaluation scored, as one COCO results list: each entry is the
    one its choice's mask AP was computed from ({"image_id", "category_id", "segmentation",
    "score"}) plus "choice" (e.g. "last/mean", "gaussian-baseline"); choices in `choices` order."""
    masks = attention_state["masks"]
    return [dict(entry, choice=choice) for choice in choices if choice in masks for entry in masks[choice]]
