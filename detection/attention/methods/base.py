"""The explanation-method interface: a target ("detection k" = its query, its class, its box),
one image as the methods see it, the maps a method returns, and the base every method extends."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from detection.attention.cell_maps import MethodMaps  # noqa: F401 (re-exported: the methods' return type)
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


def native_detr(model: Any) -> bool:
    """True for the native DETR (decoder layers with hookable torch attention modules)."""
    decoder = getattr(getattr(model, "transformer", None), "decoder", None)
    return decoder is not None and hasattr(decoder, "layers")


def model_family(model: Any) -> str:
    """The detector family's name as messages give it: the title of the model's `family`
    (Hugging Face wrappers), else the family or its config's `model_type`, "DETR (native)" for
    the native DETR, else the class name."""
    family = getattr(model, "family", None)
    if family is not None:
        return str(getattr(family, "title", family))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type:
        return str(model_type)
    return "DETR (native)" if native_detr(model) else type(model).__name__


def attention_kind(model: Any) -> str | None:
    """"dense" or "sampled": the kind of attention record the model returns (its
    `attention_kind` or its family's `attention`; "dense" for the native DETR); None when it
    does not say."""
    kind = getattr(model, "attention_kind", None) or getattr(getattr(model, "family", None), "attention", None)
    if kind is None and native_detr(model):
        return "dense"
    return kind


class ExplanationMethod:
    """One explanation method. Subclasses set `name`, override `refusal` when the method does
    not apply to every detector, `choices` and `explain`; the run asks `needs_*` what to prepare.

    needs_attention: the inference pass must return an attention record (self-attention too
    with needs_self_attention); needs_input: `ImageInput.images` / `padding_mask` must be set.
    """

    name: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False
    needs_self_attention: ClassVar[bool] = False
    needs_input: ClassVar[bool] = False

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        """Why the method does not apply to `model` (None: it applies)."""
        return None

    def choices(self) -> list[str]:
        """The names of the maps `explain` returns (keys of metrics.json's `attention`)."""
        return [self.name]

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        """choice -> maps of every target of the image."""
        raise NotImplementedError
