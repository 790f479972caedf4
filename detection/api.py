"""`explain`: detections and their saliency maps in one call, one `Explanation` per image.

Runs the engine's `Predictor` and the method's runner (built from the one method table), both on
one prepared copy of the model; pictures from `detection.render`.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.drise_saliency import DriseOptions
from detection.attention.maps import maps_from_cells
from detection.attention.methods import (DEFAULT_METHOD, METHODS, AttentionRollout, ImageInput, MethodMaps,
                                         MethodOptions, Targets, check_names)
from detection.attention.methods.raw import record_maps
from detection.attention.token_scores import TokenScores, text_token_scores
from detection.boxes import coco_xywh
from detection.data.image_codec import encode_image, write_image
from detection.data.images import pil_to_rgb
from detection.data.preprocess import image_to_input
from detection.engine.explain import MethodRunner, build_methods
from detection.engine.fast import PreparedModels
from detection.engine.image_files import OutputOptions
from detection.engine.model_failure import probe
from detection.engine.predictor import Predictor, PredictorSettings
from detection.evaluation.fiftyone_export import image_fields
from detection.models.outputs import AttentionRecord
from detection.models.hf.prompt import check_phrases
from detection.models.registry import load_model
from detection.render.cell_overlays import render_overlays
from detection.render.panel import render_panel
from detection.runfolder.maps_npz import map_metadata, save_maps_npz
from detection.runtime.device import resolve_device
from detection.structures import Detections

logger = logging.getLogger(__name__)

# models loaded by name, and their prepared Predictors and method runners, kept for the next call
_MODELS: dict[tuple, torch.nn.Module] = {}
_PREPARED: dict[tuple, tuple[Predictor, MethodRunner]] = {}


class ExplanationError(ValueError):
    """An image of an `explain` call that could not be explained (the message names it)."""


@dataclass(eq=False)
class Explanation:
    """One image's detections and their saliency maps.

    source: the file path, or "array #i" / "PIL image #i" (i = position in the call).
    image: uint8 (H, W, 3) RGB original pixels (None when `error`).
    detections: boxes xyxy in original pixels (None when `error`).
    attention: the image's AttentionRecord (batch dimension 1) the maps are computed from.
    error: why the image could not be explained, naming it; every accessor below then raises
        ExplanationError with this message.
    heads / layers / normalize: how `maps` are made (see `detection.attention.maps.detection_maps`).
    method / method_maps: the explanation method (a name of `attention.methods.METHODS`) and its
        maps on their own grid with their geometry (`attention.methods.MethodMaps`), which `maps`
        resizes through the one resize path and normalises.
    token_scores: for a prompted detector (explain(..., prompt=...)), how much each prompt token
        and phrase made each detection (`detection.attention.token_scores.TokenScores`); else None.
    """

    source: str
    image: np.ndarray | None = None
    detections: Detections | None = None
    attention: AttentionRecord | None = None
    error: str | None = None
    heads: Any = "mean"
    layers: Any = "last"
    normalize: str | None = "minmax"
    method: str = DEFAULT_METHOD
    method_maps: MethodMaps | None = field(default=None, repr=False)
    model: str = ""
    token_scores: TokenScores | None = field(default=None, repr=False)
    _maps: np.ndarray | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        """The image, its size, the model and method, then a short table of its detections
        (class, score, box xyxy in pixels, query index); the error when it failed."""
        if self.error is not None:
            return f"Explanation({self.source}: not explained: {self.error})"
        height, width = self.detections.image_size
        head = (f"Explanation({self.source}: {width}x{height}, model {self.model or '?'}, method {self.method}, "
                f"{len(self.detections)} detection{'' if len(self.detections) == 1 else 's'})")
        return "\n".join([head, *self.detections.table_rows(10)])

    def _check(self) -> None:
        if self.error is not None:
            raise ExplanationError(self.error)

    @property
    def maps(self) -> np.ndarray:
        """(N, H, W) float32 per-detection saliency at the image's size, computed on first access."""
        self._check()
        if self._maps is None:
            detections = self.detections
            method_maps = self._cell_maps()
            if method_maps is not None:
                self._maps = maps_from_cells(method_maps.values, method_maps.stride, method_maps.input_size,
                                             detections.image_size, self.normalize)
            else:  # no detection: the method had nothing to explain
                self._maps = np.zeros((0, *detections.image_size), dtype=np.float32)
        return self._maps

    def _cell_maps(self) -> MethodMaps | None:
        """The method's maps on their grid (made here from the record when the Explanation was
        built from a record alone); None when there is no detection to explain."""
        detections = self.detections
        if self.method_maps is None and len(detections) and METHODS[self.method].needs_attention:
            self.method_maps = record_maps(ImageInput(detections.image_size, self.attention),
                                           Targets.from_detections(detections), self.layers, self.heads)
        return self.method_maps

    def map(self, k: int) -> np.ndarray:
        """(H, W) saliency of detection k."""
        return self.maps[k]

    def overlay(self, **options: Any) -> np.ndarray:
        """All detections over the image at its size, drawn by predict's renderer from the maps'
        cells (`render.cell_overlays.render_overlays`); options: alpha, contour_mass, show_boxes,
        show_labels, display_width (`render.overlay.draw_combined`). Equal to
        `render.overlay.render_overlay(image, detections, maps, **options)`."""
        self._check()
        maps = self._cell_maps()
        if maps is None:
            maps = MethodMaps(np.zeros((0, 1, 1), np.float32), 1, self.detections.image_size)
        geometry = {"feature_stride": maps.stride, "input_size": maps.input_size}
        view = OutputOptions(overlay_size=None, normalize=self.normalize)
        ((_, image),) = render_overlays(self.image, self.detections, maps.values, geometry, view,
                                        per_detection=False, style=options)
        return image

    def panel(self, **options: Any) -> np.ndarray:
        """The image with its boxes, then one overlay per detection (`render_panel` options)."""
        self._check()
        return render_panel(self.image, self.detections, self.maps, **options)

    def save(self, path: str | os.PathLike, kind: str = "overlay") -> Path:
        """Write the overlay (kind="overlay") or panel (kind="panel") as .png/.jpg, or the maps
        as an .npz of per-detection cell maps (`detection.runfolder.maps_npz.save_maps_npz`; maps
        made from the attention record carry its `map_metadata`; `load_maps_npz(path)` gives
        back `maps`)."""
        self._check()
        path = Path(path)
        if path.suffix.lower() == ".npz":
            maps = self.method_maps
            if METHODS[self.method].needs_attention:  # maps of the record: its geometry and choices
                meta = map_metadata(self.attention, 0, heads=self.heads, layers=self.layers, normalize=self.normalize)
                meta["file"] = self.source
            else:
                meta = {"file": self.source, "method": self.method, "normalize": self.normalize}
            if maps is None:  # no detection (a method that needs no record always has its maps then)
                maps = MethodMaps(np.zeros((0, *meta["valid_feature_size"]), np.float32), meta["feature_stride"],
                                  meta["input_size"])
            save_maps_npz(path, maps.values, self.detections, maps.stride, maps.input_size, meta)
        elif kind in ("overlay", "panel"):
            write_image(path, self.overlay() if kind == "overlay" else self.panel())
        else:
            raise ValueError(f"kind must be 'overlay' or 'panel', got {kind!r}")
        return path

    def to_supervision(self) -> Any:
        """This image as `supervision.Detections` (needs the `export` extra).

        xyxy: boxes clipped to the image (float32, original pixels); confidence: scores;
        class_id: model label indices; data: "class_name" (str), "query_index" (int64) and
        "saliency", the (N, H, W) float32 maps.
        """
        import supervision as sv  # noqa: PLC0415 - optional dependency

        self._check()
        detections = self.detections
        height, width = detections.image_size
        boxes = np.asarray(detections.boxes, dtype=np.float32).reshape(-1, 4)
        xyxy = np.clip(boxes, 0.0, np.array([width, height, width, height], dtype=np.float32))
        return sv.Detections(
            xyxy=xyxy, confidence=np.asarray(detections.scores, dtype=np.float32),
            class_id=np.asarray(detections.labels, dtype=np.int64),
            data={"class_name": np.array(list(detections.class_names), dtype=str).reshape(-1),
                  "query_index": np.asarray(detections.query_index, dtype=np.int64), "saliency": self.maps})

    def to_fiftyone(self) -> dict[str, Any]:
        """This image's FiftyOne fields (needs fiftyone): {"detections": fo.Detections (Otsu
        explanation mask per detection, cropped to its box), "saliency_det_<k>": fo.Heatmap (the
        whole map of detection k), "saliency": fo.Heatmap (per-pixel max)}; add them with
        `sample.update_fields(explanation.to_fiftyone())`. What each keeps:
        `detection.evaluation.fiftyone_export`. category_id is not set (the label index is)."""
        import fiftyone as fo  # noqa: PLC0415 - optional dependency

        self._check()
        detections = self.detections
        records = [{"bbox": box, "score": float(score), "class_name": name, "label": int(label),
                    "query_index": int(query)}
                   for box, score, name, label, query in zip(coco_xywh(detections.boxes), detections.scores.tolist(),
                                                            detections.class_names, detections.labels.tolist(),
                                                            detections.query_index.tolist())]
        fields = image_fields(records, self.maps, Path(self.source).stem or "image")
        return {name: (fo.Detections if name == "detections" else fo.Heatmap).from_dict(value)
                for name, value in fields.items()}

    def _repr_png_(self) -> bytes | None:
        # notebooks: the overlay; an image that failed shows its repr (with the error) instead
        return None if self.error is not None else encode_image(self.overlay(), ".png")


