"""What the interactive viewer needs from a predict run, at feature-grid resolution: per-detection
attention grids (per method, per layer x head within a byte budget), encoder self-attention, the image.

File `attention/grids/<key>.npz` (format GRIDS_NPZ_FORMAT; see docs/ARCHITECTURE.md "Predict run folder"):

    "meta_json"     uint8 UTF-8 JSON: format, image_size [H, W], input_size [h_in, w_in],
                    feature_stride, valid_size [hv, wv], kind "dense"|"sampled", layers L, heads,
                    detail (which slices were kept), budget_bytes, methods {name: {"slices":
                    [[layer, head], ...], "detections": [k, ...]}}, encoder_self (bool), rollout
    "grid_<method>" float16 (n, S, hv, wv): detection methods[name]["detections"][i], slice s
    "encoder_self"  float16 (hv*wv, hv*wv): last encoder layer, head mean, valid cells (optional)
    "image_jpeg"    uint8: the image as JPEG, longest side <= VIEWER_IMAGE_SIDE (optional)

A slice label is (layer, head): layer an int, "mean" or "rollout"; head an int, "mean" or "max";
("all", "all") for a method whose map has no layer / head axis. Grids are `query_cell_maps` of the
record (cells of the valid block, row-major), so `cells_to_image` maps them to pixels exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from detection.attention.methods import DEFAULT_METHOD
from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.aggregate import reduce_heads
from detection.attention.maps import query_cell_maps, valid_feature_size, valid_flat_indices
from detection.io import atomic_path
from detection.models.outputs import AttentionRecord
from detection.runfolder.versions import GRIDS_NPZ_FORMAT

logger = logging.getLogger(__name__)

#: Default bytes of float16 grids per image (all methods together; the encoder matrix and the
#: image are not counted: their sizes are fixed by the grid and the image).
DEFAULT_GRID_BUDGET = 4 * 2**20
VIEWER_IMAGE_SIDE = 960
#: Deflate level of the grids npz: level 1 writes float16 grids about 3x faster than
#: `np.savez_compressed`'s 6, for about 2 % more bytes.
NPZ_COMPRESS_LEVEL = 1
#: Kept slices, most detailed first; the first that fits the budget is written.
DETAILS = ("layer_head", "last_layer_heads", "layer_mean")

Slice = tuple[Any, Any]


@dataclass
class MethodGrids:
    """One method's grids: (n, S, hv, wv) float32 for detections `detections` and slices `slices`."""

    grids: np.ndarray
    slices: list[Slice]
    detections: list[int]


@dataclass
class AttentionGrids:
    """The contents of one `attention/grids/<key>.npz` (see the module docstring)."""

    image_size: tuple[int, int]
    input_size: tuple[int, int]
    feature_stride: int
    valid_size: tuple[int, int]
    kind: str
    layers: int
    heads: int
    methods: dict[str, MethodGrids]
    detail: str = "layer_head"
    budget_bytes: int | None = None
    rollout: str | None = None
    encoder_self: np.ndarray | None = None
    image_jpeg: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _layer_head_counts(record: AttentionRecord) -> tuple[int, int]:
    if record.kind == "dense":
        return int(record.decoder_cross.shape[0]), int(record.decoder_cross.shape[2])
    weights = record.decoder_cross_sampled.weights
    return int(weights.shape[0]), int(weights.shape[2])


def slice_plan(detail: str, layers: int, heads: int, rollout: bool) -> list[Slice]:
    """The (layer, head) slices kept at one level of detail (derived views are left to the viewer)."""
    if detail == "layer_head":
        plan = [(layer, head) for layer in range(layers) for head in range(heads)]
    elif detail == "last_layer_heads":
        plan = [(layers - 1, head) for head in range(heads)] + [(layer, "mean") for layer in range(layers)]
    elif detail == "layer_mean":
        plan = [(layer, "mean") for layer in range(layers)]
    else:
        raise ValueError(f"detail must be one of {DETAILS}, got {detail!r}")
    # rollout over head means only: each rollout costs the encoder's K x K products again
    return plan + ([(ROLLOUT_LAYERS, "mean")] if rollout else [])


