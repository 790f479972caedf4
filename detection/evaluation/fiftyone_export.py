"""FiftyOne datasets from explanations: `detr-attn export --format fiftyone` and `Explanation.to_fiftyone`.

Written in FiftyOne's serialized-sample JSON (what `Sample.to_dict()` gives: `_cls` documents,
arrays as `{"$binary": zlib-compressed np.save bytes}`), laid out as a dataset folder that
`fo.Dataset.from_dir(DIR, dataset_type=fo.types.FiftyOneDataset)` imports (no "version" in
metadata.json, so FiftyOne reads it with its LegacyFiftyOneDatasetImporter):

    DIR/metadata.json   {"media_type": "image", "info": {...}}
    DIR/samples.json    {"samples": [{"filepath", "tags", "metadata", "detections", "saliency",
                          "saliency_det_0", ...}]}
    DIR/fields/saliency*/<key>.png   8-bit heatmaps; "map_path" relative to DIR (FiftyOne
                          resolves media fields under fields/)

What each form keeps, per detection k of an image (W x H pixels):
  * detections.detections[k]: label, confidence, bounding_box [x, y, w, h] relative to the image
    (the detection's box clipped to the image and widened to whole pixels, so that its `mask`
    lines up with image pixels exactly), `mask` = the Otsu explanation mask
    (attention.metrics.explanation_mask, the mask eval scores) cropped to that box: mass outside
    the box is dropped here; attributes query_index, category_id, bbox_pixels (the exact box,
    [x, y, w, h] pixels as in predictions.jsonl);
  * saliency_det_<k>: a Heatmap of the whole map at the image's size, 8-bit (range [0, 255]),
    mass outside the box kept;
  * saliency: one Heatmap per image, the per-pixel maximum over its detections' maps.
"""
from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from detection.attention.methods import DEFAULT_METHOD
from detection.attention.metrics import explanation_mask
from detection.runfolder.reader import RunReader
from detection.evaluation.mask_export import record_maps
from detection.io import write_bytes_atomic, write_json_atomic

logger = logging.getLogger(__name__)

FIELDS_DIR = "fields"
COMBINED_FIELD = "saliency"


def detection_field(index: int) -> str:
    return f"saliency_det_{index}"


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """FiftyOne's serialized array: {"$binary": {"base64": zlib(np.save bytes), "subType": "00"}}."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return {"$binary": {"base64": base64.b64encode(zlib.compress(buffer.getvalue())).decode("ascii"),
                        "subType": "00"}}


def decode_array(value: dict[str, Any]) -> np.ndarray:
    """The inverse of encode_array (never unpickles)."""
    raw = zlib.decompress(base64.b64decode(value["$binary"]["base64"]))
    return np.load(io.BytesIO(raw), allow_pickle=False)


def _object_id(*parts: Any) -> dict[str, str]:
    """A deterministic 24-hex ObjectId (the same export writes the same ids)."""
    return {"$oid": hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:24]}


def pixel_box(bbox_xywh: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """[x, y, w, h] pixels -> (x0, y0, x1, y1) whole pixels, clipped, covering the box (>= 1 px)."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    x0 = min(max(int(math.floor(x)), 0), width - 1)
    y0 = min(max(int(math.floor(y)), 0), height - 1)
    x1 = max(min(int(math.ceil(x + w)), width), x0 + 1)
    y1 = max(min(int(math.ceil(y + h)), height), y0 + 1)
    return x0, y0, x1, y1


def detection_document(det: dict[str, Any], saliency: np.ndarray, id_parts: tuple) -> dict[str, Any]:
    """One fo.Detection as a dict: det is a predictions.jsonl detection, saliency its (H, W) map."""
    height, width = saliency.shape
    x0, y0, x1, y1 = pixel_box(det["bbox"], width, height)
    mask = explanation_mask(saliency)[y0:y1, x0:x1]
    return {
        "_id": _object_id(*id_parts), "_cls": "Detection", "attributes": {}, "tags": [],
        "label": det.get("class_name") or str(det.get("label")),
        "bounding_box": [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height],
        "mask": encode_array(mask), "confidence": float(det["score"]),
        "query_index": int(det.get("query_index", -1)), "bbox_pixels": [float(v) for v in det["bbox"]],
        **({"category_id": int(det["category_id"])} if det.get("category_id") is not None else {}),
    }