def _is_single(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike, np.ndarray, Image.Image))


def _model_and_key(model: str | os.PathLike | torch.nn.Module,
                   prompt: tuple[str, ...] | None) -> tuple[torch.nn.Module, Any]:
    if isinstance(model, torch.nn.Module):
        if prompt is None:
            return model, None
        if not hasattr(model, "with_prompt"):
            raise ValueError(f"prompt= applies to open-vocabulary detectors only; {type(model).__name__} has "
                             "fixed classes")
        return model.with_prompt(prompt), None
    key = (os.fspath(model), prompt)
    if key not in _MODELS:
        _MODELS[key] = load_model(key[0], prompt=prompt)
    return _MODELS[key], key


def _prepared(model: str | os.PathLike | torch.nn.Module, method: str, score_threshold: float, heads: Any,
              layers: Any, device: str, precision: str,
              prompt: tuple[str, ...] | None = None) -> tuple[Predictor, MethodRunner, torch.nn.Module]:
    """The predictor and the method's runner for the model, on one prepared copy (kept for later
    calls when the model came by name). The method is checked against the family first: a
    refusal names the family and the methods that apply, before any work."""
    module, key = _model_and_key(model, prompt)
    settings = (method, float(score_threshold), repr(heads), repr(layers), str(device), precision)
    if key is not None and (key, *settings) in _PREPARED:
        return (*_PREPARED[(key, *settings)], module)
    prepared = PreparedModels(module)
    runner = build_methods(module, [method], resolve_device(device),
                           MethodOptions(layers=[layers], heads=[heads], attn_grad_layers=[layers],
                                         drise=DriseOptions(), drise_precision=precision), prepared)
    predictor = Predictor(module, PredictorSettings(
        device=device, precision=precision, score_threshold=score_threshold, cross_attention=True,
        keep_images=True, keep_features=runner.needs_features or hasattr(module, "prompt_layout"),
        rollout=runner.needs_self_attention,
        last_layer_only=layers == "last"), prepared)
    if key is not None:
        # a model loaded by name is probed once, when it is prepared (a model object is prepared on every
        # call: its first image's forward raises the same ModelRunError, so no extra forward per call)
        probe(predictor)
        _PREPARED[(key, *settings)] = (predictor, runner)
    return predictor, runner, module


