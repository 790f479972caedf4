"""Per-detection maps stored on their own grid with its geometry (an `attention.methods.MethodMaps`),
for maps that are image-resolution by nature: D-RISE's saliency is pooled to a long side of at
most 256 cells (issue #13) and kept so, not at the image's resolution as `save_maps_npz` keeps maps.
"""
from __future__ import annotations

import json
import os
from typing import Any, Literal

import numpy as np

from detection.attention.aggregate import normalize_maps
from detection.attention.maps import _RESERVED, _detection_fields, cells_to_image
from detection.attention.methods.base import MethodMaps
from detection.io import atomic_path
from detection.structures import Detections

GRID_NPZ_FORMAT = "detr-attn-grid-maps/1"
_GEOMETRY = ("stride", "input_size", "grid_size")


def save_grid_maps_npz(path: str | os.PathLike, maps: MethodMaps, detections: Detections,
                       meta: dict[str, Any] | None = None) -> None:
    """Write the (N, h, w) grid of `maps` un-normalised as float32 in a compressed npz, atomically.

    Stored keys: "grid" float32 (N, h, w); "meta_json" uint8 UTF-8 JSON with "format", "num_maps",
    the detections' "image_size" [H, W] and per-detection "boxes" (xyxy original pixels), "scores",
    "labels", "query_index", "class_names" (as `save_maps_npz`), the geometry "stride",
    "input_size" [h_in, w_in] and "grid_size" [h, w] (`MethodMaps.geometry`: cell (y, x) covers
    input pixels [y·stride, (y+1)·stride) x [x·stride, (x+1)·stride)), plus every key of `meta`
    (e.g. "normalize", applied by `load_grid_maps_npz` after resizing).
    """
    values = maps.values.numpy()
    if values.ndim != 3:
        raise ValueError(f"{path}: grid maps must be (N, h, w), got shape {values.shape}")
    if len(values) != len(detections):
        raise ValueError(f"{path}: {len(values)} maps for {len(detections)} detections")
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"{path}: grid maps must be finite")
    document: dict[str, Any] = {"format": GRID_NPZ_FORMAT, "num_maps": int(len(values)),
                                **_detection_fields(detections), **maps.geometry()}
    for key, value in (meta or {}).items():
        if (key in _RESERVED or key in _GEOMETRY) and value != document.get(key):
            raise ValueError(f"{path}: meta key {key!r} is reserved and disagrees with the maps")
        document[key] = value
    payload = np.frombuffer(json.dumps(document, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, grid=values.astype(np.float32), meta_json=payload)


def load_grid_maps_npz(path: str | os.PathLike, size: Literal["original"] | None = "original"
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a `save_grid_maps_npz` file (never unpickles) -> (maps float32, metadata).

    size None: the stored (N, h, w) grid, un-normalised. "original": (N, H, W) in the image's
    pixels through the one resize path (`attention.maps.cells_to_image`, bilinear), then
    normalised per map as the metadata's "normalize" says (`attention.aggregate.normalize_maps`).
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: cannot read grid maps npz: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a grid maps npz (a single .npy array)")
    with archive:
        if "grid" not in archive.files or "meta_json" not in archive.files:
            raise ValueError(f"{path}: not a grid maps npz (needs 'grid' and 'meta_json', has {sorted(archive.files)})")
        try:
            grid = archive["grid"].astype(np.float32)
            meta = json.loads(archive["meta_json"].tobytes().decode("utf-8"))
        except (OSError, EOFError, ValueError) as error:
            raise ValueError(f"{path}: cannot read grid maps npz: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != GRID_NPZ_FORMAT:
        raise ValueError(f"{path}: unknown grid maps format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if grid.ndim != 3 or len(grid) != meta.get("num_maps") or list(grid.shape[1:]) != meta.get("grid_size"):
        raise ValueError(f"{path}: grid shape {grid.shape} disagrees with num_maps {meta.get('num_maps')} "
                         f"and grid_size {meta.get('grid_size')}")
    if size is None:
        return grid, meta
    if size != "original":
        raise ValueError(f"size must be None or 'original', got {size!r}")
    maps = cells_to_image(grid, int(meta["stride"]), meta["input_size"], meta["image_size"])
    return normalize_maps(maps, meta.get("normalize")), meta
