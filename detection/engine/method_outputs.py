"""predict `--explain`: the explanation methods other than raw (`attention.methods`) run on each
image, and their per-method files: attention/<method>/<key>.npz and, with --overlays,
overlays/<key>/<method>/det_<k>.<fmt>. raw's files stay those of `engine.outputs`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from detection.attention.drise import DriseOptions
from detection.runfolder.maps_npz import save_maps_npz
from detection.attention.methods import MethodMaps, Targets, check_methods
from detection.engine.explain import MethodRunner, build_methods
from detection.engine.outputs import OutputOptions, overlay_source
from detection.engine.overlays import encode_overlay, render_overlays
from detection.engine.predictor import PredictionResult
from detection.runfolder.folder import RunFolder
from detection.runfolder.layout import method_attention_name
from detection.io import write_bytes_atomic

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


def write_method_outputs(folder: RunFolder, result: PredictionResult, method_maps: dict[str, MethodMaps],
                         options: OutputOptions, meta: dict[str, Any], record: dict[str, Any]) -> None:
    """Write each method's npz (and per-detection overlays with `options.overlays`) of one image,
    each atomically, and name the npz files in `record["methods"]` ({method: npz path}).

    Every method is stored as raw maps are (`runfolder.maps_npz.save_maps_npz`: its cells,
    un-normalised float32, with their geometry; D-RISE's cells are its saliency pooled to a long
    side of at most `DriseOptions.max_side`); the metadata adds "method", "normalize" and `meta`.
    Overlays are drawn from the cells at the run's overlay size (`engine.overlays`), heat maps
    whatever --overlay-style says (the point view is raw attention's).
    """
    item, detections = result.item, result.detections
    heatmaps = dataclasses.replace(options, overlay_style="heatmap")
    names: dict[str, str] = {}
    for method, maps in method_maps.items():
        method_meta = {**meta, "method": method, "normalize": options.normalize}
        save_maps_npz(folder.method_attention_path(item.key, method), maps.values, detections, maps.stride,
                      maps.input_size, method_meta)
        names[method] = method_attention_name(item.key, method)
        if options.overlays:
            geometry = {"feature_stride": maps.stride, "input_size": maps.input_size}
            for k, image in render_overlays(overlay_source(result), detections, maps.values, geometry, heatmaps):
                if k is not None:
                    write_bytes_atomic(folder.method_overlay_path(item.key, method, k, options.image_format),
                                       encode_overlay(image, options.image_format))
    record["methods"] = names
