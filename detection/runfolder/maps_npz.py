"""The maps npz of a run folder (format `versions.MAPS_NPZ_FORMAT`): per-detection cell maps,
un-normalised float32, with their geometry and detections; written atomically, read without pickle."""
from __future__ import annotations

import json
import os
from typing import Any, Literal, Sequence, Tuple, Union

import numpy as np
import torch

from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.aggregate import HeadChoice, LayerChoice, NormalizeChoice
from detection.attention.maps import (DEFAULT_PERCENTILES, Interpolation, cells_to_image, check_size, image_geometry, maps_from_cells)
from detection.io import atomic_path
from detection.models.outputs import AttentionRecord
from detection.runfolder.versions import MAPS_NPZ_FORMAT, MAPS_NPZ_FORMAT_V1
from detection.structures import Detections

#: (H, W) pixels, "original" (the image's size) or None (the stored grid) -- `load_maps_npz`.
MapSize = Union[Tuple[int, int], Literal["original"], None]


def map_metadata(
    attention: AttentionRecord,
    image_index: int,
    heads: HeadChoice = "mean",
    layers: LayerChoice = "last",
    normalize: NormalizeChoice = "minmax",
    interpolation: Interpolation = "bilinear",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """JSON-ready description of how `detection_maps` makes maps from `query_cell_maps` (for
    `save_maps_npz`): geometry (feature_stride, input_size, valid_feature_size,
    padded_feature_size) and the aggregation / normalisation choices."""
    valid_h, valid_w, input_h, input_w = image_geometry(attention, image_index)
    meta: dict[str, Any] = {
        "feature_stride": int(attention.feature_stride),
        "input_size": [input_h, input_w],
        "valid_feature_size": [valid_h, valid_w],
        "heads": heads if isinstance(heads, str) else int(heads),
        "layers": layers if isinstance(layers, str) else int(layers),
        "normalize": normalize,
        "interpolation": interpolation,
        "percentiles": [float(v) for v in percentiles],
        # the batch's padded feature grid: cells beyond valid_feature_size were padding (cropped)
        "padded_feature_size": [int(v) for v in attention.feature_size],
    }
    if attention.kind == "sampled":
        meta["attention_kind"] = "sampled"
        meta["level_strides"] = list(attention.decoder_cross_sampled.level_strides)
    if layers == ROLLOUT_LAYERS:
        meta["rollout"] = "chefer2021-raw" + (
            "+decoder_self" if attention.decoder_self is not None else ""
        ) + ("+encoder_self" if attention.encoder_self is not None else "")
    return meta


# -- npz export -------------------------------------------------------------------------------
_RESERVED = ("format", "image_size", "num_maps", "boxes", "scores", "labels", "query_index", "class_names",
             "feature_stride", "input_size", "valid_feature_size")


def _field_list(detections: Detections, name: str) -> list:
    if not detections.has(name):
        return []
    value = detections.get(name)
    return value.tolist() if hasattr(value, "tolist") else [str(v) for v in value]


def _detection_fields(detections: Detections) -> dict[str, Any]:
    fields = ("boxes", "scores", "labels", "query_index", "class_names")
    return {"image_size": list(detections.image_size), **{name: _field_list(detections, name) for name in fields}}


def save_maps_npz(
    path: str | os.PathLike,
    cell_maps: torch.Tensor | np.ndarray,
    detections: Detections,
    feature_stride: int,
    input_size: Sequence[int],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write per-detection cell maps, un-normalised float32, in a compressed npz (atomically).

    cell_maps: (N, hv, wv) maps over the VALID feature cells (`query_cell_maps`, or any grid
    whose cell (y, x) covers input pixels [y·s, (y+1)·s) x [x·s, (x+1)·s)); feature_stride s;
    input_size (h_in, w_in) the pre-padding model input, covered by the cells. The original size
    is `detections.image_size`. `load_maps_npz` turns them into maps at any size through
    `maps_from_cells`, with the "normalize", "interpolation" and "percentiles" of `meta`
    (defaults "minmax", "bilinear", (1, 99)).

    Stored keys (format MAPS_NPZ_FORMAT): "cells" float32 (N, hv, wv); "meta_json" uint8 UTF-8 JSON
    with "format", "image_size" [H, W], "num_maps", "feature_stride", "input_size" [h_in, w_in],
    "valid_feature_size" [hv, wv], per-detection "boxes" (xyxy original pixels), "scores",
    "labels", "query_index", "class_names", plus every key of `meta` (e.g. `map_metadata`).
    """
    cells = cell_maps.detach().float().cpu().numpy() if isinstance(cell_maps, torch.Tensor) else cell_maps
    cells = np.asarray(cells, dtype=np.float32)
    if cells.ndim != 3:
        raise ValueError(f"{path}: cell maps must be (N, hv, wv), got shape {cells.shape}")
    if len(cells) != len(detections):
        raise ValueError(f"{path}: {len(cells)} maps for {len(detections)} detections")
    if cells.size and not np.isfinite(cells).all():
        raise ValueError(f"{path}: cell maps must be finite")
    stride = int(feature_stride)
    input_h, input_w = check_size(input_size, "input_size")
    valid_h, valid_w = cells.shape[1:]
    if stride <= 0 or valid_h * stride < input_h or valid_w * stride < input_w:
        raise ValueError(f"{path}: cells ({valid_h}, {valid_w}) x stride {stride} do not cover the input size "
                         f"{(input_h, input_w)}")
    geometry = {"feature_stride": stride, "input_size": [input_h, input_w], "valid_feature_size": [valid_h, valid_w]}
    document: dict[str, Any] = {"format": MAPS_NPZ_FORMAT, "num_maps": int(len(cells)), **_detection_fields(detections),
                                **geometry}
    for key, value in (meta or {}).items():
        if key in _RESERVED and value != document.get(key):
            raise ValueError(f"{path}: meta key {key!r} is reserved and disagrees with the detections / cells "
                             f"({value!r} != {document.get(key)!r})")
        document[key] = value
    payload = np.frombuffer(json.dumps(document, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, cells=cells, meta_json=payload)


def _target_size(size: MapSize, image_size: Sequence[int], path: str | os.PathLike) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, str):
        if size != "original":
            raise ValueError(f"{path}: size must be None, 'original' or (height, width), got {size!r}")
        return int(image_size[0]), int(image_size[1])
    return check_size(size, "size")


def load_maps_npz(path: str | os.PathLike, size: MapSize = "original") -> tuple[np.ndarray, dict[str, Any]]:
    """Read a `save_maps_npz` file -> (maps float32, metadata dict). Never unpickles.

    size "original": (N, H, W) normalised maps at the image's size, equal (to float32 precision)
    to the `detection_maps` the run made them from; (h, w): the same maps resampled straight from
    the cells to (h, w) (`maps_from_cells`); None: the stored (N, hv, wv) un-normalised cell maps.
    A format-1 file (full-resolution float16 maps) gives its stored maps for None or "original";
    for another (h, w) they are resampled through `cells_to_image` as stride-1 cells (already
    normalised, so not normalised again).
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:  # numpy says ValueError for "not npz/npy"
        raise ValueError(f"{path}: cannot read maps npz: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a maps npz (a single .npy array)")
    with archive:
        array_name = "cells" if "cells" in archive.files else "maps"
        if array_name not in archive.files or "meta_json" not in archive.files:
            raise ValueError(f"{path}: not a maps npz (needs 'cells' and 'meta_json', has {sorted(archive.files)})")
        try:
            stored = archive[array_name].astype(np.float32)
            meta = json.loads(archive["meta_json"].tobytes().decode("utf-8"))
        except (OSError, EOFError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError too
            raise ValueError(f"{path}: cannot read maps npz: {error}") from error
    format_name = meta.get("format") if isinstance(meta, dict) else meta
    expected = {MAPS_NPZ_FORMAT: "cells", MAPS_NPZ_FORMAT_V1: "maps"}.get(format_name) if isinstance(format_name, str) else None
    if expected is None or expected != array_name:
        raise ValueError(f"{path}: unknown maps format {format_name!r} (this version reads {MAPS_NPZ_FORMAT} "
                         f"and {MAPS_NPZ_FORMAT_V1})")
    if stored.ndim != 3 or len(stored) != meta.get("num_maps"):
        raise ValueError(f"{path}: maps shape {stored.shape} disagrees with num_maps {meta.get('num_maps')}")
    target = _target_size(size, meta.get("image_size", stored.shape[1:]), path)
    if format_name == MAPS_NPZ_FORMAT_V1:
        if target is None or target == tuple(stored.shape[1:]):
            return stored, meta
        return cells_to_image(stored, 1, stored.shape[1:], target), meta
    if list(stored.shape[1:]) != list(meta.get("valid_feature_size", [])):
        raise ValueError(f"{path}: cells {stored.shape[1:]} disagree with valid_feature_size "
                         f"{meta.get('valid_feature_size')}")
    if target is None:
        return stored, meta
    try:
        maps = maps_from_cells(stored, int(meta["feature_stride"]), meta["input_size"], target,
                               meta.get("normalize", "minmax"), meta.get("interpolation", "bilinear"),
                               meta.get("percentiles", DEFAULT_PERCENTILES))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad map geometry: {error}") from error
    return maps, meta
