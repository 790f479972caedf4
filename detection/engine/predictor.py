"""`Predictor`: the batch prediction Python API. Inputs are planned into batches, decoded in
worker processes, run through the prepared model and post-processed into `PredictionResult`s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from detection.data.images import DEFAULT_MAX_PIXELS
from detection.data.preprocess import image_to_input, pad_batch
from detection.engine.display import DisplayImages, DisplaySpec
from detection.engine.fast import PreparedModels
from detection.engine.model_failure import ModelRunError, describe_failure
from detection.engine.loading import BatchLoadingDataset, LoadedBatch, Sample, make_loader
from detection.engine.planning import PlannedBatch, plan_batches, probe_sizes
from detection.data.sources import SourceItem, expand_sources
from detection.models.outputs import AttentionRecord
from detection.postprocess import postprocess
from detection.runtime.device import resolve_device, resolve_precision
from detection.structures import Detections



@dataclass
class PredictionResult:
    """The outcome for one input item.

    detections: boxes xyxy in original pixels (None when `error`).
    attention: this image's AttentionRecord (batch dimension 1) when cross-attention was
        requested (`Predictor(cross_attention=True)`).
    image: uint8 (H, W, 3) RGB original pixels when `keep_images` was set.
    display: the images the writers draw on (`engine.display`) when `display` was set.
    """

    item: SourceItem
    original_size: tuple[int, int] | None = None
    detections: Detections | None = None
    attention: AttentionRecord | None = None
    error: str | None = None
    image: np.ndarray | None = None
    display: DisplayImages | None = None

    @property
    def path(self) -> str:
        return self.item.file


@dataclass(frozen=True)
class PredictorSettings:
    """How a `Predictor` runs (defaults: one image at a time on the CPU in fp32, threshold 0.7).

    device: "cpu" | "cuda" | "cuda:N" | "auto". precision: "fp32" | "bf16" | "fp16" | "auto"
        (see `detection.runtime.device`; "auto" falls back to fp32 where the family refuses it).
    batch_size / batching: see `detection.engine.planning` ("exact" keeps every result equal
        to running the image alone; "padded" groups by aspect ratio and pads).
    num_workers: DataLoader processes decoding + resizing (0 = in this process).
    cross_attention: also return each image's AttentionRecord with the decoder cross-attention
        of every layer and head; `rollout=True` adds decoder and encoder self-attention.
    keep_images: also return the decoded RGB image.
    keep_features: the records also carry the native DETR's backbone-stage output
        (`AttentionRecord.transformer_inputs`), which the gradient methods reuse (implies a record;
        float32 passes only: the gradient maps do not reuse a bf16 / fp16 pass's features).
    display: also return the display images (`engine.display.DisplaySpec`: the overlay base, the
        viewer's JPEG), made in the decoding workers.
    last_layer_only: keep only the last decoder layer in the returned records (L = 1).
    fold_bn / channels_last / compile: the model's preparation (`Detector.prepare_for_inference`).
    max_pixels / video_stride: the loader's image-size guard and the frame step of videos.
    """

    device: str | torch.device = "cpu"
    precision: str = "fp32"
    batch_size: int = 1
    num_workers: int = 0
    score_threshold: float = 0.7
    cross_attention: bool = False
    batching: str = "exact"
    keep_images: bool = False
    keep_features: bool = False
    rollout: bool = False
    fold_bn: bool = True
    channels_last: bool = True
    compile: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    video_stride: int = 1
    last_layer_only: bool = False
    display: DisplaySpec | None = None


class Predictor:
    """Run a detector over many images in planned batches with worker-process decoding.

    model: a detector implementing `detection.models.contract.Detector` (its `config` gives
        class names and category ids; `preprocess_spec` and `postprocess_rule` its input and
        output rules). settings: a `PredictorSettings`.
    prepared: the run's `PreparedModels` of `model` (the predictor takes its copy at its device
        and precision from there, so methods at the same precision share it); None: its own.
    """

    def __init__(self, model: torch.nn.Module, settings: PredictorSettings = PredictorSettings(),
                 prepared: PreparedModels | None = None) -> None:
        if settings.batching not in ("exact", "padded"):
            raise ValueError(f"batching must be 'exact' or 'padded', got {settings.batching!r}")
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.precision = resolve_precision(settings.precision, self.device)
        if settings.precision == "auto" and not model.precision_allowed(self.precision, self.device):
            self.precision = "fp32"
        if settings.batching == "padded" and not model.supports_padding:
            raise ValueError("this detector takes no padding mask, so padded batches would change its "
                             "detections: use batching 'exact'")
        self.config = model.config
        self.preprocess = model.preprocess_spec
        self.postprocess_rule = model.postprocess_rule
        prepared = prepared or PreparedModels(model, fold_bn=settings.fold_bn, channels_last=settings.channels_last,
                                              compile=settings.compile)
        self.engine = prepared.get(self.device, self.precision)
        self.batch_size = int(settings.batch_size)
        self.num_workers = int(settings.num_workers)
        self.score_threshold = float(settings.score_threshold)
        self.keep_features = bool(settings.keep_features) and self.precision == "fp32"
        self.cross_attention = bool(settings.cross_attention or settings.rollout or self.keep_features)
        self.rollout = bool(settings.rollout)
        self.batching = settings.batching
        self.keep_images = settings.keep_images
        self.display = settings.display
        self.max_pixels = settings.max_pixels
        self.video_stride = settings.video_stride
        # keep only the last decoder layer's cross-attention (what layers="last" maps use):
        # 1/L of the memory and of the device -> host copy on GPU
        self.last_layer_only = bool(settings.last_layer_only) and not self.rollout
        self.model_seconds = 0.0

    # -- planning -----------------------------------------------------------------------
    def expand(self, inputs: Sequence[str | Path | SourceItem]) -> list[SourceItem]:
        if inputs and all(isinstance(i, SourceItem) for i in inputs):
            return list(inputs)  # type: ignore[arg-type]
        return expand_sources([str(i) for i in inputs], video_stride=self.video_stride)

    def plan(self, items: Sequence[SourceItem]) -> tuple[list[SourceItem], list[PlannedBatch]]:
        """Probe headers (errors become item.error) and plan the batches of all items."""
        probed = probe_sizes(items, max_pixels=self.max_pixels)
        plan = plan_batches(probed, self.batch_size, self.preprocess, self.batching)
        return probed, plan

    # -- running ------------------------------------------------------------------------
    def run(self, inputs: Sequence[str | Path | SourceItem]) -> Iterator[PredictionResult]:
        """Predict every input (files, folders, globs, @lists, videos); one result per item,
        errors included (result.error set), in processing order."""
        items, plan = self.plan(self.expand(inputs))
        for item in items:
            if item.error is not None:
                yield PredictionResult(item, error=item.error)
        yield from self.run_plan(plan)

    def run_plan(self, plan: Sequence[PlannedBatch], skip_keys: frozenset[str] | set[str] = frozenset()
                 ) -> Iterator[PredictionResult]:
        """Run planned batches; batches whose items are all in `skip_keys` are not run, and
        no result is yielded for a skipped key (a partly done batch runs whole, so its
        numbers equal those of an uninterrupted run)."""
        todo = [b for b in plan if not all(it.key in skip_keys for it in b.items)]
        if not todo:
            return
        dataset = BatchLoadingDataset(todo, self.preprocess, keep_rgb=self.keep_images, max_pixels=self.max_pixels,
                                      display=self.display)
        workers = min(self.num_workers, len(dataset.units()))
        for loaded in make_loader(dataset, workers):
            yield from self._run_loaded(loaded, skip_keys)

    def _groups(self, samples: list[Sample]) -> list[list[Sample]]:
        if self.batching == "padded":
            return [samples] if samples else []
        by_shape: dict[tuple[int, ...], list[Sample]] = {}
        for sample in samples:  # the plan grouped by header size; decoding is the truth
            by_shape.setdefault(tuple(sample.image.shape), []).append(sample)
        return list(by_shape.values())

    def predict_tensors(self, images: list[torch.Tensor], original_sizes: list[tuple[int, int]]
                        ) -> tuple[list[Detections], AttentionRecord | None]:
        """Model + postprocess on already preprocessed inputs (3, h_i, w_i) in [0, 1].

        Returns one Detections per image (boxes xyxy in original pixels) and the batch's
        AttentionRecord (on the CPU) or None when no attention was requested.
        """
        batch, mask = pad_batch(images, self.preprocess.size_divisibility)
        start = time.perf_counter()
        try:
            outputs = self.engine(batch, mask, cross_attention=self.cross_attention,
                                  decoder_self_attention=self.rollout, encoder_attention=self.rollout,
                                  **({"keep_features": True} if self.keep_features else {}))
        except Exception as error:  # noqa: BLE001 - the model's own code failed: say where, per image
            raise ModelRunError(describe_failure(error, tuple(batch.shape[-2:]))) from error
        detections = postprocess(outputs, torch.tensor(original_sizes), self.config.class_names,
                                 self.score_threshold, rule=self.postprocess_rule)
        self.model_seconds += time.perf_counter() - start
        record = outputs["attention"]
        if record is not None and self.last_layer_only:
            record = record.keep_last_layer()
        if record is not None and record.device.type != "cpu":
            record = record.to("cpu")
        return detections, record

    def predict_arrays(self, images: Sequence[np.ndarray]) -> tuple[list[Detections], AttentionRecord | None]:
        """`predict_tensors` on decoded uint8 (H, W, 3) RGB images (what `load_image` gives a file),
        resized by the model's rule as the loader does; images of different sizes are padded together."""
        return self.predict_tensors([image_to_input(rgb, self.preprocess) for rgb in images],
                                    [(int(rgb.shape[0]), int(rgb.shape[1])) for rgb in images])

    def _run_loaded(self, loaded: LoadedBatch, skip_keys) -> Iterator[PredictionResult]:
        for sample in loaded.samples:
            if sample.error is not None and sample.item.key not in skip_keys:
                yield PredictionResult(sample.item, error=sample.error)
        good = [s for s in loaded.samples if s.error is None]
        for group in self._groups(good):
            try:
                detections, record = self.predict_tensors([s.image for s in group], [s.original_size for s in group])
            except ModelRunError as error:  # this batch's images fail; the run goes on
                yield from (PredictionResult(s.item, error=str(error)) for s in group if s.item.key not in skip_keys)
                continue
            for index, sample in enumerate(group):
                if sample.item.key in skip_keys:
                    continue
                yield PredictionResult(
                    sample.item, original_size=sample.original_size, detections=detections[index],
                    attention=None if record is None else record.select_image(index), image=sample.rgb,
                    display=sample.display)

