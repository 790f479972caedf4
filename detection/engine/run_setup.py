"""What every predict engine settles before its first image (the single host's `run_predict`,
Ray's driver and model actors): the settings, the usage errors, the model process's predictor and
explanation methods (`build_run_model`), the probe, the inputs and the run's fingerprint
(`check_inputs`), and the summary a finished run reports."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detection.attention.methods import DEFAULT_METHOD, attention_kind
from detection.data.images import DEFAULT_MAX_PIXELS
from detection.data.sources import expand_sources
from detection.engine.display import DisplaySpec
from detection.engine.explain import MethodRunner
from detection.engine.fast import PreparedModels
from detection.engine.image_files import OutputOptions
from detection.engine.model_failure import ModelRunError, probe
from detection.engine.predict_methods import ExplainOptions, build_predict_methods
from detection.engine.predictor import Predictor, PredictorSettings
from detection.models.digest import weights_digest
from detection.runfolder.versions import GRIDS_NPZ_FORMAT, MAPS_FORMAT_KEY, MAPS_NPZ_FORMAT, TOKENS_NPZ_FORMAT
from detection.text import plural, size
from detection.version import __version__


class PredictUsageError(ValueError):
    """The run cannot start: the device or model is not usable, there are no inputs, OUT is a
    file, another live run is writing OUT, or OUT holds a run made with other settings.
    Nothing was written."""


class PredictInterrupted(Exception):
    """SIGTERM / SIGINT stopped the run after the images in flight; rerunning resumes it."""


@dataclass
class PredictSettings:
    """Everything a predict run needs besides the model (see `detr-attn predict --help`)."""

    inputs: list[str]
    out: str
    model: str = "demo"
    list_files: tuple[str, ...] = ()
    score_threshold: float = 0.7
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 4
    workers: int = 2
    batching: str = "exact"
    outputs: OutputOptions = None  # type: ignore[assignment]
    video_stride: int = 1
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    fold_bn: bool = True
    channels_last: bool = True
    compile: bool = False
    writer_threads: int = 2
    overwrite: bool = False
    progress: bool = True
    #: --explain (None: not given, the attention maps only; see engine.predict_methods)
    explain: ExplainOptions | None = None
    #: --prompt / --prompt-file: the phrases of an open-vocabulary detector (None: a closed-set model)
    prompt: tuple[str, ...] | None = None


@dataclass
class PredictSummary:
    """What a finished run wrote. Counts are those of the whole run folder after the merge
    (on rank 0; other ranks of a torchrun run report zeros and `is_main=False`)."""

    out: Path
    images: int = 0
    errors: int = 0
    detections: int = 0
    is_main: bool = True
    #: Bytes in the run folder when it finished (every output, this run's and a resumed one's);
    #: None where not summed (a run folder in an object store).
    bytes: int | None = None

    def text(self) -> str:
        """The one-line summary a user reads: '6 images, 27 detections, 0 errors -> OUT (106 MB)'."""
        written = f" ({size(self.bytes)})" if self.bytes is not None else ""
        return (f"{plural(self.images, 'image')}, {plural(self.detections, 'detection')}, "
                f"{plural(self.errors, 'error')} -> {self.out}{written}")


def run_fingerprint(settings: PredictSettings, model: torch.nn.Module, precision: str) -> dict[str, Any]:
    """Settings that change what is written; resuming with others is refused."""
    out = settings.outputs
    return {
        "model": settings.model,
        "weights_sha256": weights_digest(model),
        "model_config": model.config.to_dict(),
        "score_threshold": settings.score_threshold,
        "precision": precision,
        "batching": settings.batching,
        "video_stride": settings.video_stride,
        "max_pixels": settings.max_pixels,
        "overlays": out.overlays,
        "save_attention": out.save_attention,
        "format": out.image_format,
        "heads": out.heads,
        "layers": out.layers,
        "normalize": out.normalize,
        # the point view changes the per-detection overlays only: default runs resume as before
        **({"overlay_style": out.overlay_style} if out.overlay_style != "heatmap" else {}),
        # the viewer's grids (runfolder.grids): only with --save-attention, so runs without it resume
        # as before
        **({"grids": {"format": GRIDS_NPZ_FORMAT, "budget_bytes": out.grid_budget,
                      "encoder_attention": out.save_encoder_attention}} if out.save_attention else {}),
        # the maps npz format (attention.maps): a folder of format-1 npz is not resumed into
        **({MAPS_FORMAT_KEY: MAPS_NPZ_FORMAT} if out.save_attention else {}),
        # overlays' long side (None = original): only with --overlays
        **({"overlay_size": out.overlay_size} if out.overlays else {}),
        # the explanation methods: only with --explain, so runs without it resume as before
        **({"explain": settings.explain.fingerprint()} if settings.explain is not None else {}),
        # the prompt of an open-vocabulary detector: only then, so closed-set runs resume as before
        **({"prompt": list(settings.prompt)} if settings.prompt is not None else {}),
        # its token scores' npz format, when they are written (with --save-attention)
        **({"tokens_format": TOKENS_NPZ_FORMAT} if settings.prompt is not None and out.save_attention else {}),
    }


def start_run_info(settings: PredictSettings, fingerprint: dict[str, Any], config: Any, source: str,
                   device: torch.device, **engine: Any) -> dict[str, Any]:
    """run.json of a run that starts ("status": "running"): the fingerprint, the model and its
    classes, the inputs, the settings that do not change outputs (`engine`: world_size and the
    engine's own, e.g. engine="ray"), the versions."""
    return {
        "status": "running",
        "fingerprint": fingerprint,
        "model": settings.model,
        "model_source": source,
        "class_names": list(config.class_names),
        "category_ids": list(config.category_ids),
        "inputs": list(settings.inputs) + [f"@{f}" for f in settings.list_files],
        "settings": {"device": str(device), "batch_size": settings.batch_size,
                     "workers": settings.workers, "fold_bn": settings.fold_bn,
                     "channels_last": settings.channels_last, "compile": settings.compile, **engine},
        "versions": run_versions(),
    }


def run_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "detection": __version__, "platform": platform.platform()}