def choose_detail(count: int, cells: int, layers: int, heads: int, rollout: bool,
                  budget_bytes: int | None) -> tuple[str, int]:
    """The most detailed level whose float16 grids for `count` detections fit the budget, and how
    many detections get grids (all, unless even the least detailed level does not fit)."""
    for detail in DETAILS:
        size = count * len(slice_plan(detail, layers, heads, rollout)) * cells * 2
        if budget_bytes is None or size <= budget_bytes:
            return detail, count
    per_detection = len(slice_plan(DETAILS[-1], layers, heads, rollout)) * cells * 2
    return DETAILS[-1], min(count, int(budget_bytes) // per_detection)


def raw_grids(record: AttentionRecord, image_index: int, query_index: Sequence[int], slices: Sequence[Slice]
              ) -> np.ndarray:
    """(N, S, hv, wv) float32 raw attention of each query for each (layer, head) slice."""
    index = torch.as_tensor(list(query_index), dtype=torch.int64)
    stacked = []
    for layer, head in slices:
        source, choice = _one_layer(record, layer)
        stacked.append(query_cell_maps(source, image_index, index, heads=head, layers=choice))
    return torch.stack(stacked, dim=1).numpy()


def _one_layer(record: AttentionRecord, layer: Any) -> tuple[AttentionRecord, Any]:
    """(record, layers choice) for `query_cell_maps`: a dense record cut to layer `layer` when it is
    an index (each slice then copies that layer's attention alone, not every layer's), else as given."""
    if record.kind != "dense" or isinstance(layer, str) or not 0 <= int(layer) < record.decoder_cross.shape[0]:
        return record, layer
    return dataclasses.replace(record, decoder_cross=record.decoder_cross[int(layer) : int(layer) + 1]), 0


def encoder_self_grid(record: AttentionRecord, image_index: int) -> np.ndarray | None:
    """(K, K) float32 last encoder layer's head-mean self-attention over the valid cells (row
    = query cell, column = key cell, row-major over the (hv, wv) block); None when not recorded."""
    if record.kind != "dense" or record.encoder_self is None:
        return None
    valid_h, valid_w = valid_feature_size(record.feature_padding_mask[image_index])
    flat = valid_flat_indices(record.feature_size, valid_h, valid_w)
    last = reduce_heads(record.encoder_self[-1, image_index].float().cpu(), "mean", dim=0)
    return last[flat][:, flat].numpy()


def build_grids(record: AttentionRecord, image_index: int, query_index: Sequence[int], scores: Sequence[float],
                original_size: Sequence[int], budget_bytes: int | None = DEFAULT_GRID_BUDGET,
                encoder_attention: bool = False, image_jpeg: bytes | None = None) -> AttentionGrids:
    """The viewer's data for one image of `record`: raw grids of every detection within the budget
    (when even head means of every layer do not fit, the highest-scoring detections that fit)."""
    valid_h, valid_w = valid_feature_size(record.feature_padding_mask[image_index])
    layers, heads = _layer_head_counts(record)
    rollout = record.kind == "dense"
    detail, kept = choose_detail(len(query_index), valid_h * valid_w, layers, heads, rollout, budget_bytes)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:kept]
    chosen = sorted(int(k) for k in order)
    if kept < len(query_index):
        logger.warning("attention grid budget %s bytes: grids kept for %d of %d detections", budget_bytes, kept,
                       len(query_index))
    slices = slice_plan(detail, layers, heads, rollout)
    queries = [int(query_index[k]) for k in chosen]
    grids = raw_grids(record, image_index, queries, slices) if queries else np.zeros(
        (0, len(slices), valid_h, valid_w), np.float32)
    input_h, input_w = (int(v) for v in record.image_sizes[image_index].tolist())
    variant = None
    if rollout:
        variant = "chefer2021-raw" + ("+decoder_self" if record.decoder_self is not None else "") + (
            "+encoder_self" if record.encoder_self is not None else "")
    return AttentionGrids(
        image_size=(int(original_size[0]), int(original_size[1])), input_size=(input_h, input_w),
        feature_stride=int(record.feature_stride), valid_size=(valid_h, valid_w), kind=record.kind,
        layers=layers, heads=heads, methods={DEFAULT_METHOD: MethodGrids(grids, slices, chosen)}, detail=detail,
        budget_bytes=budget_bytes, rollout=variant,
        encoder_self=encoder_self_grid(record, image_index) if encoder_attention else None, image_jpeg=image_jpeg)


