"""The explanation-method interface: a target ("detection k" = its query, its class, its box),
one image as the methods see it, what a method is built from, and the base every method extends."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from detection.attention.cell_maps import MethodMaps  # noqa: F401 (re-exported: the methods' return type)
from detection.attention.drise_saliency import DriseOptions, ForwardFn
from detection.models.outputs import AttentionRecord


class MethodNotApplicable(ValueError):
    """The method cannot explain this detector's family (the message names the family and the
    methods that do apply)."""


@dataclass(frozen=True)
class Targets:
    """The detections of one image to explain: detection k is query_index[k] with class
    labels[k] (model label index) and box boxes[k] (xyxy, original pixels)."""

    query_index: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "query_index", torch.as_tensor(self.query_index, dtype=torch.int64).reshape(-1))
        object.__setattr__(self, "labels", torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1))
        object.__setattr__(self, "boxes", torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4))
        if not len(self.query_index) == len(self.labels) == len(self.boxes):
            raise ValueError(f"{len(self.query_index)} queries, {len(self.labels)} labels and "
                             f"{len(self.boxes)} boxes: one of each per detection")

    def __len__(self) -> int:
        return len(self.query_index)

    @classmethod
    def from_detections(cls, detections: Any, keep: Sequence[int] | None = None) -> "Targets":
        """Targets of a `Detections` (all, or the indices in `keep`)."""
        index = list(range(len(detections))) if keep is None else list(keep)
        return cls(detections.query_index[index], detections.labels[index], detections.boxes[index])


@dataclass
class ImageInput:
    """One image for the methods. original_size (H, W); attention: the inference pass's record
    (batch of one) or None; images (1, 3, h, w) model input and padding_mask (1, h, w) True =
    pad (`image_to_input` + `pad_batch`), or None when no method needs them."""

    original_size: tuple[int, int]
    attention: AttentionRecord | None = None
    images: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None

    def input_size(self) -> tuple[int, int]:
        """(h_in, w_in): the pre-padding model input size of the image."""
        if self.padding_mask is not None:
            valid = ~self.padding_mask[0]
            return int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())
        if self.attention is not None:
            return tuple(int(v) for v in self.attention.image_sizes[0].tolist())  # type: ignore[return-value]
        raise ValueError("the image input has neither a model input nor an attention record")


def model_family(model: Any) -> str:
    """The detector family's name as messages give it (the contract's `family_name`; the class
    name for an object that does not declare one)."""
    return str(getattr(model, "family_name", None) or type(model).__name__)


def attention_kind(model: Any) -> str | None:
    """"dense" or "sampled": the kind of attention record the detector returns, as it declares it
    (the contract's `attention_kind`; HF families: `Family.attention`); None when it declares none."""
    return getattr(model, "attention_kind", None)


@dataclass(frozen=True)
class MethodOptions:
    """The options a run gives its methods; each method reads the fields it names in `options`.

    layers / heads: raw and rollout choices (`attention.aggregate`); attn_grad_layers: attn-grad's
    layer choices; drise: D-RISE's masks; drise_precision: the precision of D-RISE's forwards
    ("auto": bf16 where the device runs it natively and the family allows it); in_box_power: the
    contrast exponent of in-box maps (None: `attention.methods.in_box.DEFAULT_POWER`).
    """

    layers: Sequence[Any] = ("last", "mean")
    heads: Sequence[Any] = ("mean", "max")
    attn_grad_layers: Sequence[Any] = ("last",)
    drise: DriseOptions = DriseOptions()
    drise_precision: str = "fp32"
    in_box_power: float | None = None


@dataclass
class MethodContext:
    """What a method is built for: the detector, the device, the run's prepared inference model at
    a precision (`forward_at(precision)`, shared with the predictor: prepared once per run), and
    the float32 model every gradient method differentiates (`gradient_model()`: the native DETR's
    prepared fp32 copy, other families' own float32 copy)."""

    model: Any
    device: torch.device
    forward_at: Callable[[str], ForwardFn]
    _gradient_model: torch.nn.Module | None = field(default=None, repr=False)

    def gradient_model(self) -> torch.nn.Module:
        """The float32 model on `device` in eval mode that the gradient methods differentiate
        (`attention.gradients` puts frozen parameters in the graph itself). Native DETR: the run's
        prepared float32 copy (`forward_at("fp32")`, the predictor's own at fp32: no copy of its
        own; transformer and heads are the model's, the backbone BN-folded, which the gradient
        maps never differentiate). Other families: a float32 copy, made on first use."""
        if self._gradient_model is None:
            if getattr(self.model, "gradient_capture", None) == "hooks":
                self._gradient_model = self.forward_at("fp32").model
            else:
                self._gradient_model = copy.deepcopy(self.model).to(self.device).eval()
        return self._gradient_model


class ExplanationMethod:
    """One explanation method. Subclasses set `name` and `options` (the `MethodOptions` fields
    they read), override `refusal` when the method does not apply to every family, and implement
    `build` (how the method makes itself for a run), `choices` and `explain`; the run asks
    `needs_*` what to prepare. A new method is one such class plus its entry in
    `attention.methods.table`.

    needs_attention: the inference pass must return an attention record (self-attention too
    with needs_self_attention); the maps are then made from the record, whose geometry describes
    them. needs_input: `ImageInput.images` / `padding_mask` must be set. needs_features: the
    inference pass should keep the native DETR's backbone-stage output in its record
    (`AttentionRecord.transformer_inputs`), which the method reuses.
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    needs_attention: ClassVar[bool] = False
    needs_self_attention: ClassVar[bool] = False
    needs_input: ClassVar[bool] = False
    needs_features: bool = False

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        """Why the method does not apply to `model`'s family (None: it applies)."""
        return None

    @classmethod
    def build(cls, context: MethodContext, options: MethodOptions) -> "ExplanationMethod":
        """The method made for `context`'s model with the run's options."""
        raise NotImplementedError

    def choices(self) -> list[str]:
        """The names of the maps `explain` returns (keys of metrics.json's `attention`)."""
        return [self.name]

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        """choice -> maps of every target of the image."""
        raise NotImplementedError