def build_run_model(settings: PredictSettings, model: torch.nn.Module, device: torch.device
                    ) -> tuple[Predictor, MethodRunner | None, PreparedModels]:
    """The predictor and methods of a model process (every engine's): one prepared copy per
    (device, precision), shared by both. PredictUsageError when an option does not apply."""
    if settings.outputs.overlay_style == "points" and attention_kind(model) != "sampled":
        raise PredictUsageError("--overlay-style points draws deformable sampling points; this model's "
                                "attention is dense (use the default heatmap style)")
    prepared = PreparedModels(model, fold_bn=settings.fold_bn, channels_last=settings.channels_last,
                              compile=settings.compile)
    try:
        runner = build_predict_methods(model, settings.explain, settings.outputs, device, prepared)
    except ValueError as err:  # MethodNotApplicable names the family and the methods that apply
        raise PredictUsageError(f"--explain: {err}" if settings.explain is not None else str(err)) from err
    return _make_predictor(settings, model, device, runner, prepared), runner, prepared


def check_inputs(settings: PredictSettings, model: torch.nn.Module, predictor: Predictor, items: list | None = None
                 ) -> tuple[list, dict[str, Any]]:
    """Before anything is written: the probe (a model that cannot run is a usage error about the model), the
    inputs (`items`, else expanded; none, or none runnable: a usage error) and the run's fingerprint."""
    try:
        probe(predictor)
    except ModelRunError as err:
        raise PredictUsageError(f"--model {settings.model}: {err}") from err
    items = expand_sources(settings.inputs, settings.list_files, video_stride=settings.video_stride) \
        if items is None else items
    if not items:
        raise PredictUsageError("no inputs given")
    if all(item.error is not None for item in items):  # nothing to run: say why, write nothing
        raise PredictUsageError("no image to run on: " + "; ".join(f"{item.file}: {item.error}" for item in items))
    return items, run_fingerprint(settings, model, predictor.precision)


def _make_predictor(settings: PredictSettings, model: torch.nn.Module, device: torch.device,
                    runner: MethodRunner | None, prepared: PreparedModels) -> Predictor:
    options = settings.outputs
    # an --explain method that reads the record (the attention maps of --layers last need only the last layer)
    method_attention = runner is not None and any(method.needs_attention for key, method in zip(runner.keys, runner.methods)
                                                  if key != DEFAULT_METHOD)
    return Predictor(model, PredictorSettings(
        device=device, precision=settings.precision, batch_size=settings.batch_size, num_workers=settings.workers,
        score_threshold=settings.score_threshold, cross_attention=options.needs_maps or method_attention,
        batching=settings.batching,
        # the full-resolution image only for methods that run the model on it: the writers
        # draw on display images the decoding workers make (engine.display)
        keep_images=(runner is not None and runner.needs_input)
        or (options.save_attention and hasattr(model, "prompt_layout")),  # token scores run the model on it
        keep_features=(runner is not None and runner.needs_features)
        or (options.save_attention and hasattr(model, "prompt_layout")),  # token scores reuse the pass
        display=DisplaySpec(overlays=options.overlays, overlay_size=options.overlay_size,
                            viewer_jpeg=options.save_attention) if options.needs_maps else None,
        rollout=options.save_encoder_attention or (runner is not None and runner.needs_self_attention),
        fold_bn=settings.fold_bn, channels_last=settings.channels_last, compile=settings.compile,
        max_pixels=settings.max_pixels, video_stride=settings.video_stride,
        # the viewer's grids keep every layer
        last_layer_only=options.layers == "last" and not options.save_attention and not method_attention),
        prepared=prepared)
