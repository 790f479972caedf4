"""Batch prediction: `Predictor` (Python API) and the `detr-attn predict` verb.

Data path: inputs --sources.expand_sources--> items --planning--> planned batches
--loading (DataLoader workers: safe decode + resize)--> padded batch + padding mask
--fast.InferenceModel--> outputs --postprocess--> Detections (+ attention of each image)
--writers--> OUT/ (journals, npz maps, overlays; merged at the end).

Exit status of `detr-attn predict`: 0 every input processed; 1 some inputs could not be
processed (listed in OUT/errors.jsonl; all others were); 2 usage error (bad option, model
not loadable, no inputs, OUT holds a run with other settings); 3 the run crashed (rerun the
same command to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from detection.data.images import DEFAULT_MAX_PIXELS
from detection.data.preprocess import pad_batch
from detection.engine.distributed import DistContext, init_from_env
from detection.engine.fast import InferenceModel, cpu_supports_bf16, resolve_device
from detection.engine.loading import BatchLoadingDataset, LoadedBatch, Sample, make_loader
from detection.engine.planning import PlannedBatch, plan_batches, probe_sizes, shard_plan
from detection.engine.sources import SourceItem, expand_sources
from detection.engine.writers import RUN_FILE, RunFolder, RunFolderMismatch
from detection.io import write_bytes_atomic, write_json_atomic
from detection.models.outputs import AttentionRecord
from detection.structures import Detections

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 3


@dataclass
class PredictionResult:
    """The outcome for one input item.

    detections: boxes xyxy in original pixels (None when `error`).
    attention: this image's AttentionRecord (batch dimension 1) when attention was requested.
    image: uint8 (H, W, 3) RGB original pixels when `keep_images` was set.
    """

    item: SourceItem
    original_size: tuple[int, int] | None = None
    detections: Detections | None = None
    attention: AttentionRecord | None = None
    error: str | None = None
    image: np.ndarray | None = None

    @property
    def path(self) -> str:
        return self.item.file


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware runs it natively (CUDA with bf16, CPU with
    AVX512-BF16/AMX), else fp32. Explicit choices pass through."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


class Predictor:
    """Run a DETR over many images in planned batches with worker-process decoding.

    model: a DETR (its `config` gives class names, category ids and min_size/max_size).
    device: "cpu" | "cuda" | "cuda:N" | "auto". precision: "fp32" | "bf16" | "fp16" | "auto".
    batch_size / batching: see `detection.engine.planning` ("exact" keeps every result equal
        to running the image alone; "padded" groups by aspect ratio and pads).
    num_workers: DataLoader processes decoding + resizing (0 = in this process).
    attention: also return each image's AttentionRecord (decoder cross-attention of every
        layer and head); `rollout=True` adds decoder and encoder self-attention.
    keep_images: also return the decoded RGB image (for overlays).
    last_layer_only: keep only the last decoder layer in the returned records (L = 1).
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", precision: str = "fp32",
                 batch_size: int = 1, num_workers: int = 0, score_threshold: float = 0.7,
                 attention: bool = False, batching: str = "exact", keep_images: bool = False,
                 rollout: bool = False, fold_bn: bool = True, channels_last: bool = True,
                 compile: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 video_stride: int = 1, last_layer_only: bool = False) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.config = model.config
        self.engine = InferenceModel(model, self.device, self.precision, fold_bn=fold_bn,
                                     channels_last=channels_last, compile=compile)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.score_threshold = float(score_threshold)
        self.attention = bool(attention or rollout)
        self.rollout = bool(rollout)
        self.batching = batching
        self.keep_images = keep_images
        self.max_pixels = max_pixels
        self.video_stride = video_stride
        # keep only the last decoder layer's cross-attention (what layers="last" maps use):
        # 1/L of the memory and of the device -> host copy on GPU
        self.last_layer_only = bool(last_layer_only) and not self.rollout
        self.model_seconds = 0.0
        if batching not in ("exact", "padded"):
            raise ValueError(f"batching must be 'exact' or 'padded', got {batching!r}")

    # -- planning -----------------------------------------------------------------------
    def expand(self, inputs: Sequence[str | Path | SourceItem]) -> list[SourceItem]:
        if inputs and all(isinstance(i, SourceItem) for i in inputs):
            return list(inputs)  # type: ignore[arg-type]
        return expand_sources([str(i) for i in inputs], video_stride=self.video_stride)

    def plan(self, items: Sequence[SourceItem]) -> tuple[list[SourceItem], list[PlannedBatch]]:
        """Probe headers (errors become item.error) and plan the batches of all items."""
        probed = probe_sizes(items, max_pixels=self.max_pixels)
        plan = plan_batches(probed, self.batch_size, self.config.min_size, self.config.max_size, self.batching)
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
        dataset = BatchLoadingDataset(todo, self.config.min_size, self.config.max_size,
                                      keep_rgb=self.keep_images, max_pixels=self.max_pixels)
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
        """Model + postprocess on already preprocessed inputs (3, h_i, w_i) in [0, 1]."""
        from detection.postprocess import postprocess

        batch, mask = pad_batch(images)
        start = time.perf_counter()
        outputs = self.engine(batch, mask, attention=self.attention,
                              decoder_self_attention=self.rollout, encoder_attention=self.rollout)
        detections = postprocess(outputs, torch.tensor(original_sizes), self.config.class_names,
                                 self.score_threshold)
        self.model_seconds += time.perf_counter() - start
        record = outputs["attention"]
        if record is not None and self.last_layer_only:
            record = dataclasses.replace(record, decoder_cross=record.decoder_cross[-1:])
        if record is not None and record.decoder_cross.device.type != "cpu":
            record = _record_to_cpu(record)
        return detections, record

    def _run_loaded(self, loaded: LoadedBatch, skip_keys) -> Iterator[PredictionResult]:
        for sample in loaded.samples:
            if sample.error is not None and sample.item.key not in skip_keys:
                yield PredictionResult(sample.item, error=sample.error)
        good = [s for s in loaded.samples if s.error is None]
        for group in self._groups(good):
            detections, record = self.predict_tensors([s.image for s in group], [s.original_size for s in group])
            for index, sample in enumerate(group):
                if sample.item.key in skip_keys:
                    continue
                yield PredictionResult(
                    sample.item, original_size=sample.original_size, detections=detections[index],
                    attention=None if record is None else record.select_image(index), image=sample.rgb)


