"""drise: D-RISE saliency (`attention.drise_saliency`) for any detector; the maps are pooled to a long
side of at most `options.max_side` cells and keep their geometry (stride, input size)."""
from __future__ import annotations

from typing import Any

import torch

from detection.attention.drise_saliency import DriseOptions, ForwardFn, downsample_factor, drise_saliency, pool_saliency
from detection.attention.methods.base import (ExplanationMethod, ImageInput, MethodContext, MethodMaps,
                                              MethodOptions, Targets)
from detection.runtime.device import resolve_precision


class Drise(ExplanationMethod):
    """model: the detector (its preprocess_spec and postprocess_rule); forward: how masked
    inputs are run ((n, 3, h, w), (n, h, w)) -> outputs, e.g. the engine's prepared model."""

    name = "drise"
    options = ("drise", "drise_precision")
    needs_input = True

    @classmethod
    def build(cls, context: MethodContext, options: MethodOptions) -> "Drise":
        """D-RISE's forwards run the run's prepared model at `options.drise_precision` ("auto" never
        picks a precision the family refuses, as the Predictor does)."""
        precision = resolve_precision(options.drise_precision, context.device)
        if options.drise_precision == "auto" and not context.model.precision_allowed(precision, context.device):
            precision = "fp32"
        return cls(context.model, context.forward_at(precision), options.drise)

    def __init__(self, model: Any, forward: ForwardFn, options: DriseOptions = DriseOptions()) -> None:
        self.spec = model.preprocess_spec
        self.rule = model.postprocess_rule
        self.forward = forward
        self.options = options

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        if image.images is None:
            raise ValueError("drise needs the image's model input (ImageInput.images)")
        input_h, input_w = image.input_size()
        height, width = image.original_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        saliency = drise_saliency(self.forward, image.images[0, :, :input_h, :input_w], targets.boxes / scale,
                                  targets.labels, self.spec, self.rule, self.options)
        factor = downsample_factor((input_h, input_w), self.options.max_side)
        return {self.name: MethodMaps(pool_saliency(saliency, factor), factor, (input_h, input_w))}