def _token_scores(module: torch.nn.Module, explanation: Explanation) -> TokenScores:
    """The prompt tokens' scores of the explanation's detections (a prompted detector), computed on
    the loaded model's own device and precision from the inference pass's kept inputs (a float32
    pass) or else from the image's model input."""
    device = next(module.parameters()).device
    detections = explanation.detections
    kept = None if explanation.attention is None else explanation.attention.kept_inputs
    if kept is not None:
        return text_token_scores(module, None, detections.query_index, detections.labels,
                                 kept=kept.to(device, copy=True))
    images = image_to_input(explanation.image, module.preprocess_spec)[None].to(device)
    return text_token_scores(module, images, detections.query_index, detections.labels)


def _with_method(explanations: Iterator[Explanation], runner: MethodRunner,
                 module: torch.nn.Module | None = None) -> Iterator[Explanation]:
    """Each explanation with its method's maps (maps of the attention record also for an image
    without detections: their geometry is the record's), and its token scores when `module` is a
    prompted detector."""
    for explanation in explanations:
        if explanation.error is None:
            detections = explanation.detections
            empty = [runner.methods[0].name] if runner.needs_attention else []
            try:
                maps = runner.method_maps(explanation.image, detections.image_size, explanation.attention,
                                          Targets.from_detections(detections), empty_keys=empty)
            except (RuntimeError, ValueError) as err:
                explanation.error = f"{explanation.source}: {explanation.method} failed: {err}"
            else:
                explanation.method_maps = maps.get(explanation.method)
            if explanation.error is None and module is not None and hasattr(module, "prompt_layout"):
                explanation.token_scores = _token_scores(module, explanation)
        yield explanation


def clear_model_cache() -> None:
    """Forget the models `explain` loaded by name (and their prepared copies and method runners)."""
    _MODELS.clear()
    _PREPARED.clear()