def _record_to_cpu(record: AttentionRecord) -> AttentionRecord:
    move = lambda t: None if t is None else t.cpu()  # noqa: E731
    return AttentionRecord(decoder_cross=move(record.decoder_cross), feature_padding_mask=move(record.feature_padding_mask),
                           feature_stride=record.feature_stride, input_size=record.input_size,
                           image_sizes=move(record.image_sizes), encoder_self=move(record.encoder_self),
                           decoder_self=move(record.decoder_self))


# -- records ----------------------------------------------------------------------------------
def detection_record(item: SourceItem, detections: Detections, category_ids: Sequence[int]) -> dict[str, Any]:
    """One predictions.jsonl line: bbox [x, y, w, h] original pixels (3 decimals), score (6)."""
    height, width = detections.image_size
    entries = []
    boxes = detections.boxes.tolist()
    scores = detections.scores.tolist()
    labels = detections.labels.tolist()
    queries = detections.query_index.tolist()
    for k in range(len(detections)):
        x0, y0, x1, y1 = boxes[k]
        entries.append({
            "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
            "score": round(float(scores[k]), 6),
            "category_id": int(category_ids[int(labels[k])]),
            "label": int(labels[k]),
            "class_name": detections.class_names[k],
            "query_index": int(queries[k]),
        })
    record: dict[str, Any] = {"file": item.file, "image_id": item.image_id, "key": item.key}
    if item.frame_index is not None:
        record["frame_index"] = item.frame_index
    record.update({"width": int(width), "height": int(height), "detections": entries})
    return record


