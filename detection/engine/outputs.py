"""The per-image output format of a predict run: the predictions.jsonl record, and the npz
maps and overlay images of one image (`OutputOptions` says which are written).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from detection.runfolder.maps_npz import map_metadata, save_maps_npz
from detection.attention.maps import query_cell_maps
from detection.engine.display import viewer_image_jpeg
from detection.runfolder.grids import DEFAULT_GRID_BUDGET, build_grids, save_grids_npz
from detection.engine.predictor import PredictionResult
from detection.runfolder.folder import RunFolder
from detection.runfolder.layout import attention_name, overlay_name
from detection.runfolder.records import detection_record
from detection.engine.overlays import DEFAULT_OVERLAY_SIZE, encode_overlay, render_overlays
from detection.io import write_bytes_atomic


@dataclass
class OutputOptions:
    """What a predict run writes beside predictions.jsonl.

    overlays: overlays/<key>.<image_format> and overlays/<key>/det_<k>.<image_format>.
    save_attention: attention/<key>.npz (per-detection cell maps, see runfolder.maps_npz.save_maps_npz) and
        attention/grids/<key>.npz (what the viewer needs: per-detection grids within `grid_budget` bytes,
        see runfolder.grids).
    save_encoder_attention: attention/grids/<key>.npz also keeps the last encoder layer's head-mean
        self-attention (needs a model run with encoder attention).
    heads / layers / normalize: how the maps are made (see attention.maps.detection_maps).
    overlay_style: "heatmap" (the maps) or "points" (deformable families: overlays/<key>/det_<k>
        shows the detection's sampling points as dots, see render.points; the combined overlay
        stays the heatmap).
    overlay_size: long side of the overlays in pixels (only ever scaled down; None = original size;
        see engine.overlays).
    """

    overlays: bool = False
    save_attention: bool = False
    image_format: str = "png"
    heads: Any = "mean"
    layers: Any = "last"
    normalize: str | None = "minmax"
    save_encoder_attention: bool = False
    grid_budget: int | None = DEFAULT_GRID_BUDGET
    overlay_style: str = "heatmap"
    overlay_size: int | None = DEFAULT_OVERLAY_SIZE

    @property
    def needs_maps(self) -> bool:
        return self.overlays or self.save_attention


def write_image_outputs(folder: RunFolder, result: PredictionResult, options: OutputOptions,
                        category_ids: Sequence[int]) -> dict[str, Any]:
    """Write npz / overlays of one image (each atomic), then return its journal record.

    Raises ValueError when maps are requested but the result holds no attention (or no
    image for overlays).
    """
    item, detections = result.item, result.detections
    record = detection_record(item, detections, category_ids)
    if not options.needs_maps:
        return record
    if result.attention is None:
        raise ValueError("attention maps requested but the model returned no attention")
    cells = query_cell_maps(result.attention, 0, detections.query_index, heads=options.heads, layers=options.layers)
    meta = map_metadata(result.attention, 0, heads=options.heads, layers=options.layers, normalize=options.normalize)
    if options.save_attention:
        meta.update({"file": item.file, "key": item.key})
        if item.frame_index is not None:
            meta["frame_index"] = item.frame_index
        save_maps_npz(folder.attention_path(item.key), cells, detections, meta["feature_stride"],
                      meta["input_size"], meta)
        record["attention"] = attention_name(item.key)
        _write_grids(folder, result, options)
    if options.overlays:
        suffix = options.image_format
        for k, image in render_overlays(overlay_source(result), detections, cells, meta, options, result.attention):
            path = (folder.overlay_path(item.key, suffix) if k is None  # k None: the combined overlay
                    else folder.detection_overlay_path(item.key, k, suffix))
            write_bytes_atomic(path, encode_overlay(image, suffix))
        record["overlay"] = overlay_name(item.key, suffix)
    return record


def overlay_source(result: PredictionResult) -> np.ndarray:
    """The image overlays are drawn on: the overlay base the decoding worker made
    (`engine.display`), else the original image; ValueError when the result holds neither."""
    if result.display is not None and result.display.overlay is not None:
        return result.display.overlay
    if result.image is None:
        raise ValueError("overlays requested but the decoded image was not kept")
    return result.image


def viewer_jpeg(result: PredictionResult) -> bytes | None:
    """The viewer's JPEG of the image: the decoding worker's, else made from the original image."""
    if result.display is not None and result.display.viewer_jpeg is not None:
        return result.display.viewer_jpeg
    return None if result.image is None else viewer_image_jpeg(result.image)


def _write_grids(folder: RunFolder, result: PredictionResult, options: OutputOptions) -> None:
    detections = result.detections
    if options.save_encoder_attention and result.attention.encoder_self is None \
            and result.attention.kind == "dense":
        raise ValueError("encoder attention requested but the model returned none")
    grids = build_grids(result.attention, 0, detections.query_index.tolist(), detections.scores.tolist(),
                        detections.image_size, budget_bytes=options.grid_budget,
                        encoder_attention=options.save_encoder_attention,
                        image_jpeg=viewer_jpeg(result))
    save_grids_npz(folder.grids_path(result.item.key), grids)
