"""The one write path of a predicted image: every file of the image (maps npz, grids, overlays) and
its predictions.jsonl record, from the image's result and its maps, with no engine state (the
single-host run calls it on writer threads; another engine can call it from its workers)."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from detection.attention.methods import DEFAULT_METHOD, MethodMaps
from detection.attention.token_scores import TokenScores
from detection.engine.display import viewer_image_jpeg
from detection.render.cell_overlays import DEFAULT_OVERLAY_SIZE, encode_overlay, render_overlays
from detection.engine.predictor import PredictionResult
from detection.io import write_bytes_atomic
from detection.runfolder.run_folder import RunFolder
from detection.runfolder.grids import DEFAULT_GRID_BUDGET, build_grids, save_grids_npz
from detection.runfolder.layout import attention_name, method_attention_name, overlay_name, tokens_name
from detection.runfolder.maps_npz import map_metadata, save_maps_npz
from detection.runfolder.tokens_npz import save_tokens_npz
from detection.runfolder.records import detection_record


@dataclass
class OutputOptions:
    """What a predict run writes beside predictions.jsonl.

    overlays: overlays/<key>.<method>.<image_format> (combined) and overlays/<key>/det_<k>.<method>.<image_format>
        (`runfolder.layout`: the file names say which method drew them).
    save_attention: attention/<key>.npz (per-detection cell maps, see runfolder.maps_npz) and
        attention/grids/<key>.npz (what the viewer needs: per-detection grids within `grid_budget` bytes,
        see runfolder.grids).
    save_encoder_attention: attention/grids/<key>.npz also keeps the last encoder layer's head-mean
        self-attention (needs a model run with encoder attention).
    heads / layers / normalize: how the maps are made (see attention.maps.detection_maps).
    overlay_style: "heatmap" (the maps) or "points" (deformable families: overlays/<key>/det_<k>.<method>-points
        shows the detection's sampling points as dots, see render.points; the combined overlay
        stays the heatmap).
    overlay_size: long side of the overlays in pixels (only ever scaled down; None = original size;
        see render.cell_overlays).
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


def write_image_files(folder: RunFolder, result: PredictionResult, maps: dict[str, MethodMaps],
                      options: OutputOptions, category_ids: Sequence[int],
                      explain: Sequence[str] | None = None, tokens: TokenScores | None = None) -> dict[str, Any]:
    """Write every file of one image (each atomically), then return its journal record.

    maps: method name -> the image's maps (`engine.explain.MethodRunner.method_maps`); the default
    method's are the run's attention maps (--heads / --layers). explain: the --explain methods with
    files of their own (None: no --explain, and the record lists no "methods"); a method without
    maps (the image has no detection) writes nothing. tokens: a prompted detector's token scores
    of the image, written with --save-attention to attention/tokens/<key>.npz (record "tokens").

    In order: the record; with --save-attention the attention maps' npz (attention/<key>.npz) and
    the viewer's grids; with --overlays the combined and per-detection overlays of the attention
    maps; then each other method's npz (attention/<method>/<key>.npz) and, with --overlays, its
    per-detection heat maps (overlays/<key>/det_<k>.<method>). Raises ValueError when maps are
    requested but the result holds no attention (or no image for overlays).
    """
    item, detections = result.item, result.detections
    record = detection_record(item, detections, category_ids)
    attention_maps = maps.get(DEFAULT_METHOD)
    if options.needs_maps:
        if result.attention is None or attention_maps is None:
            raise ValueError("attention maps requested but the model returned no attention")
        meta = map_metadata(result.attention, 0, heads=options.heads, layers=options.layers,
                            normalize=options.normalize)
        if options.save_attention:
            save_maps_npz(folder.attention_path(item.key), attention_maps.values, detections, attention_maps.stride,
                          attention_maps.input_size, {**meta, **_image_meta(item)})
            record["attention"] = attention_name(item.key)
            _write_grids(folder, result, options)
            if tokens is not None:
                save_tokens_npz(folder.tokens_path(item.key), tokens, _image_meta(item))
                record["tokens"] = tokens_name(item.key)
        if options.overlays:
            overlays = render_overlays(overlay_source(result), detections, attention_maps.values, meta, options,
                                       result.attention)
            for k, image in overlays:
                path = (folder.overlay_path(item.key, DEFAULT_METHOD, options.image_format) if k is None  # the combined
                        else folder.detection_overlay_path(item.key, k, DEFAULT_METHOD, options.image_format,
                                                           options.overlay_style))
                write_bytes_atomic(path, encode_overlay(image, options.image_format))
            record["overlay"] = overlay_name(item.key, DEFAULT_METHOD, options.image_format)
    if explain is not None:
        record["methods"] = {method: _write_method(folder, result, method, maps[method], options)
                             for method in explain if method in maps}
    return record


def _image_meta(item: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"file": item.file, "key": item.key}
    if item.frame_index is not None:
        meta["frame_index"] = item.frame_index
    return meta


def _write_method(folder: RunFolder, result: PredictionResult, method: str, maps: MethodMaps,
                  options: OutputOptions) -> str:
    """One --explain method's npz (its cells, un-normalised float32, with their geometry; D-RISE's
    are its saliency pooled to a long side of at most `DriseOptions.max_side`) and, with
    --overlays, its per-detection heat maps (whatever --overlay-style says: the point view is the
    attention maps'). Returns the npz's name in the folder."""
    item, detections = result.item, result.detections
    meta = {**_image_meta(item), "method": method, "normalize": options.normalize}
    save_maps_npz(folder.method_attention_path(item.key, method), maps.values, detections, maps.stride,
                  maps.input_size, meta)
    if options.overlays:
        heatmaps = dataclasses.replace(options, overlay_style="heatmap")
        geometry = {"feature_stride": maps.stride, "input_size": maps.input_size}
        overlays = render_overlays(overlay_source(result), detections, maps.values, geometry, heatmaps)
        for k, image in itertools.islice(overlays, len(detections)):  # the combined overlay is not drawn
            write_bytes_atomic(folder.detection_overlay_path(item.key, k, method, options.image_format),
                               encode_overlay(image, options.image_format))
    return method_attention_name(item.key, method)


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