@dataclass
class OutputOptions:
    overlays: bool = False
    save_attention: bool = False
    image_format: str = "png"
    heads: Any = "mean"
    layers: Any = "last"
    normalize: str | None = "minmax"

    @property
    def needs_maps(self) -> bool:
        return self.overlays or self.save_attention


def _encode(rgb: np.ndarray, image_format: str) -> bytes:
    # PNG level 1: ~5x faster to write than the default 6 for ~15 % more bytes
    from detection.render.overlay import encode_image

    return encode_image(rgb, f".{image_format}", jpeg_quality=92, png_compression=1)


def write_image_outputs(folder: RunFolder, result: PredictionResult, options: OutputOptions,
                        category_ids: Sequence[int]) -> dict[str, Any]:
    """Write npz / overlays of one image (each atomic), then return its journal record."""
    item, detections = result.item, result.detections
    record = detection_record(item, detections, category_ids)
    if not options.needs_maps:
        return record
    from detection.attention.maps import detection_maps, map_metadata, save_maps_npz

    if result.attention is None:
        raise ValueError("attention maps requested but the model returned no attention")
    if len(detections):
        maps = detection_maps(result.attention, 0, detections.query_index, detections.image_size,
                              heads=options.heads, layers=options.layers, normalize=options.normalize)
    else:  # nothing to explain; still write the (empty) npz and the plain overlay
        maps = np.zeros((0, *detections.image_size), dtype=np.float32)
    if options.save_attention:
        meta = map_metadata(result.attention, 0, heads=options.heads, layers=options.layers,
                            normalize=options.normalize)
        meta.update({"file": item.file, "key": item.key})
        if item.frame_index is not None:
            meta["frame_index"] = item.frame_index
        save_maps_npz(folder.attention_path(item.key), maps, detections, meta)
        record["attention"] = f"attention/{item.key}.npz"
    if options.overlays:
        from detection.render.overlay import render_detection_overlay, render_overlay

        if result.image is None:
            raise ValueError("overlays requested but the decoded image was not kept")
        suffix = options.image_format
        write_bytes_atomic(folder.overlay_path(item.key, suffix),
                           _encode(render_overlay(result.image, detections, maps), suffix))
        for k in range(len(detections)):
            write_bytes_atomic(folder.detection_overlay_path(item.key, k, suffix),
                               _encode(render_detection_overlay(result.image, detections[k], maps[k]), suffix))
        record["overlay"] = f"overlays/{item.key}.{suffix}"
    return record


# -- the predict run --------------------------------------------------------------------------
@dataclass
class PredictSettings:
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


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): the same weights, the same
    digest, wherever they were loaded from. ~0.3 s for DETR-R50."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _fingerprint(settings: PredictSettings, model: torch.nn.Module, precision: str) -> dict[str, Any]:
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
    }


_OWN_OUTPUTS = ("run.json", "predictions.jsonl", "errors.jsonl", "detections.json", ".parts", "overlays", "attention")


def _clear_outputs(out: Path) -> None:
    """--overwrite: remove only what a predict run writes (never other files in OUT)."""
    for name in _OWN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _versions() -> dict[str, str]:
    import detection

    return {"python": platform.python_version(), "torch": torch.__version__,
            "detection": getattr(detection, "__version__", "unknown"), "platform": platform.platform()}


