"""The explanation methods of a run (eval and predict `--explain`, or eval's legacy --layers
choice), built for the model, and each image's maps (on their grids or in original pixels), timed per method."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from detection.attention.drise import DriseOptions
from detection.attention.methods import (METHODS, AttentionRollout, AttnGrad, Drise, ExplanationMethod, ImageInput,
                                         MethodMaps, RawAttention, Relevance, Targets, check_methods)
from detection.data.preprocess import image_to_input, pad_batch
from detection.engine.fast import InferenceModel
from detection.runtime.device import resolve_precision


def method_names(explain: Sequence[str] | None, layers: Sequence[Any]) -> list[str]:
    """The methods to run: `explain` as given, or (None) the pre-#13 set: raw for the layer
    choices, plus rollout when "rollout" is one of them."""
    if explain is not None:
        unknown = [name for name in explain if name not in METHODS]
        if unknown:
            raise ValueError(f"unknown explanation method(s) {unknown}; choose from {', '.join(METHODS)}")
        return list(dict.fromkeys(explain))
    names = ["raw"] if any(layer != "rollout" for layer in layers) else []
    return names + (["rollout"] if "rollout" in layers else [])


@dataclass
class MethodRunner:
    """The built methods of a run, and the seconds each has spent (`seconds`, per method name)."""

    methods: list[ExplanationMethod]
    preprocess: Any
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def needs_attention(self) -> bool:
        return any(m.needs_attention for m in self.methods)

    @property
    def needs_self_attention(self) -> bool:
        return any(m.needs_self_attention for m in self.methods)

    @property
    def needs_input(self) -> bool:
        return any(m.needs_input for m in self.methods)

    def choices(self) -> list[str]:
        return [choice for method in self.methods for choice in method.choices()]

    def image_maps(self, rgb: np.ndarray | None, original_size: tuple[int, int], attention: Any,
                   targets: Targets) -> dict[str, np.ndarray]:
        """choice -> (N, H, W) float32 maps in original pixels (not normalised) of one image.

        rgb: uint8 (H, W, 3) original image (needed when a method takes the model input);
        attention: the inference pass's record of this image (batch of one) or None.
        """
        cells = self.image_cell_maps(rgb, original_size, attention, targets)
        return {choice: maps.to_image(original_size) for choice, maps in cells.items()}

    def image_cell_maps(self, rgb: np.ndarray | None, original_size: tuple[int, int], attention: Any,
                        targets: Targets) -> dict[str, MethodMaps]:
        """choice -> the maps of one image on each method's own grid, with their geometry
        (`MethodMaps`; `image_maps` takes them to original pixels). Arguments as `image_maps`."""
        images = padding_mask = None
        if self.needs_input:
            if rgb is None:
                raise ValueError("the methods need the decoded image (keep_images)")
            images, padding_mask = pad_batch([image_to_input(rgb, self.preprocess)], self.preprocess.size_divisibility)
        image = ImageInput(tuple(original_size), attention=attention, images=images, padding_mask=padding_mask)
        maps: dict[str, MethodMaps] = {}
        for method in self.methods:
            started = time.perf_counter()
            maps.update(method.explain(image, targets))
            self.seconds[method.name] = self.seconds.get(method.name, 0.0) + time.perf_counter() - started
        return maps


def build_methods(
    model: Any,
    names: Sequence[str],
    device: str | torch.device,
    layers: Sequence[Any] = ("last", "mean"),
    heads: Sequence[Any] = ("mean", "max"),
    attn_grad_layers: Sequence[Any] = ("last",),
    drise: DriseOptions = DriseOptions(),
    drise_precision: str = "fp32",
) -> MethodRunner:
    """Build the named methods for `model` (refused with MethodNotApplicable, naming the family
    and the methods that apply, when one does not apply). Gradient methods run a float32 copy of
    the model on `device`; D-RISE its own prepared copy (the engine's fast path) at `drise_precision`
    ("auto": bf16 where the device runs it natively)."""
    names = list(names)
    check_methods(names, model)
    device = torch.device(device)
    gradient_model = None
    if "attn-grad" in names or "relevance" in names:
        # a copy on `device`; attention.gradients puts frozen parameters in the graph itself
        gradient_model = copy.deepcopy(model).to(device).eval()
    built: list[ExplanationMethod] = []
    for name in names:
        if name == "raw":
            built.append(RawAttention(layers, heads))
        elif name == "rollout":
            built.append(AttentionRollout(heads))
        elif name == "attn-grad":
            built.append(AttnGrad(gradient_model, attn_grad_layers))
        elif name == "relevance":
            built.append(Relevance(gradient_model))
        elif name == "drise":
            precision = resolve_precision(drise_precision, device)
            if drise_precision == "auto" and not model.precision_allowed(precision, device):
                precision = "fp32"  # as the Predictor does: auto never picks a precision the family refuses
            engine = InferenceModel(model, device, precision)
            built.append(Drise(model, engine, drise))
    return MethodRunner(built, model.preprocess_spec)
