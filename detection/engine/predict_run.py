"""A whole predict run into a run folder: lock, fingerprint, overwrite, resume, sharding over
torchrun ranks, a writer thread pool for the per-image files, graceful stop on signals, the final merge.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from detection.attention.methods import DEFAULT_METHOD, MethodMaps, attention_kind
from detection.data.images import DEFAULT_MAX_PIXELS
from detection.data.sources import expand_sources
from detection.engine.display import DisplaySpec
from detection.engine.explain import MethodRunner
from detection.engine.fast import PreparedModels
from detection.engine.image_files import OutputOptions, write_image_files
from detection.engine.output_size import OverlayProjection, folder_bytes
from detection.engine.model_failure import ModelRunError, probe
from detection.engine.pending import PendingWrites
from detection.engine.planning import shard_plan
from detection.engine.predict_methods import ExplainOptions, build_predict_methods, image_maps
from detection.engine.predictor import PredictionResult, Predictor, PredictorSettings
from detection.engine.stop_signals import StopOnSignals
from detection.models.digest import weights_digest
from detection.models.registry import load_model
from detection.runfolder.run_folder import RunFolder, RunFolderMismatch
from detection.runfolder.lock import RunFolderLocked
from detection.runfolder.versions import GRIDS_NPZ_FORMAT, MAPS_FORMAT_KEY, MAPS_NPZ_FORMAT
from detection.runtime.device import resolve_device
from detection.runtime.distributed import DistContext, init_distributed
from detection.text import plural, size
from detection.version import __version__

logger = logging.getLogger(__name__)


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


@dataclass
class PredictSummary:
    """What a finished run wrote. Counts are those of the whole run folder after the merge
    (on rank 0; other ranks of a torchrun run report zeros and `is_main=False`)."""

    out: Path
    images: int = 0
    errors: int = 0
    detections: int = 0
    is_main: bool = True
    #: Bytes in the run folder when it finished (every output, this run's and a resumed one's).
    bytes: int = 0

    def text(self) -> str:
        """The one-line summary a user reads: '6 images, 27 detections, 0 errors -> OUT (106 MB)'."""
        return (f"{plural(self.images, 'image')}, {plural(self.detections, 'detection')}, "
                f"{plural(self.errors, 'error')} -> {self.out} ({size(self.bytes)})")


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
    }


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "detection": __version__, "platform": platform.platform()}


def run_predict(settings: PredictSettings, model: torch.nn.Module | None = None,
                context: DistContext | None = None) -> PredictSummary:
    """Run a whole predict job into settings.out (every rank of a torchrun run calls this).

    Raises PredictUsageError before anything is written when the run cannot start, including
    when OUT is a file or another live run holds OUT's lock (`run_folder.LOCK_FILE`; rank 0
    takes it for all ranks; a lock left by a dead process is taken over). The lock is released
    however the run ends.
    SIGTERM / SIGINT: the images in flight are finished and journalled, no new work is taken,
    then PredictInterrupted is raised (a second SIGINT stops at once with KeyboardInterrupt).
    A full disk raises OSError(ENOSPC) naming the file that did not fit; no partial file is left.
    After either, and after any other exception (a crash), rerunning the same settings resumes
    the run, and the finished folder equals that of an uninterrupted run.
    """
    settings = dataclasses.replace(settings, outputs=settings.outputs or OutputOptions())
    context = context or init_distributed(backend="gloo")
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise PredictUsageError(f"--out {out}: is a file, not a folder (give a folder path; it is created if missing)")
    with StopOnSignals() as stop:
        try:
            device = resolve_device(settings.device, context.local_rank if context.enabled else None)
            if model is None:
                model = load_model(settings.model, device="cpu")
        except (ValueError, FileNotFoundError) as err:
            raise PredictUsageError(str(err)) from err
        if settings.outputs.overlay_style == "points" and attention_kind(model) != "sampled":
            raise PredictUsageError("--overlay-style points draws deformable sampling points; this model's "
                                    "attention is dense (use the default heatmap style)")
        # one prepared copy per (device, precision), shared by the predictor and the methods
        prepared = PreparedModels(model, fold_bn=settings.fold_bn, channels_last=settings.channels_last,
                                  compile=settings.compile)
        try:
            runner = build_predict_methods(model, settings.explain, settings.outputs, device, prepared)
        except ValueError as err:  # MethodNotApplicable names the family and the methods that apply
            raise PredictUsageError(f"--explain: {err}" if settings.explain is not None else str(err)) from err
        predictor = _make_predictor(settings, model, device, runner, prepared)
        try:  # before anything is written: a model that cannot run is a usage error about the model
            probe(predictor)
        except ModelRunError as err:
            raise PredictUsageError(f"--model {settings.model}: {err}") from err
        items = expand_sources(settings.inputs, settings.list_files, video_stride=settings.video_stride)
        if not items:
            raise PredictUsageError("no inputs given")
        if all(item.error is not None for item in items):  # nothing to run: say why, write nothing
            raise PredictUsageError("no image to run on: " + "; ".join(f"{item.file}: {item.error}" for item in items))
        fingerprint = run_fingerprint(settings, model, predictor.precision)
        config, source = model.config, getattr(model, "source", "")
        # the predictor runs its own prepared copy: a model loaded here is freed now (DETR-R50: 166 MB
        # of float32 weights), and its memory serves the run; a caller's model stays the caller's
        prepared.release_source()
        del model

        folder = RunFolder(out, context.rank, context.world_size)
        lock = folder.lock() if context.is_main else None
        refusal = None
        if lock is not None:
            try:
                lock.acquire()
            except RunFolderLocked as err:
                refusal = str(err)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise
                refusal = f"--out {out}: cannot create the folder or its lock file ({err.strerror})"
        if context.any_true(refusal is not None):
            raise PredictUsageError(refusal or "rank 0 could not lock the output folder")
        try:
            return _run_locked(settings, config, source, context, predictor, runner, items, fingerprint, folder,
                               stop)
        finally:
            if lock is not None:
                lock.release()


def _run_locked(settings: PredictSettings, config: Any, source: str, context: DistContext, predictor: Predictor,
                runner: MethodRunner | None, items, fingerprint: dict[str, Any], folder: RunFolder,
                stop: StopOnSignals) -> PredictSummary:
    """run_predict once rank 0 holds the folder's lock: overwrite / resume, shards, merge."""
    if context.is_main:
        if settings.overwrite:
            folder.clear()
        folder.remove_stale_temp_files()
    context.barrier()
    mismatch = None
    try:
        folder.check_compatible(fingerprint)
    except RunFolderMismatch as err:
        mismatch = str(err)
    if context.any_true(mismatch is not None):
        raise PredictUsageError(mismatch or "another rank refused the output folder")

    started = time.time()
    probed, plan = predictor.plan(items)
    run_info = {
        "status": "running",
        "fingerprint": fingerprint,
        "model": settings.model,
        "model_source": source,
        "class_names": list(config.class_names),
        "category_ids": list(config.category_ids),
        "inputs": list(settings.inputs) + [f"@{f}" for f in settings.list_files],
        "settings": {"device": str(predictor.device), "batch_size": settings.batch_size,
                     "workers": settings.workers, "fold_bn": settings.fold_bn,
                     "channels_last": settings.channels_last, "compile": settings.compile,
                     "world_size": context.world_size},
        "versions": _versions(),
    }
    if context.is_main:
        folder.write_run_info(run_info)
    context.barrier()

    try:
        projection = OverlayProjection(folder, sum(len(batch.items) for batch in plan), settings.outputs)
        processed = _predict_shard(settings, predictor, runner, folder, probed,
                                   shard_plan(plan, context.rank, context.world_size), context.is_main, stop,
                                   projection if context.is_main else None)
    except Exception as error:
        if context.is_main and not (isinstance(error, OSError) and error.errno == errno.ENOSPC):
            run_info["status"] = "failed"  # a crash of our own code: said so, and a rerun resumes
            run_info["failure"] = f"{type(error).__name__}: {error}"
            folder.write_run_info(run_info)
        raise
    context.barrier()
    out = folder.out
    if context.any_true(stop.requested):
        if context.is_main:
            run_info["status"] = "interrupted"
            folder.write_run_info(run_info)
        raise PredictInterrupted(f"{stop.signal_name or 'a signal to another rank'}: stopped after the images "
                                 f"in flight; rerun the same command to resume")
    summary = PredictSummary(out=out, is_main=context.is_main)
    if context.is_main:
        counts = folder.finalize(probed, config.category_ids)
        run_info.update({
            "status": "complete",
            "counts": counts,
            "timing": {"wall_seconds": round(time.time() - started, 3),
                       "model_seconds_rank0": round(predictor.model_seconds, 3),
                       **({"explain_seconds_rank0": {name: round(seconds, 3) for name, seconds in runner.seconds.items()}}
                          if settings.explain is not None and runner is not None else {}),
                       "images_this_run_rank0": processed},
        })
        folder.write_run_info(run_info)
        summary = PredictSummary(out=out, images=counts["images"], errors=counts["errors"],
                                 detections=counts["detections"], bytes=folder_bytes(out))
        logger.info("%s", summary.text())
    context.barrier()
    return summary


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
        keep_images=runner is not None and runner.needs_input,
        keep_features=runner is not None and runner.needs_features,
        display=DisplaySpec(overlays=options.overlays, overlay_size=options.overlay_size,
                            viewer_jpeg=options.save_attention) if options.needs_maps else None,
        rollout=options.save_encoder_attention or (runner is not None and runner.needs_self_attention),
        fold_bn=settings.fold_bn, channels_last=settings.channels_last, compile=settings.compile,
        max_pixels=settings.max_pixels, video_stride=settings.video_stride,
        # the viewer's grids keep every layer
        last_layer_only=options.layers == "last" and not options.save_attention and not method_attention),
        prepared=prepared)