def run_predict(settings: PredictSettings, model: torch.nn.Module | None = None,
                context: DistContext | None = None) -> int:
    """Run a whole predict job into settings.out; returns the exit status (see module doc)."""
    from detection.models.registry import load_model

    context = context or init_from_env()
    out = Path(settings.out)
    options = settings.outputs or OutputOptions()
    try:
        device = resolve_device(settings.device)
        if device.type == "cuda" and context.enabled:
            device = torch.device("cuda", context.local_rank)
        if model is None:
            model = load_model(settings.model, device="cpu")
    except (ValueError, FileNotFoundError) as err:
        print(f"detr-attn predict: {err}", file=sys.stderr)
        return EXIT_USAGE

    predictor = Predictor(model, device=device, precision=settings.precision, batch_size=settings.batch_size,
                          num_workers=settings.workers, score_threshold=settings.score_threshold,
                          attention=options.needs_maps, batching=settings.batching,
                          keep_images=options.overlays, rollout=options.layers == "rollout",
                          fold_bn=settings.fold_bn, channels_last=settings.channels_last,
                          compile=settings.compile, max_pixels=settings.max_pixels,
                          video_stride=settings.video_stride, last_layer_only=options.layers == "last")
    items = expand_sources(settings.inputs, settings.list_files, video_stride=settings.video_stride)
    if not items:
        print("detr-attn predict: no inputs given", file=sys.stderr)
        return EXIT_USAGE
    fingerprint = _fingerprint(settings, model, predictor.precision)

    folder = RunFolder(out, context.rank, context.world_size)
    if context.is_main:
        if settings.overwrite:
            _clear_outputs(out)
        folder.remove_stale_temp_files()
    context.barrier()
    mismatch = None
    try:
        folder.check_compatible(fingerprint)
    except RunFolderMismatch as err:
        mismatch = str(err)
    if context.any_true(mismatch is not None):
        print(f"detr-attn predict: {mismatch or 'another rank refused the output folder'}", file=sys.stderr)
        return EXIT_USAGE

    started = time.time()
    probed, plan = predictor.plan(items)
    run_info = {
        "status": "running",
        "fingerprint": fingerprint,
        "model": settings.model,
        "model_source": getattr(model, "source", ""),
        "class_names": list(model.config.class_names),
        "category_ids": list(model.config.category_ids),
        "inputs": list(settings.inputs) + [f"@{f}" for f in settings.list_files],
        "settings": {"device": str(predictor.device), "batch_size": settings.batch_size,
                     "workers": settings.workers, "fold_bn": settings.fold_bn,
                     "channels_last": settings.channels_last, "compile": settings.compile,
                     "world_size": context.world_size},
        "versions": _versions(),
    }
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, run_info)
    context.barrier()

    done = folder.open()
    my_plan = shard_plan(plan, context.rank, context.world_size)
    processed = 0
    progress = None
    if settings.progress and context.is_main and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=sum(len(b.items) for b in my_plan), desc="predict", unit="img")
    try:
        if context.is_main:  # expansion / header errors: reported once, by rank 0
            for item in probed:
                if item.error is not None:
                    folder.append_error(item, item.error)
        pending: list[Future] = []
        with ThreadPoolExecutor(max_workers=max(1, settings.writer_threads)) as pool:
            def write(result: PredictionResult) -> None:
                try:
                    record = write_image_outputs(folder, result, options, model.config.category_ids)
                except OSError:
                    raise  # disk full / permissions: stop, a rerun resumes
                except Exception as err:  # noqa: BLE001 - one image's output must not stop the run
                    folder.append_error(result.item, f"writing outputs failed: {type(err).__name__}: {err}")
                    return
                folder.append_prediction(record)

            for result in predictor.run_plan(my_plan, done):
                if result.error is not None:
                    folder.append_error(result.item, result.error)
                else:
                    pending.append(pool.submit(write, result))
                    processed += 1
                if progress is not None:
                    progress.update(1)
                # bounded queue: results hold images and attention; surface writer errors early
                while len(pending) > 4 * max(1, settings.writer_threads):
                    pending.pop(0).result()
            for future in pending:
                future.result()
    finally:
        folder.close()
        if progress is not None:
            progress.close()

    context.barrier()
    status = EXIT_OK
    if context.is_main:
        counts = folder.finalize(probed, model.config.category_ids)
        elapsed = time.time() - started
        run_info.update({
            "status": "complete",
            "counts": counts,
            "timing": {"wall_seconds": round(elapsed, 3),
                       "model_seconds_rank0": round(predictor.model_seconds, 3),
                       "images_this_run_rank0": processed},
        })
        write_json_atomic(out / RUN_FILE, run_info)
        if counts["errors"]:
            status = EXIT_SOME_FAILED
        print(f"detr-attn predict: {counts['images']} images, {counts['detections']} detections, "
              f"{counts['errors']} errors -> {out}", file=sys.stderr)
    context.barrier()
    return status


