"""The detector contract: what engine, evaluation, maps, metrics and reports may use of a model.

A detector states its preprocessing (`PreprocessSpec`) and post-processing (`PostprocessRule`),
runs `forward(images, padding_mask, ...)`, and prepares its own fast inference copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

ResizeRule = Literal["shortest_edge", "longest_edge", "fixed", "none"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]
PostprocessKind = Literal["softmax_no_object", "sigmoid_topk", "sigmoid_max"]
SizeRounding = Literal["detr", "hf", "yolos"]
ResizeBackend = Literal["opencv", "torch", "torchvision"]


@dataclass(frozen=True)
class PreprocessSpec:
    """How a detector wants a uint8 RGB image turned into its input tensor (3, h, w).

    resize:
      "shortest_edge": the shorter side becomes `min_size`; if the longer side would then
          exceed `max_size` (None = no cap) the shorter side is reduced so that it does not,
          with DETR's rounding (facebookresearch/detr `get_size_with_aspect_ratio`): an image
          already at the target is left as it is;
      "longest_edge": the longer side becomes `max_size`, the shorter one keeps the aspect ratio
          (rounded to the nearest pixel, at least 1);
      "fixed": exactly `fixed_size` = (height, width), aspect ratio not kept;
      "none": the image at its own size (the model resizes inside, as OWLv2 pads each image to a
          square before its resize: `detection.models.hf.owlv2`).
    interpolation / antialias: antialias=False resizes the uint8 image with OpenCV
      (`cv2.resize`, INTER_LINEAR / INTER_CUBIC / INTER_NEAREST: pixel centres at +0.5, no
      low-pass filter when shrinking, result rounded back to uint8), then converts to float32
      and divides by 255 -- exactly what DETR runs. antialias=True converts to float32 / 255
      first and resizes with `torch.nn.functional.interpolate(..., antialias=True)` (bilinear
      or bicubic; its filter widens with the shrink factor).
    mean / std: per-channel RGB normalisation applied by the preprocessing, `(x - mean) / std`
      on the [0, 1] input; None when the model normalises inside. DETR does: its
      `image_mean` / `image_std` are non-persistent buffers from its config (so training and
      inference cannot drift apart) and it zeroes padding after normalising, so its spec has
      mean = std = None and the input stays in [0, 1].
    size_divisibility: batches are padded (bottom/right) to a multiple of this (1 = none).
    size_rounding (shortest_edge only): "detr" as above; "hf" transformers'
      `get_size_with_aspect_ratio` (when capped, the longer side is computed from the UNROUNDED
      shorter side and truncated: it can differ from "detr" by one pixel); "yolos" transformers'
      `get_size_with_aspect_ratio_yolos` (the "hf" size, both sides then floored to a multiple
      of 16).
    backend: None = chosen by `antialias` (OpenCV without, torch float with, as above);
      "torchvision": what transformers' torchvision image processors run -- the uint8 (3, h, w)
      tensor resized by `torchvision.transforms.v2.functional.resize(..., antialias=antialias)`
      (uint8 in, uint8 out, rounded; "nearest" is its NEAREST_EXACT, PIL's nearest, as
      transformers maps it), then / 255 and normalised.
    """

    resize: ResizeRule = "shortest_edge"
    min_size: int | None = 800
    max_size: int | None = 1333
    fixed_size: tuple[int, int] | None = None
    interpolation: Interpolation = "bilinear"
    antialias: bool = False
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    size_divisibility: int = 1
    size_rounding: SizeRounding = "detr"
    backend: ResizeBackend | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.resize == "shortest_edge" and not (self.min_size and self.min_size > 0):
            problems.append("shortest_edge needs min_size > 0")
        elif self.resize == "longest_edge" and not (self.max_size and self.max_size > 0):
            problems.append("longest_edge needs max_size > 0")
        elif self.resize == "fixed" and not (self.fixed_size and len(self.fixed_size) == 2
                                             and min(self.fixed_size) > 0):
            problems.append("fixed needs fixed_size = (height, width) > 0")
        elif self.resize not in ("shortest_edge", "longest_edge", "fixed", "none"):
            problems.append(f"resize {self.resize!r} is not shortest_edge, longest_edge, fixed or none")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            problems.append(f"interpolation {self.interpolation!r} is not bilinear, bicubic or nearest")
        if self.antialias and self.interpolation == "nearest" and self.backend != "torchvision":
            problems.append("antialias needs bilinear or bicubic interpolation")
        if (self.mean is None) != (self.std is None):
            problems.append("give both mean and std, or neither")
        elif self.mean is not None and (len(self.mean) != 3 or len(self.std) != 3):
            problems.append("mean and std need 3 values (RGB)")
        if self.size_divisibility < 1:
            problems.append("size_divisibility must be >= 1")
        if self.size_rounding not in ("detr", "hf", "yolos"):
            problems.append(f"size_rounding {self.size_rounding!r} is not detr, hf or yolos")
        if self.backend not in (None, "opencv", "torch", "torchvision"):
            problems.append(f"backend {self.backend!r} is not opencv, torch or torchvision")
        elif self.backend == "opencv" and self.antialias:
            problems.append("the opencv backend has no antialias")
        if problems:
            raise ValueError("invalid PreprocessSpec: " + "; ".join(problems))

    @property
    def resize_backend(self) -> ResizeBackend:
        """The backend that resizes: `backend`, or OpenCV / torch as `antialias` says."""
        if self.backend is not None:
            return self.backend
        return "torch" if self.antialias else "opencv"

    @classmethod
    def shortest_edge(cls, min_size: int, max_size: int | None, **options: Any) -> "PreprocessSpec":
        """DETR's rule: shorter side -> min_size, longer side capped at max_size."""
        return cls(resize="shortest_edge", min_size=min_size, max_size=max_size, **options)

    @classmethod
    def longest_edge(cls, size: int, **options: Any) -> "PreprocessSpec":
        """Longer side -> size, aspect ratio kept."""
        return cls(resize="longest_edge", min_size=None, max_size=size, **options)

    @classmethod
    def fixed(cls, height: int, width: int, **options: Any) -> "PreprocessSpec":
        """Every image resized to (height, width)."""
        return cls(resize="fixed", min_size=None, max_size=None, fixed_size=(height, width), **options)

    @classmethod
    def unresized(cls, **options: Any) -> "PreprocessSpec":
        """Every image at its own size (the model resizes inside)."""
        return cls(resize="none", min_size=None, max_size=None, **options)


