"""The stages of a predict run on Ray Data (engine.ray_run builds the dataset): work units as rows,
decoding in CPU tasks, the model on an actor pool writing each image's files through the one
per-image write path, and the run's control actor that bounds the retries of a unit whose model
process dies. Ray itself is imported only inside functions (an optional extra, `detection[ray]`).

Rows between the stages (one per work unit: a still-image batch, or a whole video):
    planned  {"unit": int64, "batches": bytes (pickled list[PlannedBatch]), "skip": bytes (pickled keys)}
    decoded  {"unit": int64, "loaded": bytes (pickled list[LoadedBatch]), "skip": bytes}
    records  {"key": str, "image_id": int64, "kind": "prediction" | "error", "record": str}
             (record: the predictions.jsonl or errors.jsonl line, `runfolder.journal.dumps_record`);
             with typed columns (`ray_run.ray_records`) the Arrow rows of `engine.ray_records`
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from detection.engine.display import DisplaySpec
from detection.engine.image_files import write_image_files
from detection.engine.loading import BatchLoadingDataset, LoadedBatch
from detection.engine.planning import PlannedBatch
from detection.engine.predict_methods import image_maps, image_token_scores, token_scorer
from detection.engine.run_setup import build_run_model
from detection.engine.ray_records import error_row, journal_columns, prediction_row, records_table
from detection.engine.ray_storage import Location, is_uri, localized
from detection.models.registry import load_model
from detection.runtime.device import resolve_device
from detection.models.contract import PreprocessSpec
from detection.runfolder.records import error_record
from detection.runfolder.run_folder import RunFolder

logger = logging.getLogger(__name__)

#: How many times a unit may kill its model process before its images become error records.
DEFAULT_MAX_ATTEMPTS = 3


def unit_rows(plan: Sequence[PlannedBatch], done: set[str] | frozenset[str]) -> list[dict[str, Any]]:
    """The planned rows: one per work unit with an image not yet done (a partly done unit runs
    whole, as on one host, so its numbers equal those of an uninterrupted run)."""
    units: dict[int, list[PlannedBatch]] = {}
    for batch in plan:
        units.setdefault(batch.unit, []).append(batch)
    rows = []
    for unit in sorted(units):
        keys = {item.key for batch in units[unit] for item in batch.items}
        if keys <= done:
            continue
        rows.append({"unit": unit, "batches": pickle.dumps(units[unit]), "skip": pickle.dumps(sorted(keys & done))})
    return rows


@dataclass(frozen=True)
class DecodeSpec:
    """What the decoding tasks make of each image (the model's resize rule, the writers' display
    images, the original pixels for methods that run the model on them): `engine.loading`."""

    preprocess: PreprocessSpec
    keep_rgb: bool
    max_pixels: int | None
    display: DisplaySpec | None
    #: the object store of URI inputs (engine.ray_storage), None: local paths
    source: Location | None = None


def decode_unit(blob: bytes, spec: DecodeSpec) -> list[LoadedBatch]:
    """One planned unit (a pickled list[PlannedBatch]) decoded by the single-host loader (EXIF,
    modes, size guard; a file that fails is a sample with its error record's reason). Objects of
    URI inputs are copied to a local temporary folder for the loader; the samples keep the URIs."""
    batches: list[PlannedBatch] = pickle.loads(blob)
    with tempfile.TemporaryDirectory(prefix="detection-ray-in-") as local:
        originals = {}
        if spec.source is not None:  # objects -> local files for the one loader; records keep the URIs
            for position, planned in enumerate(batches):
                copies = localized(planned.items, spec.source, Path(local) / str(position))
                originals.update({copy.key: item for copy, item in zip(copies, planned.items)})
                batches[position] = dataclasses.replace(planned, items=tuple(copies))
        dataset = BatchLoadingDataset(batches, spec.preprocess, keep_rgb=spec.keep_rgb,
                                      max_pixels=spec.max_pixels, display=spec.display)
        decoded = list(dataset)
    for part in decoded:
        for sample in part.samples:
            sample.item = originals.get(sample.item.key, sample.item)
    return decoded


@dataclass
class UnitFailed:
    """A unit whose decoding process died on each of its tries: its images (not yet done) and the
    reason their error records give. Travels in place of the decoded unit, to the model stage."""

    items: list
    reason: str


def _died_reason(stage: str, tries: int) -> str:
    return (f"the {stage} process died on each of {tries} tries at this image's batch "
            f"(killed or crashed: out of memory, a native crash); not tried again")


def decode_units(batch: dict[str, np.ndarray], spec: DecodeSpec, control: Any, max_attempts: int,
                 unit_hook: Callable[[list[str]], None] | None = None) -> dict[str, np.ndarray]:
    """Decoding stage (a CPU task, one thread): planned rows -> decoded rows (`decode_unit`). Ray
    Data retries a task whose process dies without end; the run's control actor counts the tries
    at each unit, and a unit past `max_attempts` goes on as `UnitFailed` (error records). A unit
    that decoded once counts 1 when its block runs again. `unit_hook(keys)`: fault injection."""
    import cv2
    import ray

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    loaded = []
    for unit, blob in zip(batch["unit"], batch["batches"]):
        attempt = ray.get(control.begin.remote(int(unit), "decode"))
        if attempt > max_attempts:
            loaded.append(pickle.dumps(UnitFailed(_unit_items(pickle.loads(blob)), _died_reason("decoding", max_attempts))))
            continue
        if unit_hook is not None:
            unit_hook([item.key for item in _unit_items(pickle.loads(blob))])
        loaded.append(pickle.dumps(decode_unit(blob, spec)))
        ray.get(control.finish.remote(int(unit), "decode"))
    return {"unit": batch["unit"], "loaded": np.array(loaded, dtype=object), "skip": batch["skip"]}


def _unit_items(unit: list[PlannedBatch] | list[LoadedBatch] | UnitFailed) -> list:
    """The items of a planned, decoded or failed unit."""
    if isinstance(unit, UnitFailed):
        return unit.items
    return [item for part in unit for item in (part.items if isinstance(part, PlannedBatch)
                                                else [sample.item for sample in part.samples])]


class RunControl:
    """The run's control actor (one per run, named CONTROL_PREFIX...): counts the attempts at each
    unit, so a unit whose model process dies is retried at most `max_attempts` times, and keeps
    the model actors' (pid, node id) for whoever watches the run (tests kill one by its pid)."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts
        self.attempts: dict[tuple[int, str], int] = {}
        self.finished: set[tuple[int, str]] = set()
        self.workers: list[tuple[int, str]] = []
        self.load_seconds: list[float] = []

    def begin(self, unit: int, stage: str = "model") -> int:
        """Count one more attempt at `unit` in `stage` ("model" or "decode"); returns the attempt
        number (1 = the first). A unit that finished the stage once counts 1 when it runs again
        (a block of units retried whole after a later unit killed its process: only the unit that
        was running counts the death)."""
        if (unit, stage) in self.finished:
            return 1
        self.attempts[unit, stage] = self.attempts.get((unit, stage), 0) + 1
        return self.attempts[unit, stage]

    def finish(self, unit: int, stage: str = "model") -> None:
        """`unit` went through `stage`."""
        self.finished.add((unit, stage))

    def register(self, pid: int, node_id: str, load_seconds: float) -> int:
        """A model actor started (or restarted) in process `pid` on node `node_id` and loaded the
        model in `load_seconds`; returns the most attempts a unit may take."""
        self.workers.append((pid, node_id))
        self.load_seconds.append(load_seconds)
        return self.max_attempts

    def model_workers(self) -> list[tuple[int, str]]:
        """(pid, node id) of every model actor started so far (restarts included)."""
        return list(self.workers)

    def model_load_seconds(self) -> list[float]:
        """How long each model actor took to load and prepare the model."""
        return list(self.load_seconds)


#: The run control actors' names start so (then a hash of OUT and the run's own id).
CONTROL_PREFIX = "detection-ray-control-"


def start_control(out: str | os.PathLike, max_attempts: int, named: bool = True):
    """The run's control actor (a CPU-less actor on the driver's cluster; see RunControl). named: a
    run's (killed by its driver at the end, found by name meanwhile); unnamed: a records dataset's
    (`ray_run.ray_records`), which lives while a handle does (the dataset's), then goes."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=0)(RunControl)
    if not named:
        return actor.remote(max_attempts)
    name = (CONTROL_PREFIX + hashlib.sha1(os.path.abspath(os.fspath(out)).encode()).hexdigest()[:12]
            + "-" + uuid.uuid4().hex[:8])
    return actor.options(name=name).remote(max_attempts)


class ModelWorker:
    """Model stage (a Ray actor): loads and prepares the model once, as a single-host run does
    (`run_setup.build_run_model`), then for each decoded unit runs the model and the --explain
    methods and writes each image's files through `image_files.write_image_files`; returns the
    unit's records: the journal's columns, or with `methods` (not None) the typed columns of
    `engine.ray_records` with a map column per method. With `decode` (a DecodeSpec) the rows are
    the planned ones and the actor decodes them itself (`decode_unit`: no decoded batch crosses
    the object store; the choice for one machine); without, they come from the decoding tasks.
    `unit_hook(keys)`, when given, is called before a unit runs (fault injection)."""

    def __init__(self, settings: Any, control: Any, unit_hook: Callable[[list[str]], None] | None = None,
                 methods: Sequence[str] | None = None, decode: DecodeSpec | None = None) -> None:
        import ray

        started = time.perf_counter()
        self.settings, self.control, self.unit_hook, self.methods = settings, control, unit_hook, methods
        self.decode = decode
        device = resolve_device(settings.device)
        model = load_model(settings.model, device="cpu", prompt=settings.prompt)
        self.predictor, self.runner, prepared = build_run_model(settings, model, device)
        self.scorer = token_scorer(self.predictor, settings.outputs)  # a prompted model's token scores
        prepared.release_source()
        self.category_ids = self.predictor.config.category_ids
        self.explain = settings.explain.extra_methods if settings.explain is not None else None
        # a run folder in an object store: each image's files staged here, then uploaded
        self.remote = Location.parse(settings.out) if is_uri(settings.out) else None
        self.folder = RunFolder(settings.out if self.remote is None else tempfile.mkdtemp(prefix="detection-ray-"))
        self.torch_threads = torch.get_num_threads()
        self.max_attempts = ray.get(control.register.remote(os.getpid(), ray.get_runtime_context().get_node_id(),
                                                            round(time.perf_counter() - started, 3)))

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import ray

        rows: list[dict[str, Any]] = []
        blobs = batch["loaded"] if self.decode is None else batch["batches"]
        for unit, blob, skip_blob in zip(batch["unit"], blobs, batch["skip"]):
            skip = set(pickle.loads(skip_blob))
            # counted before decoding: an image that kills its decoding in this process counts too
            attempt = ray.get(self.control.begin.remote(int(unit)))
            if attempt > self.max_attempts:  # it killed its model process every time: no endless retry loop
                items = _unit_items(pickle.loads(blob))
                reason = _died_reason("model", self.max_attempts)
                rows.extend(error_row(error_record(item, reason)) for item in items if item.key not in skip)
                continue
            loaded = pickle.loads(blob) if self.decode is None else decode_unit(blob, self.decode)
            if isinstance(loaded, UnitFailed):  # its decoding tasks died each time
                rows.extend(error_row(error_record(item, loaded.reason)) for item in loaded.items
                            if item.key not in skip)
                ray.get(self.control.finish.remote(int(unit)))
                continue
            if self.unit_hook is not None:
                self.unit_hook([sample.item.key for part in loaded for sample in part.samples
                                if sample.item.key not in skip])
            for part in loaded:
                rows.extend(self._run(part, skip))
            ray.get(self.control.finish.remote(int(unit)))
        return journal_columns(rows) if self.methods is None else records_table(rows, self.methods)

    def _run(self, loaded: LoadedBatch, skip: set[str]) -> list[dict[str, Any]]:
        """One planned batch, as the single-host run's `_predict_shard` does for each result."""
        rows = []
        for result in self.predictor._run_loaded(loaded, skip):  # noqa: SLF001 - the engine's own predictor
            if result.error is not None:
                rows.append(error_row(error_record(result.item, result.error)))
                continue
            try:
                maps = image_maps(self.runner, result)
                tokens = image_token_scores(self.predictor, result) if self.scorer is not None else None
            except Exception as err:  # noqa: BLE001 - one image's explanation must not stop the run
                rows.append(error_row(error_record(
                    result.item, f"explanation methods failed: {type(err).__name__}: {err}")))
                continue
            try:
                record = write_image_files(self.folder, result, maps, self.settings.outputs, self.category_ids,
                                           self.explain, tokens)
                if self.remote is not None:
                    self.remote.upload_tree(self.folder.out)
            except OSError:
                raise  # disk full / permissions: the task fails (Ray retries it), a rerun resumes
            except Exception as err:  # noqa: BLE001 - one image's output must not stop the run
                rows.append(error_row(error_record(
                    result.item, f"writing outputs failed: {type(err).__name__}: {err}")))
                continue
            finally:
                if self.remote is not None:  # the staging holds one image's files at a time
                    shutil.rmtree(self.folder.out, ignore_errors=True)
            rows.append(prediction_row(record, result.detections, maps, self.methods or ()))
        return rows


def parse_record(row: dict[str, Any]) -> dict[str, Any]:
    """A records row's journal line as a dict."""
    return json.loads(row["record"])
