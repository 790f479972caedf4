"""The predict run folder: the one owner of its layout (file names), its writing, resume and
final merge (`RunFolder`), and its reading (`RunReader`, used by the report).

Layout (docs/ARCHITECTURE.md "Predict run folder"):

    OUT/run.json            settings + fingerprint, status "running" -> "complete", timing
    OUT/predictions.jsonl   one line per image; during the run an append-only journal
    OUT/errors.jsonl        {"file", "reason", "key", "image_id"[, "frame_index"]} per failed input
    OUT/detections.json     COCO results list, written at the end
    OUT/overlays/<key>.<fmt>, OUT/overlays/<key>/det_<k>.<fmt>, OUT/attention/<key>.npz
    OUT/attention/<method>/<key>.npz, OUT/overlays/<key>/<method>/det_<k>.<fmt>  with --explain, per
                            method other than raw (engine.method_outputs)
    OUT/attention/grids/<key>.npz  the viewer's data (engine.grids), with --save-attention
    OUT/.parts/             per-rank journals of a torchrun run (merged by rank 0, then removed)
    OUT/.lock               pid + host of the live run writing OUT (removed when it ends; not an output)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePath
from typing import Any, Callable, Iterable, Sequence

from detection.engine.journal import Journal, dumps_record, read_journal, repair_journal
from detection.engine.run_lock import RunLock
from detection.engine.sources import SourceItem
from detection.io import read_json, write_json_atomic, write_text_atomic

RUN_FILE = "run.json"
PREDICTIONS_FILE = "predictions.jsonl"
ERRORS_FILE = "errors.jsonl"
DETECTIONS_FILE = "detections.json"
PARTS_DIR = ".parts"
OVERLAYS_DIR = "overlays"
ATTENTION_DIR = "attention"
#: Inside ATTENTION_DIR (a key holds no '/', so no image's npz can be named like it).
GRIDS_DIR = f"{ATTENTION_DIR}/grids"
#: The live run's lock (engine.run_lock): not an output, so `--overwrite` (run under the lock)
#: keeps it; the run removes it when it ends.
LOCK_FILE = ".lock"
#: run.json's fingerprint key of the maps npz format (attention.maps.NPZ_FORMAT): a folder holding
#: another format is not resumed into (the message says so; `--overwrite` starts over).
MAPS_FORMAT_KEY = "maps_format"
#: Everything a predict run writes; `--overwrite` removes these and nothing else.
OWN_OUTPUTS = (RUN_FILE, PREDICTIONS_FILE, ERRORS_FILE, DETECTIONS_FILE, PARTS_DIR, OVERLAYS_DIR, ATTENTION_DIR)
#: Overlay formats predict writes (and the report finds).
OVERLAY_FORMATS = ("png", "jpg", "jpeg")


# -- names inside the folder (relative, '/'-separated: as predictions.jsonl records them) ---------
def overlay_name(key: str, image_format: str) -> str:
    """The combined overlay of image `key`."""
    return f"{OVERLAYS_DIR}/{key}.{image_format}"


def detection_overlay_name(key: str, index: int, image_format: str) -> str:
    """The overlay of detection `index` (0-based, predictions.jsonl order) of image `key`."""
    return f"{OVERLAYS_DIR}/{key}/det_{index}.{image_format}"


def attention_name(key: str) -> str:
    """The npz of per-detection maps of image `key` (see attention.maps.save_maps_npz)."""
    return f"{ATTENTION_DIR}/{key}.npz"


def method_attention_name(key: str, method: str) -> str:
    """The npz of explanation method `method`'s maps of image `key` (engine.method_outputs). A
    folder per method, not "<key>.<method>.npz": a key may itself end in ".<method>"."""
    return f"{ATTENTION_DIR}/{method}/{key}.npz"


def method_overlay_name(key: str, method: str, index: int, image_format: str) -> str:
    """The overlay of detection `index` of image `key` drawn with method `method`'s map."""
    return f"{OVERLAYS_DIR}/{key}/{method}/det_{index}.{image_format}"


def grids_name(key: str) -> str:
    """The viewer's data of image `key`: attention grids, encoder attention, image (engine.grids)."""
    return f"{GRIDS_DIR}/{key}.npz"


class RunFolderMismatch(ValueError):
    """The folder holds a run made with different settings (resuming would mix results)."""


