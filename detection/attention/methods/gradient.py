"""attn-grad and relevance: gradient-weighted attention of the detection's class logit
(`attention.gradients`, Chefer et al. ICCV 2021). attn-grad: the native DETR and every wrapped
HF family (deformable ones through their sampled-point weights); relevance: dense attention only."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from detection.attention.gradients import attn_grad, relevance
from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.methods.base import (ExplanationMethod, ImageInput, MethodContext, MethodMaps,
                                              MethodOptions, Targets, attention_kind, model_family)


def _model_inputs(model: torch.nn.Module, image: ImageInput) -> dict[str, Any]:
    """The gradient functions' inputs: the inference pass's backbone-stage output when its record
    carries one from a float32 pass (native DETR: the backbone is not run again), else the image's
    model input (the backbone runs again in float32, without a graph). A bf16 / fp16 pass's
    features are not reused: the maps stay the float32 maps (on those features they would move by
    up to 0.14 of their peak on the demo model: scripts/bench_explain.py --gradient-bf16)."""
    features = None if image.attention is None else image.attention.transformer_inputs
    if (features is not None and features.features.dtype == torch.float32
            and getattr(model, "gradient_capture", None) == "hooks"):
        return {"images": None, "padding_mask": None, "features": features}
    if image.images is None or image.padding_mask is None:
        raise ValueError("gradient methods need the image's model input (ImageInput.images)")
    device = next(model.parameters()).device
    return {"images": image.images.to(device), "padding_mask": image.padding_mask.to(device)}


class _GradientMethod(ExplanationMethod):
    needs_input = True
    dense_only = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.needs_features = getattr(model, "gradient_capture", None) == "hooks"

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        kind = attention_kind(model)
        if not getattr(model, "gradient_capture", False) or kind not in ("dense", "sampled"):
            return f"{cls.name} needs the native DETR or a wrapped Hugging Face detector to take gradients through"
        if (cls.dense_only and getattr(model, "last_layer_attention_only", False)
                and not getattr(model, "every_layer_in_graph", False)):
            return (f"{cls.name} needs every layer's attention; the {model_family(model)} record holds its last "
                    "vision layer's self-attention only")
        if kind == "sampled" and cls.dense_only:
            return (f"{cls.name} needs dense attention throughout (encoder self-, decoder self- and "
                    f"cross-attention over one grid); the {model_family(model)} decoder samples points "
                    "(deformable attention)")
        return None


class AttnGrad(_GradientMethod):
    """E_h[(∇A ⊙ A)⁺] of the decoder cross-attention row of the query (or of its sampled
    points' weights), per layer choice."""

    name = "attn-grad"
    options = ("attn_grad_layers",)

    def __init__(self, model: torch.nn.Module, layers: Sequence[Any] = ("last",)) -> None:
        super().__init__(model)
        self.layers = list(layers)
        if ROLLOUT_LAYERS in self.layers:
            raise ValueError(f"{self.name} takes layers last, mean or an index (the rollout of Ā is "
                             f"{Relevance.name!r})")

    @classmethod
    def build(cls, context: MethodContext, options: MethodOptions) -> "AttnGrad":
        return cls(context.gradient_model(), options.attn_grad_layers)

    def choices(self) -> list[str]:
        return [f"{self.name}/{layers}" for layers in self.layers]

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        inputs = _model_inputs(self.model, image)
        return {f"{self.name}/{layers}": attn_grad(self.model, image_index=0, query_index=targets.query_index,
                                                   labels=targets.labels, layers=layers, **inputs)
                for layers in self.layers}


class Relevance(_GradientMethod):
    """Chefer et al.'s relevance (rules on gradient-weighted attention, no LRP): R_qi for
    encoder-decoder detectors, the self-attention rule over all tokens for YOLOS and OWL."""

    name = "relevance"
    dense_only = True

    @classmethod
    def build(cls, context: MethodContext, options: MethodOptions) -> "Relevance":
        return cls(context.gradient_model())

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        inputs = _model_inputs(self.model, image)
        return {self.name: relevance(self.model, image_index=0, query_index=targets.query_index, labels=targets.labels,
                                     **inputs)}
