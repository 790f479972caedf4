"""A Hugging Face detector behind our detector contract (`detection.models.contract.Detector`).

`HFDetector` holds the transformers `*ForObjectDetection` module unchanged and adds what the
engine, maps and reports need: the processor's PreprocessSpec, the family's PostprocessRule,
attention capture (`detection.models.hf.capture`) and the inference copy.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from detection.models.contract import PostprocessRule, PreprocessSpec
from detection.models.hf.capture import capture_class
from detection.models.hf.families import Family


@dataclass(frozen=True)
class HFDetectorConfig:
    """What consumers read of an HF detector's config (DetectorConfig) plus its identity.

    class_names[i] / category_ids[i]: the name and id of logit column i; the id is the model's
    own label id (its `id2label` key), the name `id2label[id]`.
    source: where the weights came from: "hf:ORG/NAME@COMMIT" for the Hub cache, else the
    folder's path. num_queries: decoder queries (YOLOS: detection tokens).
    """

    name: str
    model_type: str
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    num_queries: int
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["class_names"] = list(self.class_names)
        values["category_ids"] = list(self.category_ids)
        return values

    def replace(self, **changes: Any) -> "HFDetectorConfig":
        return dataclasses.replace(self, **changes)


def image_sizes_from_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool, True on padding (image at the top-left) -> (B, 2) int64 (h, w) unpadded."""
    valid = ~padding_mask
    heights = valid.any(dim=2).sum(dim=1)
    widths = valid.any(dim=1).sum(dim=1)
    return torch.stack([heights, widths], dim=1).to(torch.int64)


class HFDetector(nn.Module):
    """A transformers detector, run through the contract.

    hf_model: the `*ForObjectDetection` module (eval mode). family: its row of FAMILIES.
    preprocess: the PreprocessSpec of its image processor (see hf.folder.processor_spec).
    config: an HFDetectorConfig.
    """

    def __init__(self, hf_model: nn.Module, family: Family, preprocess: PreprocessSpec,
                 config: HFDetectorConfig) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.family = family
        self.config = config
        self._preprocess = preprocess
        queries = config.num_queries
        top_k = family.top_k if family.top_k is not None else queries
        self._postprocess = (PostprocessRule(kind=family.postprocess) if family.postprocess != "sigmoid_topk"
                             else PostprocessRule.sigmoid_topk(top_k))
        self.folded_batch_norms = 0

    gradient_capture = "graph"

    @property
    def family_name(self) -> str:
        return self.family.title

    @property
    def attention_kind(self) -> str:
        """The family's declared kind ("dense" | "sampled"), the one `capture_class` reads too."""
        return self.family.attention

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """The image processor's rule: resize with torchvision on uint8, / 255, mean/std."""
        return self._preprocess

    @property
    def postprocess_rule(self) -> PostprocessRule:
        return self._postprocess

    @property
    def supports_padding(self) -> bool:
        """Whether a padded batch gives each image what it gets alone (the model reads pixel_mask)."""
        return self.family.takes_padding

    def precision_allowed(self, precision: str, device: torch.device) -> bool:
        """fp32 always; bf16 / fp16 on the CPU only for families where it keeps fp32's top
        detections (Family.cpu_bf16, measured by scripts/hf_bf16_check.py); on CUDA, yes."""
        return precision == "fp32" or torch.device(device).type != "cpu" or self.family.cpu_bf16

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                cross_attention: bool = False, encoder_attention: bool = False,
                decoder_self_attention: bool = False, keep_graph: bool = False) -> dict[str, Any]:
        """images (B, 3, H, W) normalised as preprocess_spec says, zero on padding; padding_mask
        (B, H, W) True on padding (None = none). Outputs as the Detector contract states;
        pred_boxes are relative to each image's unpadded extent (HF's convention too).

        keep_graph: also return "attention_graph", the `AttentionGraph` of the attention tensors
        the model multiplied with, in the autograd graph (for gradients; needs an attention flag).
        """
        batch, _, height, width = images.shape
        if padding_mask is None:
            padding_mask = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
        kwargs: dict[str, Any] = {"pixel_values": images}
        if self.family.takes_padding:
            kwargs["pixel_mask"] = (~padding_mask).long()
        elif bool(padding_mask.any()):
            raise ValueError(f"{self.family.title} takes no padding mask: run images of one input size per "
                             "batch (batching 'exact'), not padded batches")
        wanted = cross_attention or encoder_attention or decoder_self_attention
        if keep_graph and not wanted:
            raise ValueError("keep_graph keeps captured attention: ask for some (cross_attention=True)")
        attention = graph = None
        if wanted:
            capture = capture_class(self.family)(self.hf_model, cross=cross_attention, encoder=encoder_attention,
                                                 decoder_self=decoder_self_attention, keep_graph=keep_graph)
            with capture:
                outputs = self.hf_model(**kwargs, **capture.forward_kwargs())
            attention = capture.record(outputs, input_size=(int(height), int(width)),
                                       image_sizes=image_sizes_from_mask(padding_mask),
                                       padding_mask=padding_mask if self.family.takes_padding else None)
            graph = capture.graph() if keep_graph else None
        else:
            outputs = self.hf_model(**kwargs)
        result = {"pred_logits": outputs.logits, "pred_boxes": outputs.pred_boxes, "aux_outputs": [],
                  "attention": attention}
        if keep_graph:
            result["attention_graph"] = graph
        return result

    def prepare_for_inference(self, device: str | torch.device, precision: str, fold_bn: bool = True,
                              channels_last: bool = True, compile: bool = False) -> nn.Module:
        """A deep copy on `device`, eval mode, no gradients. HF modules are run as they are
        (fold_bn and channels_last do not apply; `folded_batch_norms` is 0). bf16 on the CPU
        is refused for families whose detections it changes (Family.cpu_bf16)."""
        device = torch.device(device)
        if not self.precision_allowed(precision, device):
            raise ValueError(f"{precision} on the CPU is not offered for {self.family.title}: it changes the "
                             "top detections beyond tolerance (README, HF families); use fp32")
        if compile:
            raise ValueError(f"compile is not offered for {self.family.title} (HF modules run as they are)")
        model = copy.deepcopy(self).to(device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model