def fingerprint_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _sort_key(record: dict[str, Any]) -> tuple[int, str]:
    return int(record.get("image_id", 0)), str(record.get("key", ""))


class RunFolder:
    """One rank's writing view of an output folder.

    Crash safety. Per image, the overlay / npz files are written first (each atomically: temp +
    fsync + rename), then ONE complete JSON line is appended to the journal with a single
    write() and fsync. So a journal line always means "this image is completely done"; a
    SIGKILL can at worst leave a trailing partial line, which `open` cuts off on the next run.

    Resume. Done = has a journal line. Failed inputs are retried on every run. `finalize`
    merges the journals, de-duplicates, sorts by image id and rewrites atomically, so the
    final files do not depend on processing order, interruptions, or the number of ranks /
    workers: byte-identical to an uninterrupted run (run.json differs in its timing only).
    """

    def __init__(self, out_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> None:
        self.out = Path(out_dir)
        self.rank = rank
        self.world_size = world_size
        self.predictions: Journal | None = None
        self.errors: Journal | None = None

    # -- paths ----------------------------------------------------------------------------
    def _journal_paths(self, rank: int) -> tuple[Path, Path]:
        if self.world_size == 1:
            return self.out / PREDICTIONS_FILE, self.out / ERRORS_FILE
        parts = self.out / PARTS_DIR
        return parts / f"predictions.rank{rank}.jsonl", parts / f"errors.rank{rank}.jsonl"

    def prediction_journals(self) -> list[Path]:
        paths = [self.out / PREDICTIONS_FILE]
        parts = self.out / PARTS_DIR
        if parts.is_dir():
            paths += sorted(parts.glob("predictions.rank*.jsonl"))
        return paths

    def overlay_path(self, key: str, suffix: str) -> Path:
        return self.out / overlay_name(key, suffix)

    def detection_overlay_path(self, key: str, index: int, suffix: str) -> Path:
        return self.out / detection_overlay_name(key, index, suffix)

    def attention_path(self, key: str) -> Path:
        return self.out / attention_name(key)

    def grids_path(self, key: str) -> Path:
        return self.out / grids_name(key)

    def method_attention_path(self, key: str, method: str) -> Path:
        return self.out / method_attention_name(key, method)

    def method_overlay_path(self, key: str, method: str, index: int, suffix: str) -> Path:
        return self.out / method_overlay_name(key, method, index, suffix)

    # -- lifecycle ------------------------------------------------------------------------
    def lock(self) -> RunLock:
        """The folder's lock (not yet acquired): one live run per folder, taken by one rank."""
        return RunLock(self.out / LOCK_FILE)

    def clear(self) -> None:
        """Remove only what a predict run writes (`OWN_OUTPUTS`), never other files in OUT."""
        for name in OWN_OUTPUTS:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def check_compatible(self, fingerprint: dict[str, Any]) -> None:
        """Raise RunFolderMismatch if OUT/run.json was written with other settings."""
        run_path = self.out / RUN_FILE
        if not run_path.exists():
            return
        try:
            previous = json.loads(run_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise RunFolderMismatch(f"{run_path}: unreadable ({err}); use another --out or --overwrite") from None
        old = previous.get("fingerprint", {})
        differing = fingerprint_mismatch(old, fingerprint)
        if MAPS_FORMAT_KEY in differing and MAPS_FORMAT_KEY in fingerprint and old.get("save_attention"):
            raise RunFolderMismatch(
                f"{self.out} holds attention maps in format {old.get(MAPS_FORMAT_KEY) or 'detr-attn-maps/1'} "
                f"(full-resolution maps); this version writes {fingerprint[MAPS_FORMAT_KEY]} (cell maps) and "
                "does not mix the two in one folder: use another --out, or --overwrite to start over "
                "(format-1 npz files stay readable)")
        if differing:
            raise RunFolderMismatch(
                f"{self.out} holds a run with different settings ({', '.join(differing)}); "
                "rerun with the same options to resume, or use another --out, or --overwrite")

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a killed run left behind (`.NAME.*.tmp` from detection.io).

        Call on one rank only, before any rank writes. Returns the number removed.
        """
        removed = 0
        if not self.out.is_dir():
            return 0
        for folder in (self.out, self.out / PARTS_DIR, self.out / OVERLAYS_DIR, self.out / ATTENTION_DIR):
            if not folder.is_dir():
                continue
            pattern = ".*.tmp" if folder == self.out or folder.name == PARTS_DIR else "**/.*.tmp"
            for path in folder.glob(pattern):
                if path.is_file():
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def write_run_info(self, info: dict[str, Any]) -> None:
        """Atomically (re)write OUT/run.json (the folder is created if needed)."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / RUN_FILE, info)

    def open(self) -> set[str]:
        """Repair this rank's journals, open them for appending; returns the keys already done.

        Every rank reads all prediction journals, so a resumed run may use another world size.
        This rank's error journal starts empty: failed inputs are retried on every run.
        """
        predictions_path, errors_path = self._journal_paths(self.rank)
        repair_journal(predictions_path)
        done: set[str] = set()
        for path in self.prediction_journals():
            done.update(str(r["key"]) for r in read_journal(path) if "key" in r)
        self.predictions = Journal(predictions_path)
        self.errors = Journal(errors_path, truncate=True)
        return done

    def close(self) -> None:
        for journal in (self.predictions, self.errors):
            if journal is not None:
                journal.close()

    # -- records --------------------------------------------------------------------------
    def append_prediction(self, record: dict[str, Any]) -> None:
        assert self.predictions is not None, "RunFolder.open() first"
        self.predictions.append(record)

    def append_error(self, item: SourceItem, reason: str) -> None:
        assert self.errors is not None, "RunFolder.open() first"
        self.errors.append(error_record(item, reason))

    # -- final merge (rank 0 / single process, after all ranks finished) --------------------
    def finalize(self, items: Sequence[SourceItem], category_ids: Sequence[int]) -> dict[str, int]:
        """Merge journals into sorted predictions.jsonl, errors.jsonl, detections.json.

        Only records of `items` (the current inputs) are kept; image ids are re-taken from
        `items`. Returns counts {"images", "errors", "detections"}.
        """
        by_key = {it.key: it for it in items}
        merged: dict[str, dict[str, Any]] = {}
        for path in self.prediction_journals():
            for record in read_journal(path):
                item = by_key.get(str(record.get("key")))
                if item is None:
                    continue
                record["image_id"] = item.image_id
                merged[item.key] = record
        predictions = sorted(merged.values(), key=_sort_key)

        error_paths = [self.out / ERRORS_FILE] if self.world_size == 1 else sorted(
            (self.out / PARTS_DIR).glob("errors.rank*.jsonl"))
        errors: dict[str, dict[str, Any]] = {}
        for path in error_paths:
            for record in read_journal(path):
                key = str(record.get("key"))
                if key in by_key and key not in merged:
                    record["image_id"] = by_key[key].image_id
                    errors[key] = record
        error_list = sorted(errors.values(), key=_sort_key)

        write_text_atomic(self.out / PREDICTIONS_FILE, "".join(dumps_record(r) + "\n" for r in predictions))
        write_text_atomic(self.out / ERRORS_FILE, "".join(dumps_record(r) + "\n" for r in error_list))
        write_json_atomic(self.out / DETECTIONS_FILE, coco_results(predictions), indent=None)
        if self.world_size > 1 or (self.out / PARTS_DIR).exists():
            for path in sorted((self.out / PARTS_DIR).glob("*.jsonl")):
                path.unlink(missing_ok=True)
            try:
                (self.out / PARTS_DIR).rmdir()
            except OSError:
                pass
        return {"images": len(predictions), "errors": len(error_list),
                "detections": sum(len(r["detections"]) for r in predictions)}


def error_record(item: SourceItem, reason: str) -> dict[str, Any]:
    """One errors.jsonl line."""
    record: dict[str, Any] = {"file": item.file, "reason": reason, "key": item.key, "image_id": item.image_id}
    if item.frame_index is not None:
        record["frame_index"] = item.frame_index
    return record


def coco_results(predictions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """predictions.jsonl records -> COCO results list (+ file_name, class_name, query_index)."""
    results = []
    for record in predictions:
        for det in record["detections"]:
            entry = {
                "image_id": record["image_id"],
                "category_id": det["category_id"],
                "bbox": det["bbox"],
                "score": det["score"],
                "file_name": record["file"],
                "class_name": det["class_name"],
                "query_index": det["query_index"],
            }
            if "frame_index" in record:
                entry["frame_index"] = record["frame_index"]
            results.append(entry)
    return results


# -- reading a finished (or hand-made) run folder ------------------------------------------------
def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON-lines file as a dict; ValueError names the file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def stem_candidates(file: str) -> list[str]:
    """Possible keys of an image path in a run folder written without "key" fields, most
    specific first: the key is the path relative to its input root, '/' -> '__', extension
    dropped; the root is not recorded, so every suffix of the path is a candidate."""
    path = PurePath(file)
    parts = [part for part in path.with_suffix("").parts if part not in ("", ".", "/", path.anchor)]
    return ["__".join(parts[i:]) for i in range(len(parts))]


class RunReader:
    """Reads a predict run folder; never writes and never runs a model.

    Raises FileNotFoundError when the folder or its predictions.jsonl is missing, and
    ValueError naming the file (and line) for unreadable contents.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.root = Path(run_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: run folder does not exist")
        predictions = self.root / PREDICTIONS_FILE
        if not predictions.is_file():
            raise FileNotFoundError(f"{predictions}: missing (is {self.root} a `detr-attn predict` run folder?)")

    def info(self) -> dict[str, Any] | None:
        """run.json, or None when the folder has none."""
        path = self.root / RUN_FILE
        if not path.is_file():
            return None
        info = read_json(path, "run file")
        if not isinstance(info, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return info

    def predictions(self) -> list[dict[str, Any]]:
        """predictions.jsonl lines in file order, each checked for "file" and a "detections" list."""
        path = self.root / PREDICTIONS_FILE
        rows = read_json_lines(path)
        for number, row in enumerate(rows, start=1):
            for field in ("file", "detections"):
                if field not in row:
                    raise ValueError(f"{path} line {number}: missing {field!r}")
            if not isinstance(row["detections"], list):
                raise ValueError(f"{path} line {number}: 'detections' must be a list")
        return rows

    def errors(self) -> list[dict[str, Any]]:
        """errors.jsonl lines ([] when the file is absent)."""
        path = self.root / ERRORS_FILE
        return read_json_lines(path) if path.is_file() else []

    def image_key(self, record: dict[str, Any]) -> str | None:
        """The record's key: its "key" field (or an older "stem"), else the first candidate
        of its file path that has files in the folder; None when nothing matches."""
        for field in ("key", "stem"):  # written by the engine (exact, handles "~2" de-duplication)
            if isinstance(record.get(field), str) and record[field]:
                return record[field]
        for candidate in stem_candidates(str(record["file"])):
            if self._find_image(lambda fmt: overlay_name(candidate, fmt)) or (self.root / OVERLAYS_DIR / candidate).is_dir():
                return candidate
            if (self.root / attention_name(candidate)).is_file():
                return candidate
        return None

    def overlay(self, record: dict[str, Any], key: str) -> Path | None:
        """The combined overlay: the record's "overlay" path when it names a file inside the
        folder, else overlays/<key>.<png|jpg|jpeg>, else None."""
        return self._inside(record.get("overlay")) or self._find_image(lambda fmt: overlay_name(key, fmt))

    def detection_overlays(self, key: str, count: int) -> list[Path | None]:
        """Per-detection overlays of image `key` (None where a file is missing)."""
        return [self._find_image(lambda fmt: detection_overlay_name(key, k, fmt)) for k in range(count)]

    def method_detection_overlays(self, key: str, method: str, count: int) -> list[Path | None]:
        """Per-detection overlays of image `key` drawn with explanation method `method` (None where missing)."""
        return [self._find_image(lambda fmt: method_overlay_name(key, method, k, fmt)) for k in range(count)]

    def method_attention(self, key: str, method: str) -> Path | None:
        """attention/<method>/<key>.npz, or None when the run did not save it."""
        path = self.root / method_attention_name(key, method)
        return path if path.is_file() else None

    def attention(self, key: str) -> Path | None:
        path = self.root / attention_name(key)
        return path if path.is_file() else None

    def grids(self, key: str) -> Path | None:
        """attention/grids/<key>.npz (the viewer's data), or None when the run did not save it."""
        path = self.root / grids_name(key)
        return path if path.is_file() else None

    def _find_image(self, name: Callable[[str], str]) -> Path | None:
        """The first existing file of name(format) over OVERLAY_FORMATS."""
        for image_format in OVERLAY_FORMATS:
            candidate = self.root / name(image_format)
            if candidate.is_file():
                return candidate
        return None

    def _inside(self, relative: Any) -> Path | None:
        if not isinstance(relative, str) or not relative:
            return None
        path = (self.root / relative).resolve()
        return path if path.is_file() and self.root.resolve() in path.parents else None
