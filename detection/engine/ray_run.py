"""A predict run on a Ray cluster (`detr-attn predict --engine ray`): the same run folder as the
single-host engine (`engine.predict_run`), made by Ray Data stages (`engine.ray_stages`):

    planned units (driver) -> decoding (CPU tasks) -> model + methods + per-image files (actor pool)
    -> records, journalled by the driver as they arrive -> the final merge (`RunFolder.finalize`)

The driver checks and plans as a single-host run does (probe, inputs, fingerprint, lock, resume),
writes the header errors, journals each record it receives (one fsynced line: a killed driver
loses only records not yet received; rerunning resumes), and merges at the end. The engine is
not part of the fingerprint: a folder started on one engine is finished by the other.
Ray is an optional extra (`pip install 'detection[ray]'`), imported inside functions only.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from detection.engine.image_files import OutputOptions
from detection.engine.run_setup import (PredictInterrupted, PredictSettings, PredictSummary, PredictUsageError,
                                        build_run_model, check_inputs, start_run_info)
from detection.engine.ray_stages import (DEFAULT_MAX_ATTEMPTS, DecodeSpec, ModelWorker, decode_units, parse_record,
                                         start_control, unit_rows)
from detection.engine.output_size import folder_bytes
from detection.engine.planning import plan_batches
from detection.engine.ray_records import error_row, map_methods, records_table
from detection.engine.ray_storage import Location, StagedOutput, expand_uri_sources, is_uri
from detection.engine.stop_signals import StopOnSignals
from detection.models.registry import load_model
from detection.runfolder.layout import DETECTIONS_FILE, ERRORS_FILE, PREDICTIONS_FILE, RUN_FILE
from detection.runfolder.lock import RunFolderLocked
from detection.runfolder.records import error_record
from detection.runfolder.run_folder import RunFolder, RunFolderMismatch
from detection.runtime.device import resolve_device

logger = logging.getLogger(__name__)

#: How often (seconds) the driver uploads the journal of a run folder in an object store.
SYNC_SECONDS = 30.0
#: What `--engine ray` says when Ray is not installed.
MISSING_RAY = "--engine ray needs Ray: pip install 'detection[ray]'"


@dataclass(frozen=True)
class RaySettings:
    """Where and how the Ray stages run.

    address: a running cluster ("auto", "ray://host:10001", "host:6379"); None: an embedded local
        Ray started for the run (`num_cpus` cores, default all) and shut down after it. A Ray
        already initialised in this process (ray.init) is used as it is and left running.
    actors: model actors (each loads the model once); gpus_per_actor / cpus_per_actor: what each
        reserves (Ray sets OMP_NUM_THREADS to its CPUs). decode_cpus: CPUs of each decoding task.
    decode: where images are decoded: "tasks" (CPU tasks of their own, anywhere in the cluster; the
        decoded batches reach the actors through the object store), "actor" (in the model actors:
        no hand-off, the choice for one machine), "auto": "actor" on an embedded local Ray, "tasks"
        on a cluster joined or a Ray already initialised.
    The defaults (None, "auto") are resolved by `resolve_ray_settings`: on an embedded local Ray,
    min(4, cores) actors sharing the cores, decoding in the actors; on a cluster, one actor of one
    CPU, decoding in tasks.
    units_per_block: work units (batches) per Ray Data block, the unit of scheduling and retry
        (each block costs the scheduler about 10 ms); None: up to 8, with at least 4 blocks per actor.
    max_attempts: attempts at a unit whose model process dies before its images become error records.
    unit_hook: called in the model actor with a unit's keys before it runs (fault injection, tests);
    decode_hook: the same in the decoding task, before it decodes (with decode="tasks").
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None
    decode_cpus: float = 1.0
    decode: str = "auto"
    num_cpus: int | None = None
    units_per_block: int | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    unit_hook: Callable[[list[str]], None] | None = None
    decode_hook: Callable[[list[str]], None] | None = None


def ray_available() -> bool:
    """Whether Ray Data can be imported (the `ray` extra)."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class _Prepared:
    """What the driver's checks give the run: the driver's predictor (planning, the decode spec),
    the inputs, the fingerprint, the model's config and source, and the object store of URI inputs."""

    predictor: Any
    items: list
    fingerprint: dict[str, Any]
    config: Any
    source: str
    inputs: Location | None


def _prepare(settings: PredictSettings) -> _Prepared:
    """The driver's checks (those of a single-host run): model, methods, probe, inputs, fingerprint."""
    try:
        device = resolve_device(settings.device)
        model = load_model(settings.model, device="cpu", prompt=settings.prompt)
        uris = [is_uri(source) for source in settings.inputs]
        if any(uris) and (not all(uris) or settings.list_files):
            raise ValueError("URI sources (s3://...) cannot be mixed with local paths or --list files")
        items, inputs = expand_uri_sources(settings.inputs) if any(uris) else (None, None)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise PredictUsageError(str(err)) from err
    predictor, _, prepared = build_run_model(settings, model, device)
    items, fingerprint = check_inputs(settings, model, predictor, items)
    prepared.release_source()
    return _Prepared(predictor, items, fingerprint, model.config, getattr(model, "source", ""), inputs)


def build_records_dataset(settings: PredictSettings, ray_settings: RaySettings, rows: list[dict[str, Any]],
                          run: _Prepared, control: Any, methods: list[str] | None = None):
    """The Ray Data pipeline over planned unit rows -> the `ray.data.Dataset` of records (lazy): the
    journal's columns, or with `methods` the typed columns of `engine.ray_records`. The actors run
    at the precision the driver resolved (the fingerprint's), whatever their device."""
    import ray.data

    decode = _decode_spec(run)
    settings = dataclasses.replace(settings, precision=run.predictor.precision)
    ray_settings = resolve_ray_settings(ray_settings, embedded=False)  # no-op when resolved by the caller
    per_block = ray_settings.units_per_block or max(1, min(8, len(rows) // (4 * ray_settings.actors)))
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / per_block)))
    in_actor = ray_settings.decode == "actor"
    if not in_actor:
        dataset = dataset.map_batches(decode_units, batch_size=1, batch_format="numpy",
                                      fn_kwargs={"spec": decode, "control": control, "unit_hook": ray_settings.decode_hook,
                                                 "max_attempts": ray_settings.max_attempts},
                                      num_cpus=ray_settings.decode_cpus,
                                      # one thread per decoding task; an environment of its own also keeps Ray
                                      # Data from fusing the decoding into the model actors (a stage of its own)
                                      runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    return dataset.map_batches(
        ModelWorker, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=ray_settings.actors),
        fn_constructor_kwargs={"settings": settings, "control": control, "unit_hook": ray_settings.unit_hook,
                               "methods": methods, "decode": decode if in_actor else None},
        num_cpus=ray_settings.cpus_per_actor, num_gpus=ray_settings.gpus_per_actor or None)


def ray_records(settings: PredictSettings, ray_settings: RaySettings = RaySettings()):
    """The Python entry point: a `ray.data.Dataset` of the run's records, one row per input, in
    the typed columns of `engine.ray_records` (key, image_id, file, kind, error, width, height, the
    per-detection boxes / scores / labels / category_ids / class_names / query_index, a maps_<method>
    column per method with an npz: the cell maps and their geometry; record: the predictions.jsonl /
    errors.jsonl line), for composing further (write_parquet, joins). Each image's files are
    written to settings.out by the model actors as the dataset executes; nothing is journalled or
    merged (`run_predict_ray` does that). Needs a Ray initialised in this process (ray.init)."""
    import ray
    import ray.data

    settings = dataclasses.replace(settings, outputs=settings.outputs or OutputOptions())
    run = _prepare(settings)
    probed, plan = _plan(settings, run)
    methods = map_methods(settings.outputs.save_attention,
                          settings.explain.extra_methods if settings.explain is not None else None)
    control = start_control(settings.out, ray_settings.max_attempts, named=False)
    records = build_records_dataset(settings, ray_settings, unit_rows(plan, frozenset()), run, control, methods)
    failed = [error_row(error_record(item, item.error)) for item in probed if item.error is not None]
    return records.union(ray.data.from_arrow(records_table(failed, methods))) if failed else records


def _decode_spec(run: _Prepared) -> DecodeSpec:
    predictor = run.predictor
    return DecodeSpec(preprocess=predictor.preprocess, keep_rgb=predictor.keep_images,
                      max_pixels=predictor.max_pixels, display=predictor.display, source=run.inputs)


def resolve_ray_settings(ray_settings: RaySettings, embedded: bool) -> RaySettings:
    """The defaults resolved (`embedded`: the run starts a local Ray of its own, one machine):
    embedded, min(4, cores) actors with the cores shared between them, decoding in the actors
    (no decoded batch crosses the object store); on a cluster, one actor of one CPU, decoding in
    CPU tasks anywhere in the cluster. ValueError names a bad `decode`."""
    if ray_settings.decode not in ("auto", "tasks", "actor"):
        raise ValueError(f"decode must be auto, tasks or actor, not {ray_settings.decode!r}")
    decode = ray_settings.decode if ray_settings.decode != "auto" else ("actor" if embedded else "tasks")
    cores = ray_settings.num_cpus or os.cpu_count() or 1
    actors = ray_settings.actors or (min(4, cores) if embedded and not ray_settings.gpus_per_actor else 1)
    cpus = ray_settings.cpus_per_actor or (max(1, cores // actors) if embedded else 1.0)
    return dataclasses.replace(ray_settings, decode=decode, actors=actors, cpus_per_actor=float(cpus))


def _plan(settings: PredictSettings, run: _Prepared):
    """(items with header errors, planned batches): headers probed locally; objects are not (their
    batches group by the decoded size, `Predictor._groups`)."""
    if run.inputs is None:
        return run.predictor.plan(run.items)
    return run.items, plan_batches(run.items, settings.batch_size, run.predictor.preprocess, settings.batching)


def _connect(ray_settings: RaySettings, progress: bool) -> tuple[bool, float]:
    """Connect to (or start) Ray; returns whether this call started it (and must shut it down) and
    the seconds that took."""
    import ray
    from ray.data import DataContext

    started = False
    clock = time.perf_counter()
    if not ray.is_initialized():
        if ray_settings.address is not None:
            ray.init(address=ray_settings.address, log_to_driver=False, logging_level=logging.WARNING)
        else:  # the embedded local Ray of a laptop run: all cores, and at least what the actors (and one
            # decoding task, when decoding in tasks) reserve (else the decoding would wait forever for a CPU)
            tasks = ray_settings.decode == "tasks"
            needed = math.ceil(ray_settings.actors * ray_settings.cpus_per_actor + tasks * ray_settings.decode_cpus)
            ray.init(num_cpus=ray_settings.num_cpus or max(os.cpu_count() or 1, needed), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        started = True
    context = DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    return started, round(time.perf_counter() - clock, 3)


def run_predict_ray(settings: PredictSettings, ray_settings: RaySettings = RaySettings()) -> PredictSummary:
    """Run a whole predict job on Ray into settings.out: the contract of `predict_run.run_predict`
    (usage errors before anything is written, the lock, resume, SIGTERM / SIGINT, the final merge)
    with the work done by Ray Data stages. Raises ImportError naming the extra without Ray."""
    if not ray_available():
        raise ImportError(MISSING_RAY)
    settings = dataclasses.replace(settings, outputs=settings.outputs or OutputOptions())
    try:  # a run folder in an object store: journals staged locally (engine.ray_storage)
        remote = Location.parse(settings.out) if is_uri(settings.out) else None
    except ValueError as err:
        raise PredictUsageError(f"--out {err}") from err
    out = Path(settings.out)
    if remote is None and out.exists() and not out.is_dir():
        raise PredictUsageError(f"--out {out}: is a file, not a folder (give a folder path; it is created if missing)")
    with StopOnSignals() as stop:
        run = _prepare(settings)
        staged = StagedOutput(remote) if remote is not None else None
        folder = RunFolder(out if staged is None else staged.folder)
        lock = folder.lock()
        try:
            lock.acquire()
        except RunFolderLocked as err:
            raise PredictUsageError(str(err)) from err
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise
            raise PredictUsageError(f"--out {out}: cannot create the folder or its lock file ({err.strerror})") from err
        try:
            if settings.overwrite:
                folder.clear()
                if remote is not None:
                    remote.clear()
            folder.remove_stale_temp_files()
            try:
                folder.check_compatible(run.fingerprint)
            except RunFolderMismatch as err:
                raise PredictUsageError(str(err)) from err
            import ray

            ray_settings = resolve_ray_settings(ray_settings, embedded=ray_settings.address is None
                                                and not ray.is_initialized())
            started_ray, start_seconds = _connect(ray_settings, settings.progress)
            try:  # ray.init installs its own SIGTERM handler (which aborts the driver): ours again, on top
                with StopOnSignals() as stop_on_ray:
                    if stop.requested:
                        stop_on_ray.signal_name = stop.signal_name
                    return _run_locked(settings, ray_settings, run, folder, staged, stop_on_ray, start_seconds)
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
        finally:
            lock.release()
            if staged is not None:
                staged.close()


def _run_locked(settings: PredictSettings, ray_settings: RaySettings, run: _Prepared, folder: RunFolder,
                staged: StagedOutput | None, stop: StopOnSignals, start_seconds: float) -> PredictSummary:
    """run_predict_ray once the driver holds the folder's lock and Ray is up (in `start_seconds`);
    `staged`: the run folder is in an object store, `folder` its local staging."""
    started = time.time()
    predictor, config = run.predictor, run.config
    probed, plan = _plan(settings, run)

    def write_run_info(info: dict[str, Any], *more: str) -> None:
        folder.write_run_info(info)
        if staged is not None:
            staged.sync([RUN_FILE, *more])

    run_info = start_run_info(settings, run.fingerprint, config, run.source, predictor.device, world_size=1,
                              engine="ray", ray={"address": ray_settings.address, "actors": ray_settings.actors,
                                                 "gpus_per_actor": ray_settings.gpus_per_actor,
                                                 "cpus_per_actor": ray_settings.cpus_per_actor,
                                                 "decode": ray_settings.decode})
    write_run_info(run_info)
    done = folder.open()
    synced = time.time()
    received = 0
    seen: set[str] = set()
    control = None
    load_seconds: list[float] = []
    try:
        for item in probed:  # header errors: written by the driver, as by rank 0
            if item.error is not None:
                folder.append_error(item, item.error)
        rows = unit_rows(plan, done)
        if rows and not stop.requested:
            control = start_control(folder.out, ray_settings.max_attempts)
            dataset = build_records_dataset(settings, ray_settings, rows, run, control)
            for row in dataset.iter_rows():
                if row["key"] in seen:  # a record again (a block retried after its actor died): once only
                    continue
                seen.add(row["key"])
                record = parse_record(row)
                if row["kind"] == "prediction":
                    folder.append_prediction(record)
                else:
                    folder.errors.append(record)
                received += 1
                if staged is not None and time.time() - synced > SYNC_SECONDS:
                    staged.sync([PREDICTIONS_FILE])  # what a rerun resumes from
                    synced = time.time()
                if stop.requested:
                    break
    except Exception as error:
        if not (isinstance(error, OSError) and error.errno == errno.ENOSPC):
            run_info.update(status="failed", failure=f"{type(error).__name__}: {error}")
            write_run_info(run_info, PREDICTIONS_FILE)
        raise
    finally:
        folder.close()
        if control is not None:
            import ray

            try:
                load_seconds = ray.get(control.model_load_seconds.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - timing only: a failed run's control may be gone
                pass
            ray.kill(control)
    if stop.requested:
        run_info["status"] = "interrupted"
        write_run_info(run_info, PREDICTIONS_FILE)
        raise PredictInterrupted(f"{stop.signal_name}: stopped; rerun the same command to resume")
    counts = folder.finalize(probed, config.category_ids)
    run_info.update({"status": "complete", "counts": counts,
                     "timing": {"wall_seconds": round(time.time() - started, 3), "images_this_run": received,
                                "ray_start_seconds": start_seconds, "model_load_seconds_per_actor": load_seconds}})
    write_run_info(run_info, PREDICTIONS_FILE, ERRORS_FILE, DETECTIONS_FILE)
    out = folder.out if staged is None else settings.out
    summary = PredictSummary(out=out, images=counts["images"], errors=counts["errors"],
                             detections=counts["detections"],
                             bytes=folder_bytes(folder.out) if staged is None else None)  # a bucket: not summed
    logger.info("%s", summary.text())
    return summary