def _array_input(image: Any, position: int) -> tuple[str, np.ndarray]:
    if isinstance(image, Image.Image):
        source = f"PIL image #{position}"
        try:  # the pixels a file of this image gives: EXIF orientation, then the same mode rules
            return source, pil_to_rgb(image)
        except (OSError, ValueError) as err:
            raise ExplanationError(f"{source}: cannot convert mode {image.mode} to RGB: {err}") from None
    source = f"array #{position}"
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ExplanationError(f"{source}: expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
    return source, np.ascontiguousarray(image)


def _explain_one(predictor: Predictor, image: Any, position: int, settings: dict) -> Iterator[Explanation]:
    """The Explanations of one input (a folder or glob path gives one per file, as each is done)."""
    if isinstance(image, (str, os.PathLike)):
        found = False
        for result in predictor.run([os.fspath(image)]):
            found = True
            if result.error is not None:
                yield Explanation(result.path, error=f"{result.path}: {result.error}", **settings)
            else:
                yield Explanation(result.path, image=result.image, detections=result.detections,
                                  attention=result.attention, **settings)
        if not found:
            yield Explanation(os.fspath(image), error=f"{os.fspath(image)}: no image found", **settings)
        return
    if not _is_single(image):
        yield Explanation(f"input #{position}", error=f"input #{position}: expected a path, a numpy RGB "
                          f"array or a PIL image, got {type(image).__name__}", **settings)
        return
    try:
        source, rgb = _array_input(image, position)
    except ExplanationError as err:
        yield Explanation(f"input #{position}", error=str(err), **settings)
        return
    detections, record = predictor.predict_arrays([rgb])
    yield Explanation(source, image=rgb, detections=detections[0], attention=record.select_image(0), **settings)


def _explain_many(predictor: Predictor, images: Iterable[Any], settings: dict) -> Iterator[Explanation]:
    for position, image in enumerate(images):
        for explanation in _explain_one(predictor, image, position, settings):
            if explanation.error is not None:
                logger.warning("not explained: %s", explanation.error)
            yield explanation


def explain(images: Any, model: str | os.PathLike | torch.nn.Module = "demo", method: str = DEFAULT_METHOD,
            score_threshold: float = 0.7, heads: Any = "mean", layers: Any = "last", device: str = "auto",
            precision: str = "fp32", normalize: str | None = "minmax",
            prompt: str | Iterable[str] | None = None) -> Explanation | Iterator[Explanation]:
    """Detect and explain: one `Explanation` per image.

    images: one image -- a file path, a uint8 (H, W, 3) RGB numpy array or a PIL image (EXIF
        orientation and modes handled as for files) -- gives one Explanation, and raises
        ExplanationError (naming it) when it cannot be explained. A list or any other iterable
        of them (paths may be folders or globs) gives an iterator yielding each Explanation as
        it is done; an image that fails there yields an Explanation with `.error` set (and a
        logged warning) and the others are still explained.
    model: a name ("demo", "detr-r50", ...) or model folder, loaded once and kept for later
        calls (`clear_model_cache()` forgets it), or a detector object.
    method: "raw" (decoder cross-attention reduced over `heads` and `layers`), "rollout"
        (propagated through the layers; `layers` is then ignored), "attn-grad" (gradient-weighted
        attention of `layers`), "relevance" (Chefer et al. 2021) or "drise" (1000 random masks);
        `detection.attention.methods` says which apply to which family (a refusal names them).
    heads / layers / normalize: see `detection.attention.maps.detection_maps`.
    device / precision: see `detection.runtime.device`.
    prompt: the classes of an open-vocabulary detector (OWL-ViT, OWLv2, Grounding DINO, OmDet-Turbo):
        "cat. remote control." (phrases separated by ".") or a list of phrases; each Explanation then carries `token_scores`
        (docs/prompted.md). Refused (ValueError) for a closed-set model.
    """
    check_names([method])
    if method == AttentionRollout.name:
        layers = ROLLOUT_LAYERS
    phrases = None if prompt is None else check_phrases(prompt)
    predictor, runner, module = _prepared(model, method, score_threshold, heads, layers, device, precision, phrases)
    model_name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    settings = {"heads": heads, "layers": layers, "normalize": normalize, "method": method, "model": model_name}
    if not _is_single(images):
        return _with_method(_explain_many(predictor, images, settings), runner, module)
    explained = list(itertools.islice(_with_method(_explain_one(predictor, images, 0, settings), runner, module), 2))
    if len(explained) != 1:
        raise ExplanationError(f"{os.fspath(images)}: names several images; pass [it] to explain each")
    if explained[0].error is not None:
        raise ExplanationError(explained[0].error)
    return explained[0]