# -- CLI --------------------------------------------------------------------------------------
def _head_choice(text: str):
    if text in ("mean", "max"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--heads must be mean, max or a head index, got {text!r}") from None


def _layer_choice(text: str):
    if text in ("last", "mean", "rollout"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be last, mean, rollout or a layer index, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="IMAGES",
                        help="image files, folders (recursive), glob patterns, @list.txt files, videos")
    parser.add_argument("--list", action="append", default=[], metavar="FILE",
                        help="text file with one path (or folder / glob) per line; repeatable")
    parser.add_argument("--model", default="demo", help="model name (demo, detr-r50, ...) or native model folder")
    parser.add_argument("--out", required=True, help="output run folder (created; rerun to resume)")
    parser.add_argument("--score-threshold", type=float, default=0.7)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto = bf16 where the hardware supports it natively, else fp32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="decoding worker processes (0 = none)")
    parser.add_argument("--batching", choices=["exact", "padded"], default="exact",
                        help="exact: only equal input shapes share a batch (results equal to one image at a "
                             "time); padded: group by aspect ratio and pad (faster on varied sizes)")
    parser.add_argument("--overlays", action="store_true", help="write overlays/<stem>.png and overlays/<stem>/det_<k>.png")
    parser.add_argument("--save-attention", action="store_true", help="write attention/<stem>.npz (float16 maps)")
    parser.add_argument("--heads", type=_head_choice, default="mean", help="mean, max or a head index")
    parser.add_argument("--layers", type=_layer_choice, default="last", help="last, mean, rollout or a layer index")
    parser.add_argument("--normalize", choices=["minmax", "percentile", "none"], default="minmax")
    parser.add_argument("--format", dest="image_format", choices=["png", "jpg"], default="png")
    parser.add_argument("--video-stride", type=int, default=1, help="keep every k-th video frame")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels (decompression bombs); 0 = no limit")
    parser.add_argument("--no-fold-bn", action="store_true", help="keep batch norm layers (debugging)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the CNN body")
    parser.add_argument("--writer-threads", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a previous run in --out (only files predict writes)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> PredictSettings:
    if args.batch_size < 1 or args.workers < 0 or args.video_stride < 1 or args.writer_threads < 1:
        raise ValueError("--batch-size, --video-stride, --writer-threads must be >= 1 and --workers >= 0")
    if not 0.0 <= args.score_threshold < 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1), got {args.score_threshold}")
    if not args.inputs and not args.list:
        raise ValueError("no inputs: give image files, folders, globs, @list.txt or --list FILE")
    return PredictSettings(
        inputs=list(args.inputs), out=args.out, model=args.model, list_files=tuple(args.list),
        score_threshold=args.score_threshold, device=args.device, precision=args.precision,
        batch_size=args.batch_size, workers=args.workers, batching=args.batching,
        outputs=OutputOptions(overlays=args.overlays, save_attention=args.save_attention,
                              image_format=args.image_format, heads=args.heads, layers=args.layers,
                              normalize=None if args.normalize == "none" else args.normalize),
        video_stride=args.video_stride, max_pixels=args.max_pixels or None,
        fold_bn=not args.no_fold_bn, channels_last=not args.no_channels_last, compile=args.compile,
        writer_threads=args.writer_threads, overwrite=args.overwrite, progress=not args.quiet)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        print(f"detr-attn predict: {err}", file=sys.stderr)
        return EXIT_USAGE
    context = None
    try:
        context = init_from_env()
        return run_predict(settings, context=context)
    except KeyboardInterrupt:
        print("detr-attn predict: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_CRASH
    except Exception:  # noqa: BLE001 - report, keep the documented exit status
        traceback.print_exc()
        print("detr-attn predict: the run crashed; rerun the same command to resume", file=sys.stderr)
        return EXIT_CRASH
    finally:
        if context is not None:
            context.close()
