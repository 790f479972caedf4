"""The run folder's record schema: a predictions.jsonl line, an errors.jsonl line, the COCO
results of detections.json, and the one JSON-lines reader."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from detection.boxes import coco_xywh
from detection.data.sources import SourceItem
from detection.structures import Detections


def detection_record(item: SourceItem, detections: Detections, category_ids: Sequence[int]) -> dict[str, Any]:
    """One predictions.jsonl line: bbox [x, y, w, h] original pixels (3 decimals), score (6)."""
    height, width = detections.image_size
    entries = []
    bboxes = coco_xywh(detections.boxes, decimals=3)
    scores = detections.scores.tolist()
    labels = detections.labels.tolist()
    queries = detections.query_index.tolist()
    hf_labels = detections.get("hf_label") if detections.has("hf_label") else None
    objectness = detections.get("objectness_logit").tolist() if detections.has("objectness_logit") else None
    for k in range(len(detections)):
        entries.append({
            "bbox": bboxes[k],
            "score": round(float(scores[k]), 6),
            "category_id": int(category_ids[int(labels[k])]),
            "label": int(labels[k]),
            "class_name": detections.class_names[k],
            "query_index": int(queries[k]),
            # prompted families: HF's own text label (Grounding DINO: the tokens above its text threshold)
            **({"hf_label": str(hf_labels[k])} if hf_labels is not None else {}),
            # OWLv2: HF's class-agnostic objectness logit of the box's patch
            **({"objectness_logit": round(float(objectness[k]), 6)} if objectness is not None else {}),
        })
    record: dict[str, Any] = {"file": item.file, "image_id": item.image_id, "key": item.key}
    if item.frame_index is not None:
        record["frame_index"] = item.frame_index
    record.update({"width": int(width), "height": int(height), "detections": entries})
    return record


def error_record(item: SourceItem, reason: str) -> dict[str, Any]:
    """One errors.jsonl line."""
    record: dict[str, Any] = {"file": item.file, "reason": reason, "key": item.key, "image_id": item.image_id}
    if item.frame_index is not None:
        record["frame_index"] = item.frame_index
    return record


def coco_results(predictions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """predictions.jsonl records -> COCO results list (+ file_name, class_name, query_index)."""
    results = []
    for record in predictions:
        for det in record["detections"]:
            entry = {
                "image_id": record["image_id"],
                "category_id": det["category_id"],
                "bbox": det["bbox"],
                "score": det["score"],
                "file_name": record["file"],
                "class_name": det["class_name"],
                "query_index": det["query_index"],
            }
            if "frame_index" in record:
                entry["frame_index"] = record["frame_index"]
            results.append(entry)
    return results


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON-lines file as a dict; ValueError names the file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows
