"""A whole predict run into a run folder: lock, fingerprint, overwrite, resume, sharding over
torchrun ranks, a writer thread pool for the per-image files, graceful stop on signals, the final merge.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from detection.attention.methods import MethodMaps
from detection.engine.explain import MethodRunner
from detection.engine.image_files import OutputOptions, write_image_files
from detection.engine.output_size import OverlayProjection, folder_bytes
from detection.engine.pending import PendingWrites
from detection.engine.planning import shard_plan
from detection.engine.predict_methods import image_maps, image_token_scores, token_scorer
from detection.engine.predictor import PredictionResult, Predictor
from detection.engine.run_setup import (PredictInterrupted, PredictSettings, PredictSummary, PredictUsageError,
                                        build_run_model, check_inputs, start_run_info)
from detection.engine.stop_signals import StopOnSignals
from detection.models.registry import load_model
from detection.runfolder.run_folder import RunFolder, RunFolderMismatch
from detection.runfolder.lock import RunFolderLocked
from detection.runtime.device import resolve_device
from detection.runtime.distributed import DistContext, init_distributed

logger = logging.getLogger(__name__)


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
                model = load_model(settings.model, device="cpu", prompt=settings.prompt)
        except (ValueError, FileNotFoundError) as err:
            raise PredictUsageError(str(err)) from err
        predictor, runner, prepared = build_run_model(settings, model, device)
        items, fingerprint = check_inputs(settings, model, predictor)
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
    run_info = start_run_info(settings, fingerprint, config, source, predictor.device, world_size=context.world_size)
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

    scorer = token_scorer(predictor, settings.outputs)

    def write(result: PredictionResult, maps: dict[str, MethodMaps], tokens=None) -> None:
        try:
            record = write_image_files(folder, result, maps, settings.outputs, category_ids, explain, tokens)
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
                    tokens = image_token_scores(predictor, result) if scorer is not None else None
                except Exception as err:  # noqa: BLE001 - one image's explanation must not stop the run
                    folder.append_error(result.item, f"explanation methods failed: {type(err).__name__}: {err}")
                else:
                    pending.add(pool.submit(write, result, maps, tokens), result, maps)
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