# -- the npz file ----------------------------------------------------------------------------------
def save_grids_npz(path: str | os.PathLike, grids: AttentionGrids) -> None:
    """Write `grids` atomically as a compressed npz (float16 arrays, JSON metadata; deflate level
    NPZ_COMPRESS_LEVEL)."""
    methods = {}
    arrays: dict[str, np.ndarray] = {}
    for name, method in grids.methods.items():
        if method.grids.shape[:2] != (len(method.detections), len(method.slices)):
            raise ValueError(f"{path}: method {name!r} grids {method.grids.shape} do not match "
                             f"{len(method.detections)} detections x {len(method.slices)} slices")
        methods[name] = {"slices": [list(s) for s in method.slices], "detections": list(method.detections)}
        arrays[f"grid_{name}"] = np.asarray(method.grids).astype(np.float16)
    meta = {
        "format": GRIDS_NPZ_FORMAT, "image_size": list(grids.image_size), "input_size": list(grids.input_size),
        "feature_stride": grids.feature_stride, "valid_size": list(grids.valid_size), "kind": grids.kind,
        "layers": grids.layers, "heads": grids.heads, "detail": grids.detail, "budget_bytes": grids.budget_bytes,
        "rollout": grids.rollout, "methods": methods, "encoder_self": grids.encoder_self is not None, **grids.extra,
    }
    if grids.encoder_self is not None:
        arrays["encoder_self"] = np.asarray(grids.encoder_self).astype(np.float16)
    if grids.image_jpeg is not None:
        arrays["image_jpeg"] = np.frombuffer(grids.image_jpeg, dtype=np.uint8)
    arrays["meta_json"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            write_npz(handle, arrays, NPZ_COMPRESS_LEVEL)


def write_npz(handle: Any, arrays: dict[str, np.ndarray], level: int) -> None:
    """`np.savez_compressed` at deflate `level` (0-9): the same archive layout (one `<name>.npy`
    per array, zip64), read by `np.load`; never pickles."""
    with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=int(level),
                         allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


_KNOWN = {"format", "image_size", "input_size", "feature_stride", "valid_size", "kind", "layers", "heads",
          "detail", "budget_bytes", "rollout", "methods", "encoder_self"}


def _label(value: Any) -> Any:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def load_grids_npz(path: str | os.PathLike) -> AttentionGrids:
    """Read a `save_grids_npz` file (never unpickles); ValueError names the file and the problem."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: cannot read attention grids: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile) or "meta_json" not in archive.files:
        raise ValueError(f"{path}: not an attention grids npz (no 'meta_json')")
    with archive:
        try:
            meta = json.loads(archive["meta_json"].tobytes().decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != GRIDS_NPZ_FORMAT:
                found = meta.get("format") if isinstance(meta, dict) else meta
                raise ValueError(f"unknown format {found!r} (this version reads {GRIDS_NPZ_FORMAT})")
            methods = {}
            for name, info in meta["methods"].items():
                grids = archive[f"grid_{name}"].astype(np.float32)
                slices = [(_label(s[0]), _label(s[1])) for s in info["slices"]]
                methods[name] = MethodGrids(grids, slices, [int(k) for k in info["detections"]])
                if grids.ndim != 4 or grids.shape[:2] != (len(methods[name].detections), len(slices)):
                    raise ValueError(f"grid_{name} has shape {grids.shape}, metadata says "
                                     f"{len(methods[name].detections)} detections x {len(slices)} slices")
            encoder = archive["encoder_self"].astype(np.float32) if "encoder_self" in archive.files else None
            image = archive["image_jpeg"].tobytes() if "image_jpeg" in archive.files else None
        except (KeyError, TypeError, OSError, EOFError, ValueError) as error:
            raise ValueError(f"{path}: cannot read attention grids: {error}") from error
    return AttentionGrids(
        image_size=tuple(meta["image_size"]), input_size=tuple(meta["input_size"]),
        feature_stride=int(meta["feature_stride"]), valid_size=tuple(meta["valid_size"]), kind=meta["kind"],
        layers=int(meta["layers"]), heads=int(meta["heads"]), methods=methods, detail=meta.get("detail", ""),
        budget_bytes=meta.get("budget_bytes"), rollout=meta.get("rollout"), encoder_self=encoder, image_jpeg=image,
        extra={k: v for k, v in meta.items() if k not in _KNOWN})