def heatmap_png(saliency: np.ndarray) -> bytes:
    """(H, W) map in [0, 1] -> 8-bit grayscale PNG bytes (value * 255, rounded)."""
    scaled = np.round(np.clip(saliency, 0.0, 1.0) * 255.0).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", scaled)
    if not ok:
        raise ValueError("could not encode a heatmap PNG")
    return encoded.tobytes()


def heatmap_document(id_parts: tuple, *, map_path: str | None = None, array: np.ndarray | None = None) -> dict[str, Any]:
    """An fo.Heatmap as a dict: an 8-bit PNG on disk (range [0, 255]) or an in-memory float map ([0, 1])."""
    document = {"_id": _object_id(*id_parts), "_cls": "Heatmap", "tags": []}
    if map_path is not None:
        document.update(map_path=map_path, range=[0.0, 255.0])
    else:
        document.update(map=encode_array(np.asarray(array, dtype=np.float32)), range=[0.0, 1.0])
    return document


def image_fields(detections: Sequence[dict[str, Any]], maps: np.ndarray, key: str,
                 out_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """The FiftyOne fields of one image: {"detections": Detections, "saliency": Heatmap,
    "saliency_det_<k>": Heatmap}, as dicts. detections: predictions.jsonl-style dicts (bbox
    [x, y, w, h] pixels, score, class_name, category_id?, query_index); maps (N, H, W) in [0, 1].
    out_dir: heatmaps written there as 8-bit PNGs (map_path relative to it); None: in-memory maps."""

    def heatmap(field: str, saliency: np.ndarray, id_parts: tuple) -> dict[str, Any]:
        if out_dir is None:
            return heatmap_document(id_parts, array=saliency)
        relative = f"{FIELDS_DIR}/{field}/{key}.png"
        write_bytes_atomic(out_dir / relative, heatmap_png(saliency))
        return heatmap_document(id_parts, map_path=relative)

    fields: dict[str, dict[str, Any]] = {"detections": {"_cls": "Detections", "detections": [
        detection_document(det, saliency, (key, "det", k)) for k, (det, saliency) in enumerate(zip(detections, maps))]}}
    for k, saliency in enumerate(maps):
        fields[detection_field(k)] = heatmap(detection_field(k), saliency, (key, "heat", k))
    if len(maps):
        fields[COMBINED_FIELD] = heatmap(COMBINED_FIELD, maps.max(axis=0), (key, "heat"))
    return fields


def _image_path(file: str) -> str:
    path = Path(file)
    return str(path if path.is_absolute() else (Path.cwd() / path).resolve())


def export_fiftyone(run_dir: str | os.PathLike, out_dir: str | os.PathLike, method: str = DEFAULT_METHOD) -> int:
    """Write a run folder's detections and saved maps (of `method`: "raw" or a method saved by
    `predict --explain`) as a FiftyOne dataset folder; returns the number of samples. Needs the
    maps saved (MissingAttentionError otherwise, as the coco-masks export)."""
    reader = RunReader(run_dir)
    out = Path(out_dir)
    samples = []
    for record in reader.predictions():
        key = reader.image_key(record) or Path(record["file"]).stem
        sample: dict[str, Any] = {"filepath": _image_path(record["file"]), "tags": [], "metadata": None}
        if record.get("width") and record.get("height"):
            sample["metadata"] = {"_cls": "ImageMetadata", "width": int(record["width"]), "height": int(record["height"])}
        maps = record_maps(reader, record, method) if record["detections"] else np.zeros((0, 1, 1), np.float32)
        sample.update(image_fields(record["detections"], maps, key, out))
        samples.append(sample)
    write_json_atomic(out / "samples.json", {"samples": samples}, indent=None)
    write_json_atomic(out / "metadata.json", {"media_type": "image", "info": {"source_run": str(reader.root)}})
    logger.info("wrote a FiftyOne dataset of %d samples to %s", len(samples), out)
    return len(samples)
