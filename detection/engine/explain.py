"""The explanation methods of a run, built from the one table (`attention.methods.table`) for
the run's model and prepared copies, and each image's maps (on their grids or in original pixels),
timed per method."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.methods import (DEFAULT_METHOD, METHODS, AttentionRollout, ExplanationMethod, ImageInput,
                                         MethodContext, MethodMaps, MethodOptions, Targets, check_methods, check_names)
from detection.data.preprocess import image_to_input, pad_batch
from detection.engine.fast import PreparedModels


def method_names(explain: Sequence[str] | None, layers: Sequence[Any]) -> list[str]:
    """The methods to run: `explain` as given, or (None) eval's layer-choice set: the default
    method for the layer choices, plus rollout when the rollout layer choice is one of them."""
    if explain is not None:
        return check_names(explain)
    names = [DEFAULT_METHOD] if any(layer != ROLLOUT_LAYERS for layer in layers) else []
    return names + ([AttentionRollout.name] if ROLLOUT_LAYERS in layers else [])


@dataclass
class MethodRunner:
    """The built methods of a run, and the seconds each has spent (`seconds`, per method name).
    keys: the name each method's maps go by in `method_maps` (default: the method's name)."""

    methods: list[ExplanationMethod]
    preprocess: Any
    seconds: dict[str, float] = field(default_factory=dict)
    keys: list[str] | None = None

    @property
    def needs_attention(self) -> bool:
        return any(m.needs_attention for m in self.methods)

    @property
    def needs_self_attention(self) -> bool:
        return any(m.needs_self_attention for m in self.methods)

    @property
    def needs_input(self) -> bool:
        return any(m.needs_input for m in self.methods)

    @property
    def needs_features(self) -> bool:
        """The inference pass should keep the backbone-stage output (`PredictorSettings.keep_features`)."""
        return any(m.needs_features for m in self.methods)

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

    def method_maps(self, rgb: np.ndarray | None, original_size: tuple[int, int], attention: Any,
                    targets: Targets, empty_keys: Sequence[str] = ()) -> dict[str, MethodMaps]:
        """key -> its method's maps, for runners whose methods each make exactly one choice (predict's
        and the API's). An image without targets gets maps (empty, with their geometry) only for
        the keys in `empty_keys`, whose methods must read the attention record alone."""
        keys = self.keys or [method.name for method in self.methods]
        chosen = [(key, method) for key, method in zip(keys, self.methods) if len(targets) or key in empty_keys]
        if not chosen:
            return {}
        runner = MethodRunner([method for _, method in chosen], self.preprocess, self.seconds)
        cells = runner.image_cell_maps(rgb, original_size, attention, targets)
        return {key: cells[method.choices()[0]] for key, method in chosen}


def build_methods(model: Any, names: Sequence[str], device: str | torch.device,
                  options: MethodOptions = MethodOptions(), prepared: PreparedModels | None = None) -> MethodRunner:
    """Build the named methods for `model` from the one table (refused with MethodNotApplicable,
    naming the family and the methods that apply, when one does not apply). Methods that run the
    model take its prepared copy at their precision from `prepared` (the run's, shared with the
    predictor; None: a new set); the gradient methods share one graph-recording float32 copy."""
    names = list(names)
    check_methods(names, model)
    device = torch.device(device)
    prepared = prepared or PreparedModels(model)
    context = MethodContext(model, device, lambda precision: prepared.get(device, precision))
    return MethodRunner([METHODS[name].build(context, options) for name in names], model.preprocess_spec)