@dataclass(frozen=True)
class PostprocessRule:
    """How a detector's logits become scored detections (boxes are the same for every rule).

    "softmax_no_object" (DETR): pred_logits (B, Q, C + 1); softmax over all C + 1, drop the last
        ("no object"), the best of the C remaining gives each query one (score, label).
    "sigmoid_topk" (Deformable DETR, RT-DETR, D-FINE): pred_logits (B, Q, C); independent
        sigmoid per class, then the `top_k` best of all Q x C (query, class) pairs, so one
        query may give several detections (one per class).
    "sigmoid_max" (OWL-ViT, OWLv2: HF's `post_process_object_detection`): pred_logits (B, Q, C);
        sigmoid of each query's best class logit gives it one (score, label).
    Either way every detection keeps `query_index`, the query it came from, and only scores
    strictly above the caller's threshold are kept.
    class_nms_iou: then non-maximum suppression per class at this IoU, in original pixels, and
        the kept boxes clipped to the image (OmDet-Turbo: HF's `post_process_grounded_object_detection`);
        None (the default): neither.
    """

    kind: PostprocessKind = "softmax_no_object"
    top_k: int = 100
    class_nms_iou: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("softmax_no_object", "sigmoid_topk", "sigmoid_max"):
            raise ValueError(f"PostprocessRule kind {self.kind!r} is not softmax_no_object, sigmoid_topk or "
                             "sigmoid_max")
        if self.top_k < 1:
            raise ValueError(f"PostprocessRule top_k must be >= 1, got {self.top_k}")
        if self.class_nms_iou is not None and not 0.0 <= self.class_nms_iou <= 1.0:
            raise ValueError(f"PostprocessRule class_nms_iou must be in [0, 1], got {self.class_nms_iou}")

    @classmethod
    def softmax_no_object(cls) -> "PostprocessRule":
        return cls(kind="softmax_no_object")

    @classmethod
    def sigmoid_topk(cls, top_k: int = 100) -> "PostprocessRule":
        return cls(kind="sigmoid_topk", top_k=top_k)

    @classmethod
    def sigmoid_max(cls) -> "PostprocessRule":
        return cls(kind="sigmoid_max")

    def logit_classes(self, num_classes: int) -> int:
        """Width of pred_logits for `num_classes` real classes (C + 1 or C)."""
        return num_classes + 1 if self.kind == "softmax_no_object" else num_classes

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """pred_logits (..., C + 1 or C) -> float32 (..., C) probability of each real class:
        softmax over all classes without the no-object column, or an independent sigmoid."""
        if self.kind == "softmax_no_object":
            return logits.float().softmax(-1)[..., :-1]
        return logits.float().sigmoid()


