"""predict `--explain`: the explanation methods other than raw (`attention.methods`) run on each
image, and their per-method files: attention/<method>/<key>.npz and, with --overlays,
overlays/<key>/<method>/det_<k>.<fmt>. raw's files stay those of `engine.outputs`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from detection.attention.aggregate import normalize_maps
from detection.attention.drise import DriseOptions
from detection.attention.grid_npz import save_grid_maps_npz
from detection.attention.maps import save_maps_npz
from detection.attention.methods import MethodMaps, Targets, check_methods
from detection.engine.explain import MethodRunner, build_methods
from detection.engine.outputs import _encode as encode_overlay  # the one overlay encoding of a run
from detection.engine.predictor import PredictionResult
from detection.engine.run_folder import RunFolder, method_attention_name
from detection.io import write_bytes_atomic
from detection.render.overlay import render_detection_overlay

#: Methods whose maps are image-resolution by nature: stored on their pooled grid (`grid_npz`).
GRID_STORED = ("drise",)


@dataclass(frozen=True)
class ExplainOptions:
    """predict `--explain`: methods (names of `attention.methods.METHODS`, in order; "raw" is
    today's maps, written by `engine.outputs` as before); drise: the D-RISE options (its maps are
    pooled to a long side of at most drise.max_side cells); drise_precision: its forward passes."""

    methods: tuple[str, ...] = ("raw",)
    drise: DriseOptions = DriseOptions()
    drise_precision: str = "fp32"

    @property
    def extra_methods(self) -> list[str]:
        """The methods with files of their own (all but raw)."""
        return [name for name in self.methods if name != "raw"]

    def fingerprint(self) -> dict[str, Any]:
        """What changes the files (for the run fingerprint)."""
        entry: dict[str, Any] = {"methods": list(self.methods)}
        if "drise" in self.methods:
            entry["drise"] = {**dataclasses.asdict(self.drise), "precision": self.drise_precision}
        return entry


def method_layers(layers: Any) -> Any:
    """The layer choice attn-grad uses for predict's --layers: the same, except "last" for
    "rollout" (the rollout of gradient-weighted attention is the relevance method)."""
    return "last" if layers == "rollout" else layers


def build_predict_methods(model: Any, options: ExplainOptions, device: str | torch.device, layers: Any,
                          heads: Any) -> MethodRunner | None:
    """The runner of `options.extra_methods` for `model` (None when there are none). Raises
    `MethodNotApplicable` naming the family and the methods that apply when one does not apply
    (raw included: a family without an attention record has no raw maps)."""
    check_methods(list(options.methods), model)
    if not options.extra_methods:
        return None
    return build_methods(model, options.extra_methods, device, layers=[layers], heads=[heads],
                         attn_grad_layers=[method_layers(layers)], drise=options.drise,
                         drise_precision=options.drise_precision)


def explain_result(runner: MethodRunner, result: PredictionResult) -> dict[str, MethodMaps]:
    """method name -> its maps of every detection of `result` ({} when it has none). Each method
    of a predict runner gives exactly one choice (one layers / heads choice)."""
    detections = result.detections
    if detections is None or not len(detections):
        return {}
    maps: dict[str, MethodMaps] = {}
    cells = runner.image_cell_maps(result.image, tuple(result.original_size), result.attention,
                                   Targets.from_detections(detections))
    for method in runner.methods:
        (choice,) = method.choices()
        maps[method.name] = cells[choice]
    return maps


def method_image_maps(maps: MethodMaps, original_size: Sequence[int], normalize: Any) -> np.ndarray:
    """(N, H, W) float32 maps in original pixels, normalised per map (what npz and overlays show)."""
    return normalize_maps(maps.to_image(original_size), normalize)


def write_method_outputs(folder: RunFolder, result: PredictionResult, method_maps: dict[str, MethodMaps],
                         normalize: Any, overlays: bool, image_format: str, meta: dict[str, Any],
                         record: dict[str, Any]) -> None:
    """Write each method's npz (and per-detection overlays when `overlays`) of one image, each
    atomically, and name the npz files in `record["methods"]` ({method: npz path in the folder}).

    Attention methods are stored at image resolution by `attention.maps.save_maps_npz`, D-RISE
    on its pooled grid by `attention.grid_npz.save_grid_maps_npz`; the metadata carries
    "method", "choice", the grid geometry and `meta` (file, key, ...).
    """
    item, detections = result.item, result.detections
    names: dict[str, str] = {}
    for method, maps in method_maps.items():
        image_maps = method_image_maps(maps, detections.image_size, normalize)
        method_meta = {**meta, "method": method, "normalize": normalize}
        path = folder.method_attention_path(item.key, method)
        if method in GRID_STORED:
            save_grid_maps_npz(path, maps, detections, method_meta)
        else:
            save_maps_npz(path, image_maps, detections, {**method_meta, **_geometry_meta(maps)})
        names[method] = method_attention_name(item.key, method)
        if overlays:
            if result.image is None:
                raise ValueError("overlays requested but the decoded image was not kept")
            for k in range(len(detections)):
                image = render_detection_overlay(result.image, detections[k], image_maps[k])
                write_bytes_atomic(folder.method_overlay_path(item.key, method, k, image_format),
                                   encode_overlay(image, image_format))
    record["methods"] = names


def _geometry_meta(maps: MethodMaps) -> dict[str, Any]:
    """The cells the maps were made on, named as `attention.maps.map_metadata` names them."""
    geometry = maps.geometry()
    return {"feature_stride": geometry["stride"], "input_size": geometry["input_size"],
            "valid_feature_size": geometry["grid_size"]}