def _predict_shard(settings: PredictSettings, predictor: Predictor, runner: MethodRunner | None, folder: RunFolder,
                   probed, my_plan, is_main: bool, stop: StopOnSignals,
                   projection: OverlayProjection | None = None) -> int:
    """This rank's share: journal every result (per-image files on writer threads); returns
    the number of images processed in this run. Once `stop` is requested no new result is
    taken; the writes in flight finish and are journalled. The explanation methods (`runner`)
    run here, in this thread (they run models); their files are written on the writer threads.
    `projection` watches the first images' overlays (rank 0: one warning per run)."""
    done = folder.open()
    processed = 0
    # tqdm(disable=None): no bar when stderr is not a terminal
    progress = tqdm(total=sum(len(b.items) for b in my_plan), desc="predict", unit="img",
                    disable=None if settings.progress and is_main else True)
    category_ids = predictor.config.category_ids
    # this thread's count; asking also fixes it for this thread before any writer exists (a thread that
    # first asks after a writer's set_num_threads(1) would take 1). The writers' setting must not outlive the run
    torch_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=max(1, settings.writer_threads), initializer=_single_threaded_torch)

    explain = settings.explain.extra_methods if settings.explain is not None else None

    def write(result: PredictionResult, maps: dict[str, MethodMaps]) -> None:
        try:
            record = write_image_files(folder, result, maps, settings.outputs, category_ids, explain)
        except OSError:
            raise  # disk full / permissions: stop, a rerun resumes
        except Exception as err:  # noqa: BLE001 - one image's output must not stop the run
            folder.append_error(result.item, f"writing outputs failed: {type(err).__name__}: {err}")
            return
        folder.append_prediction(record)
        if projection is not None:
            projection.add(result.item.key)

    try:
        if is_main:  # expansion / header errors: reported once, by rank 0
            for item in probed:
                if item.error is not None:
                    folder.append_error(item, item.error)
        # bounded: results hold images and attention; writer errors surface early
        threads = max(1, settings.writer_threads)
        pending = PendingWrites(max_count=4 * threads, min_count=threads)
        for result in ([] if stop.requested else predictor.run_plan(my_plan, done)):
            if result.error is not None:
                folder.append_error(result.item, result.error)
            else:
                try:
                    maps = image_maps(runner, result)
                except Exception as err:  # noqa: BLE001 - one image's explanation must not stop the run
                    folder.append_error(result.item, f"explanation methods failed: {type(err).__name__}: {err}")
                else:
                    pending.add(pool.submit(write, result, maps), result, maps)
                processed += 1
            progress.update(1)
            if stop.requested:
                break
            pending.wait_within()
        pending.wait_all()
    except Exception as err:
        if not stop.requested:
            raise
        # expected: decoding workers that got the signal too (Ctrl-C reaches the process group)
        logger.warning("after %s: %s: %s", stop.signal_name, type(err).__name__, err)
    finally:
        _shut_down(pool)  # writes in flight finish (and are journalled) before the journals close
        torch.set_num_threads(torch_threads)  # the default of threads started later, as it was
        folder.close()
        progress.close()
    return processed


def _single_threaded_torch() -> None:
    """Writer threads run their (small) torch operations on themselves alone. Each thread that calls
    into OpenMP gets a team of its own, and idle team threads spin: with two writers beside the
    model, their spinning took about as much CPU as the writing itself (figures: README). OpenMP's
    thread count is per calling thread, so the model's thread keeps its own."""
    torch.set_num_threads(1)


def _shut_down(pool: ThreadPoolExecutor) -> None:
    # An exception raised by a signal handler (the DataLoader's SIGCHLD) may interrupt the wait.
    for _ in range(100):
        try:
            pool.shutdown(wait=True)
            return
        except Exception:  # noqa: BLE001 - wait again: writer threads must not outlive their journal
            continue
