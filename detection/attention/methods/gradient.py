"""attn-grad and relevance: gradient-weighted attention of the detection's class logit
(`attention.gradients`, Chefer et al. ICCV 2021); native DETR, whose attention modules are hooked."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from detection.attention.gradients import attn_grad_maps, relevance_maps
from detection.attention.methods.base import (ExplanationMethod, ImageInput, MethodMaps, Targets, attention_kind,
                                              native_detr)


def _model_inputs(model: torch.nn.Module, image: ImageInput) -> tuple[torch.Tensor, torch.Tensor]:
    if image.images is None or image.padding_mask is None:
        raise ValueError("gradient methods need the image's model input (ImageInput.images)")
    device = next(model.parameters()).device
    return image.images.to(device), image.padding_mask.to(device)


def _feature_stride(model: torch.nn.Module) -> int:
    return int(model.feature_stride)


class _GradientMethod(ExplanationMethod):
    needs_input = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        if native_detr(model):
            return None
        if attention_kind(model) == "sampled":
            return (f"{cls.name} is not implemented for the sampled (deformable) attention record yet"
                    if cls.name == "attn-grad" else "relevance needs dense attention throughout")
        return f"{cls.name} needs the native DETR's attention modules to take gradients through"


class AttnGrad(_GradientMethod):
    """E_h[(∇A ⊙ A)⁺] of the decoder cross-attention row of the query, per layer choice."""

    name = "attn-grad"

    def __init__(self, model: torch.nn.Module, layers: Sequence[Any] = ("last",)) -> None:
        super().__init__(model)
        self.layers = list(layers)
        if "rollout" in self.layers:
            raise ValueError("attn-grad takes layers last, mean or an index (the rollout of Ā is 'relevance')")

    def choices(self) -> list[str]:
        return [f"{self.name}/{layers}" for layers in self.layers]

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        images, mask = _model_inputs(self.model, image)
        return {f"{self.name}/{layers}": MethodMaps(
                    attn_grad_maps(self.model, images, mask, 0, targets.query_index, targets.labels, layers=layers).cpu(),
                    _feature_stride(self.model), image.input_size())
                for layers in self.layers}


class Relevance(_GradientMethod):
    """Chefer et al.'s relevance R_qi (rules on gradient-weighted attention, no LRP)."""

    name = "relevance"

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        images, mask = _model_inputs(self.model, image)
        cells = relevance_maps(self.model, images, mask, 0, targets.query_index, targets.labels)
        return {self.name: MethodMaps(cells.cpu(), _feature_stride(self.model), image.input_size())}
