"""predict's methods: the run's attention maps (the default method with --heads / --layers) and
the `--explain` methods, built once for the run's model and prepared copies."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from detection.attention.token_scores import TokenScores, text_token_scores
from detection.data.preprocess import image_to_input
from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.drise_saliency import DriseOptions
from detection.attention.methods import (DEFAULT_METHOD, AttentionRollout, Drise, MethodMaps, MethodOptions, Targets,
                                         check_methods)
from detection.engine.explain import MethodRunner, build_methods
from detection.engine.fast import PreparedModels
from detection.engine.image_files import OutputOptions
from detection.engine.predictor import PredictionResult


@dataclass(frozen=True)
class ExplainOptions:
    """predict `--explain`: methods (names of `attention.methods.METHODS`, in order; the default
    method is the run's attention maps, written as without --explain); drise: the D-RISE options
    (its maps are pooled to a long side of at most drise.max_side cells); drise_precision: its
    forward passes."""

    methods: tuple[str, ...] = (DEFAULT_METHOD,)
    drise: DriseOptions = DriseOptions()
    drise_precision: str = "fp32"

    @property
    def extra_methods(self) -> list[str]:
        """The methods with files of their own (all but the default)."""
        return [name for name in self.methods if name != DEFAULT_METHOD]

    def fingerprint(self) -> dict[str, Any]:
        """What changes the files (for the run fingerprint)."""
        entry: dict[str, Any] = {"methods": list(self.methods)}
        if Drise.name in self.methods:
            drise = dataclasses.asdict(self.drise)
            if drise["fill"] == "black":  # the fill came after run folders existed: theirs was black
                del drise["fill"]
            entry[Drise.name] = {**drise, "precision": self.drise_precision}
        return entry


def method_layers(layers: Any) -> Any:
    """The layer choice attn-grad uses for predict's --layers: the same, except "last" for the
    rollout choice (the rollout of gradient-weighted attention is the relevance method)."""
    return "last" if layers == ROLLOUT_LAYERS else layers


def build_predict_methods(model: Any, explain: ExplainOptions | None, outputs: OutputOptions,
                          device: str | torch.device, prepared: PreparedModels) -> MethodRunner | None:
    """The runner of a predict run (None when it makes no maps): the attention maps under the key
    DEFAULT_METHOD when overlays or npz are written (the rollout method when --layers is the
    rollout choice), then each of `explain.extra_methods`. Raises `MethodNotApplicable` naming the
    family and the methods that apply when one does not apply (the default included: a family
    without an attention record has no attention maps)."""
    if explain is not None:
        check_methods(list(explain.methods), model)
    extra = explain.extra_methods if explain is not None else []
    attention = [AttentionRollout.name if outputs.layers == ROLLOUT_LAYERS else DEFAULT_METHOD] \
        if outputs.needs_maps else []
    if not attention and not extra:
        return None
    explain = explain or ExplainOptions()
    options = MethodOptions(layers=[outputs.layers], heads=[outputs.heads],
                            attn_grad_layers=[method_layers(outputs.layers)], drise=explain.drise,
                            drise_precision=explain.drise_precision)
    runner = build_methods(model, attention + extra, device, options, prepared)
    runner.keys = [DEFAULT_METHOD] * len(attention) + extra
    return runner


def image_maps(runner: MethodRunner | None, result: PredictionResult) -> dict[str, MethodMaps]:
    """The maps `write_image_files` writes for one predicted image: key -> maps of its detections
    (the attention maps even when it has none: their files are written for every image)."""
    if runner is None:
        return {}
    return runner.method_maps(result.image, tuple(result.original_size), result.attention,
                              Targets.from_detections(result.detections), empty_keys=(DEFAULT_METHOD,))


def token_scorer(predictor: Any, outputs: OutputOptions) -> Any:
    """The prepared model that scores prompt tokens when the run saves attention and the model is a
    prompted detector (`attention.token_scores.text_token_scores`); None otherwise."""
    model = getattr(predictor.engine, "model", None)
    return model if outputs.save_attention and hasattr(model, "prompt_layout") else None


def image_token_scores(predictor: Any, result: PredictionResult) -> TokenScores:
    """One predicted image's token scores, on the predictor's prepared model at its precision: from
    the inference pass's kept inputs when its record carries them (`PredictorSettings.keep_features`,
    float32 passes: only the part the gradient needs runs again), else from the decoded image (kept
    for this: `PredictorSettings.keep_images`; the model runs again)."""
    engine = predictor.engine
    kept = None if result.attention is None else result.attention.kept_inputs
    if kept is not None:
        with engine.autocast():
            return text_token_scores(engine.model, None, result.detections.query_index, result.detections.labels,
                                     kept=kept.to(engine.device, copy=True))
    if result.image is None:
        raise ValueError("token scores need the decoded image (keep_images) or the kept inputs (keep_features)")
    images = image_to_input(result.image, engine.model.preprocess_spec)[None].to(engine.device)
    with engine.autocast():
        return text_token_scores(engine.model, images, result.detections.query_index, result.detections.labels)
