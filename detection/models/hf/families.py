"""The table of supported Hugging Face detector families, keyed by config.json's `model_type`.

One row per family: which HF class runs it, which image processor its folders use by default,
how its logits become detections, which kind of attention it exposes, whether it takes padded
batches, and whether bf16 on the CPU keeps its detections (scripts/hf_bf16_check.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from detection.models.contract import PostprocessKind

# The first transformers release with every class named below: 5.9.0 (5.8.1 has no RF-DETR;
# DEIMv2 came in 5.7.0, LW-DETR is in 5.0.0; checked in the PyPI wheels). pyproject's `hf`
# extra carries the same floor. The captures read module internals and are tested on the
# version in .venv; on another they fail loudly.
MIN_TRANSFORMERS = "5.9"


@dataclass(frozen=True)
class Family:
    """One HF detector family.

    model_type: config.json's `model_type`. title: its name in messages and the README.
    model_class: the transformers `*ForObjectDetection` class.
    processor_class: the image processor its Hub folders use (preprocessor_config.json's
        `image_processor_type` overrides it where present).
    postprocess: "softmax_no_object", "sigmoid_topk" or "sigmoid_max" (see PostprocessRule);
        top_k: the processor's top-k for sigmoid families (None = the number of queries).
    attention: "dense" (cross-attention over one grid) or "sampled" (deformable points).
    takes_padding: the model reads pixel_mask, so a padded batch gives each image what it
        gets alone (within float tolerance); otherwise only equal-size batches are run.
    cpu_bf16: bf16 autocast on the CPU keeps fp32's top detections (measured, see README).
    prompted: the classes are a text prompt's phrases (open-vocabulary detectors: the model is
        loaded with a prompt, `detection.models.hf.prompted`), not config.json's id2label.
    """

    model_type: str
    title: str
    model_class: str
    processor_class: str
    postprocess: PostprocessKind
    top_k: int | None
    attention: Literal["dense", "sampled"]
    takes_padding: bool
    cpu_bf16: bool = False
    prompted: bool = False


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("yolos", "YOLOS", "YolosForObjectDetection", "YolosImageProcessor",
           "softmax_no_object", None, "dense", takes_padding=False),
    Family("table-transformer", "Table Transformer", "TableTransformerForObjectDetection", "DetrImageProcessor",
           "softmax_no_object", None, "dense", takes_padding=True),
    Family("conditional_detr", "Conditional DETR", "ConditionalDetrForObjectDetection",
           "ConditionalDetrImageProcessor", "sigmoid_topk", 100, "dense", takes_padding=True),
    Family("dab-detr", "DAB-DETR", "DabDetrForObjectDetection", "ConditionalDetrImageProcessor",
           "sigmoid_topk", 100, "dense", takes_padding=True),
    Family("deformable_detr", "Deformable DETR", "DeformableDetrForObjectDetection",
           "DeformableDetrImageProcessor", "sigmoid_topk", 100, "sampled", takes_padding=True),
    Family("rt_detr", "RT-DETR", "RTDetrForObjectDetection", "RTDetrImageProcessor",
           "sigmoid_topk", None, "sampled", takes_padding=False),
    Family("rt_detr_v2", "RT-DETR v2", "RTDetrV2ForObjectDetection", "RTDetrImageProcessor",
           "sigmoid_topk", None, "sampled", takes_padding=False),
    Family("d_fine", "D-FINE", "DFineForObjectDetection", "RTDetrImageProcessor",
           "sigmoid_topk", None, "sampled", takes_padding=False),
    Family("rf_detr", "RF-DETR", "RfDetrForObjectDetection", "RfDetrImageProcessor",
           "sigmoid_topk", None, "sampled", takes_padding=False),
    Family("deimv2", "DEIMv2", "Deimv2ForObjectDetection", "RTDetrImageProcessor",
           "sigmoid_topk", None, "sampled", takes_padding=False),
    # LW-DETR reads pixel_mask in its projector and decoder but not in its windowed ViT, so a
    # padded image does not get what it gets alone: equal sizes only, as RF-DETR
    Family("lw_detr", "LW-DETR", "LwDetrForObjectDetection", "DeformableDetrImageProcessor",
           "sigmoid_topk", 100, "sampled", takes_padding=False),
    # prompted (open-vocabulary): the queries are the image's patch tokens
    Family("owlvit", "OWL-ViT", "OwlViTForObjectDetection", "OwlViTImageProcessor",
           "sigmoid_max", None, "dense", takes_padding=False, prompted=True),
    # prompted: OWL-ViT's queries; each image cut out of the batch and padded to its square inside the model
    Family("owlv2", "OWLv2", "Owlv2ForObjectDetection", "Owlv2ImageProcessor",
           "sigmoid_max", None, "dense", takes_padding=True, prompted=True),
    # prompted: the queries are the decoder's; a phrase's logit is the maximum of its tokens'
    Family("grounding-dino", "Grounding DINO", "GroundingDinoForObjectDetection", "GroundingDinoImageProcessor",
           "sigmoid_max", None, "sampled", takes_padding=True, prompted=True),
    Family("mm-grounding-dino", "MM-Grounding-DINO", "MMGroundingDinoForObjectDetection",
           "GroundingDinoImageProcessor", "sigmoid_max", None, "sampled", takes_padding=True, prompted=True),
    # prompted: each phrase pooled into one embedding; top-k over queries x phrases, then class-wise NMS (omdet.py)
    Family("omdet-turbo", "OmDet-Turbo", "OmDetTurboForObjectDetection", "DetrImageProcessor",
           "sigmoid_topk", None, "sampled", takes_padding=False, prompted=True),
)}

# model_type "detr" folders are converted into the native DETR (models/convert.py) instead.
NATIVE_MODEL_TYPES = ("detr",)


def supported_model_types() -> list[str]:
    """Every model_type a HF folder may have: the native ones and the wrapped families."""
    return sorted(NATIVE_MODEL_TYPES + tuple(FAMILIES))


def family_of(model_type: str | None, origin: str) -> Family:
    """The Family of a model_type, or ValueError naming `origin` and the supported types."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise ValueError(f"{origin}: model_type {model_type!r} is not supported; supported model types: "
                     f"{', '.join(supported_model_types())}")
