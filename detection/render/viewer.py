"""The interactive viewer: one offline HTML file (no server, no CDN) built from a run folder's
`attention/grids/<key>.npz` files; maps ship at grid resolution and are upsampled in the browser.
"""
from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detection.attention.token_scores import TokenScores
from detection.runfolder.maps_npz import load_maps_npz
from detection.runfolder.grids import AttentionGrids, MethodGrids, load_grids_npz
from detection.runfolder.reader import RunReader
from detection.io import write_text_atomic
from detection.render.colors import DEFAULT_COLORMAP, apply_colormap, class_color
from detection.render.report_contents import read_token_scores
from detection.render.token_view import token_row_html
from detection.data.image_codec import decode_image
from detection.render.viewer_page import viewer_html

logger = logging.getLogger(__name__)

VIEWER_FILE = "viewer.html"
#: Small images are drawn at the largest integer zoom that keeps the longer side within this many pixels.
CANVAS_SIDE = 480


class NoSavedAttention(ValueError):
    """The run folder has no `attention/grids/*.npz`: it was predicted without --save-attention."""


@dataclass
class ViewerSummary:
    path: Path
    images: int
    skipped: int
    bytes_total: int
    bytes_per_image: list[int]


def _float16_base64(array: np.ndarray) -> str:
    data = np.ascontiguousarray(np.asarray(array, dtype=np.float32).astype("<f2")).tobytes()
    return base64.b64encode(data).decode("ascii")


def colormap_table(colormap: int = DEFAULT_COLORMAP) -> list[list[int]]:
    """The 256 RGB colours of `colormap` (the overlays' colours, level = round(saliency * 255))."""
    levels = np.arange(256, dtype=np.float32)[None, :] / 255.0
    return apply_colormap(levels, colormap)[0].astype(int).tolist()


def token_entry(scores: TokenScores) -> dict[str, Any]:
    """A prompted run's token view of one image: the scores as saved (float32 values; detection k =
    row k) and each detection's prompt as the report's shaded HTML row (`token_view.token_row_html`)."""
    return {
        "method": scores.token_method, "phrase_method": scores.phrase_method, "phrases": list(scores.phrases),
        "tokens": list(scores.tokens), "token_phrase": scores.token_phrase.tolist(),
        "scores": scores.scores.tolist(), "phrase_scores": scores.phrase_scores.tolist(),
        "rows": [token_row_html(scores, k) for k in range(len(scores))],
    }


def image_entry(row: dict[str, Any], key: str, grids: AttentionGrids,
                token_scores: TokenScores | None = None) -> dict[str, Any]:
    """One image of the viewer: detections in original pixels, grids as base64 float16. Maps are
    drawn on a canvas of size "canvas" (the stored image's size "display" times an integer zoom)
    exactly as `cells_to_image(cells, stride, input, canvas)` gives them. "tokens": a prompted
    run's `token_entry`, absent for a closed-set run (the viewer then shows no token view)."""
    if grids.image_jpeg is None:
        raise ValueError(f"attention/grids/{key}.npz holds no image")
    display = decode_image(grids.image_jpeg, f"attention/grids/{key}.npz image").shape[:2]
    zoom = max(1, CANVAS_SIDE // max(display))
    detections = []
    for det in row["detections"]:
        x, y, w, h = (float(v) for v in det["bbox"])
        detections.append({
            "box": [x, y, x + w, y + h], "label": int(det.get("label", 0)), "class_name": str(det.get("class_name", "")),
            "score": float(det.get("score", 0.0)), "query_index": int(det.get("query_index", -1)),
            "color": list(class_color(int(det.get("label", 0)))),
        })
    methods = {
        name: {"slices": [list(s) for s in method.slices], "detections": list(method.detections),
               "grids": _float16_base64(method.grids)}
        for name, method in grids.methods.items()
    }
    entry = {
        "file": str(row["file"]), "key": key, "size": list(grids.image_size), "display": list(display),
        "canvas": [display[0] * zoom, display[1] * zoom],
        "image": "data:image/jpeg;base64," + base64.b64encode(grids.image_jpeg).decode("ascii"),
        "stride": grids.feature_stride, "input": list(grids.input_size), "valid": list(grids.valid_size),
        "kind": grids.kind, "layers": grids.layers, "heads": grids.heads, "rollout": grids.rollout,
        "detail": grids.detail, "detections": detections, "methods": methods,
        "encoder": None if grids.encoder_self is None else _float16_base64(grids.encoder_self),
    }
    if token_scores is not None:
        entry["tokens"] = token_entry(token_scores)
    return entry


def with_saved_methods(reader: RunReader, row: dict[str, Any], key: str, grids: AttentionGrids) -> AttentionGrids:
    """`grids` plus each `predict --explain` method saved on the same cells (same stride and
    valid grid: rollout, attn-grad, relevance) as a method without layer / head axes. D-RISE's
    pooled grid has another geometry: it stays in the report's method table, not the viewer."""
    for method in (row.get("methods") or {}):
        path = reader.method_attention(key, method)
        if path is None or method in grids.methods:
            continue
        cells, meta = load_maps_npz(path, size=None)
        if int(meta.get("feature_stride", 0)) != grids.feature_stride or tuple(cells.shape[1:]) != grids.valid_size:
            logger.info("%s: %s maps are on another grid (stride %s): not in the viewer", path, method,
                        meta.get("feature_stride"))
            continue
        grids.methods[method] = MethodGrids(cells[:, None].astype(np.float32), [("all", "all")],
                                            list(range(len(cells))))
    return grids


def viewer_payload(run_dir: str | os.PathLike, title: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The viewer's JSON data for every image of the run that has grids, and the files skipped.

    Raises NoSavedAttention when no image has grids, FileNotFoundError / ValueError for a
    missing or unreadable run folder (naming the file).
    """
    reader = RunReader(run_dir)
    info = reader.info() or {}
    images, skipped = [], []
    for row in reader.predictions():
        key = reader.image_key(row)
        path = None if key is None else reader.grids(key)
        if path is None:
            skipped.append(str(row["file"]))
            continue
        images.append(image_entry(row, key, with_saved_methods(reader, row, key, load_grids_npz(path)),
                                  read_token_scores(row, reader)))
    if not images:
        raise NoSavedAttention(
            f"{reader.root}: no saved attention grids (attention/grids/*.npz) for any of its images; run "
            f"`detr-attn predict ... --save-attention` (add --save-encoder-attention for encoder maps) first")
    payload = {
        "title": title or f"Attention viewer: {reader.root.name}", "model": str(info.get("model", "")),
        "colormap": colormap_table(), "images": images, "skipped": skipped,
    }
    return payload, skipped


def write_viewer(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 title: str | None = None) -> ViewerSummary:
    """Write OUT/viewer.html (default RUN_DIR/report/) and return its path and sizes."""
    payload, skipped = viewer_payload(run_dir, title)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    per_image = [len(json.dumps(entry, separators=(",", ":"))) for entry in payload["images"]]
    document = viewer_html(payload)
    path = out / VIEWER_FILE
    write_text_atomic(path, document)
    if skipped:
        logger.warning("%d image(s) without saved grids are not in the viewer", len(skipped))
    return ViewerSummary(path=path, images=len(payload["images"]), skipped=len(skipped),
                         bytes_total=len(document.encode("utf-8")), bytes_per_image=per_image)