@runtime_checkable
class DetectorConfig(Protocol):
    """The part of a detector's config consumers may read: label index i is named
    class_names[i] and has dataset category id category_ids[i]."""

    class_names: Sequence[str]
    category_ids: Sequence[int]


@runtime_checkable
class Detector(Protocol):
    """What every detector offers; consumers use nothing else of the model.

    config: a DetectorConfig (class_names, category_ids).
    preprocess_spec: PreprocessSpec of its inputs. postprocess_rule: PostprocessRule of its logits.
    forward(images, padding_mask, *, cross_attention, encoder_attention, decoder_self_attention):
        images (B, 3, H, W) float RGB (in [0, 1] when preprocess_spec.mean is None), each image
        at the top-left, padded bottom/right; padding_mask (B, H, W) bool, True on padding.
        Returns {"pred_logits": (B, Q, K) raw logits (K per postprocess_rule.logit_classes),
        "pred_boxes": (B, Q, 4) cxcywh in [0, 1] of each image's unpadded extent,
        "aux_outputs": list of {"pred_logits", "pred_boxes"} of earlier decoder layers,
        "attention": AttentionRecord when any flag is set, else None}.
    supports_padding: True when a padded batch gives each image what it gets alone (the model
        reads padding_mask); False: only batches of one input size are run.
    precision_allowed(precision, device): whether that precision keeps the detector's top
        detections on that device; "auto" precision falls back to fp32 where it does not.
    prepare_for_inference(device, precision, fold_bn, channels_last, compile): a prepared COPY
        for inference only (self unchanged), on `device`, eval mode, no gradients, with the
        detector's own fast-path changes; called like forward. It carries
        `folded_batch_norms` (int): batch norms folded into convolutions.
    family_name: the family as messages name it ("DETR (native)", "RT-DETR", ...).
    attention_kind: "dense" (cross-attention weights over one feature grid) or "sampled"
        (deformable sampling points): the kind of `AttentionRecord` forward returns.
    gradient_capture: how the gradient methods reach the attention tensors the forward used:
        "hooks" (forward hooks on torch attention modules), "graph" (forward(..., keep_graph=True)
        returns them) or None (no gradient methods).
    """

    config: Any
    family_name: str
    attention_kind: str
    gradient_capture: str | None

    @property
    def preprocess_spec(self) -> PreprocessSpec: ...

    @property
    def postprocess_rule(self) -> PostprocessRule: ...

    @property
    def supports_padding(self) -> bool: ...

    def precision_allowed(self, precision: str, device: torch.device) -> bool: ...

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                cross_attention: bool = False, encoder_attention: bool = False,
                decoder_self_attention: bool = False) -> dict[str, Any]: ...

    def prepare_for_inference(self, device: str | torch.device, precision: str, fold_bn: bool = True,
                              channels_last: bool = True, compile: bool = False) -> nn.Module: ...
