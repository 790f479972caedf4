"""Inference-only wrapper: a detector's own prepared copy (through the contract), run under
autocast, with float32 outputs. Numerics of the bf16 path: tests/test_fast.py, scripts/bench.py.
"""
from __future__ import annotations

from typing import Any, Literal

import torch

from detection.engine.allocator import retain_freed_memory
from detection.models.contract import Detector
from detection.runtime.device import autocast, precision_dtype, resolve_device

Precision = Literal["fp32", "bf16", "fp16"]


class InferenceModel:
    """A prepared copy of a detector for inference. Call like the model; outputs are float32.

    The copy comes from `model.prepare_for_inference(device, precision, fold_bn, channels_last,
    compile)` (DETR's: models/detr_inference.py); the caller's model is never changed.
    precision: "fp32" | "bf16" | "fp16"; the forward pass runs under its autocast. On the CPU
    the first InferenceModel calls `allocator.retain_freed_memory()` (glibc keeps freed
    activations for reuse instead of page-faulting them in again).
    """

    def __init__(self, model: Detector, device: str | torch.device = "cpu", precision: Precision = "fp32",
                 fold_bn: bool = True, channels_last: bool = True, compile: bool = False) -> None:
        self.dtype = precision_dtype(precision)
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            retain_freed_memory()  # glibc: reuse freed activations instead of re-faulting them
        self.precision = precision
        self.config = model.config
        self.model = model.prepare_for_inference(self.device, precision, fold_bn=fold_bn,
                                                 channels_last=channels_last, compile=compile)
        self.folded_batch_norms = int(getattr(self.model, "folded_batch_norms", 0))

    def autocast(self):
        return autocast(self.device, self.precision)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, padding_mask: torch.Tensor, **flags: bool) -> dict[str, Any]:
        """images (B, 3, H, W) float [0, 1]; padding_mask (B, H, W) True = pad -> model outputs (fp32)."""
        images = images.to(self.device, non_blocking=True)
        padding_mask = padding_mask.to(self.device, non_blocking=True)
        with self.autocast():
            outputs = self.model(images, padding_mask, **flags)
        outputs["pred_logits"] = outputs["pred_logits"].float()
        outputs["pred_boxes"] = outputs["pred_boxes"].float()
        outputs["aux_outputs"] = [{k: v.float() for k, v in aux.items()} for aux in outputs["aux_outputs"]]
        return outputs


class PreparedModels:
    """A run's prepared copies of one detector: one `InferenceModel` per (device, precision), made
    on first use and shared by the predictor and every method that runs at that precision."""

    def __init__(self, model: Detector, fold_bn: bool = True, channels_last: bool = True,
                 compile: bool = False) -> None:
        self.model = model
        self.fold_bn, self.channels_last, self.compile = fold_bn, channels_last, compile
        self._prepared: dict[tuple[str, str], InferenceModel] = {}

    def get(self, device: str | torch.device, precision: Precision) -> InferenceModel:
        """The prepared model on `device` at `precision` (made once)."""
        key = (str(resolve_device(device)), precision)
        if key not in self._prepared:
            self._prepared[key] = InferenceModel(self.model, device, precision, fold_bn=self.fold_bn,
                                                 channels_last=self.channels_last, compile=self.compile)
        return self._prepared[key]

    def release_source(self) -> None:
        """Drop the reference to the unprepared model (its copies stay): a run that loaded the
        model itself frees its weights once every copy it needs is made."""
        self.model = None  # type: ignore[assignment]
