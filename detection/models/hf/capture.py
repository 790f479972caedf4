"""Which attention capture serves a family: dense weights or sampled deformable points.

Both classes implement one interface (constructor(hf_model, cross=, encoder=, decoder_self=,
keep_graph=), forward_kwargs(), a `with` block around the HF forward, record(outputs, input_size=,
image_sizes=, padding_mask=) -> AttentionRecord, and with keep_graph graph() -> AttentionGraph);
`HFDetector.forward` uses only that.
"""
from __future__ import annotations

import importlib

from detection.models.hf.families import Family

_CAPTURES = {
    "dense": "detection.models.hf.capture_dense:DenseCapture",
    "sampled": "detection.models.hf.capture_sampled:SampledCapture",
}


def capture_class(family: Family) -> type:
    """The capture class for a family's kind of attention ("dense" or "sampled")."""
    module_name, _, class_name = _CAPTURES[family.attention].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
