"""The predict run folder: streaming journals, per-image files, resume, final merge.

Layout (docs/ARCHITECTURE.md "Predict run folder"):

    OUT/run.json            settings + fingerprint, status "running" -> "complete", timing
    OUT/predictions.jsonl   one line per image; during the run an append-only journal
    OUT/errors.jsonl        {"file", "reason", "key", "image_id"[, "frame_index"]} per failed input
    OUT/detections.json     COCO results list, written at the end
    OUT/overlays/<key>.png, OUT/overlays/<key>/det_<k>.png, OUT/attention/<key>.npz
    OUT/.parts/             per-rank journals of a torchrun run (merged by rank 0, then removed)

Crash safety. Per image, the overlay / npz files are written first (each atomically: temp +
fsync + rename), then ONE complete JSON line is appended to the journal with a single
write() and fsync. So a journal line always means "this image is completely done". A SIGKILL
can at worst leave a trailing partial line, which `repair_journal` cuts off on the next run.

Resume. Done = has a journal line. Rerunning the same command skips done images (their
planned batches too, when all members are done) and finishes the rest. Failed inputs are
retried on every run. At the end the journals are merged, de-duplicated, sorted by image id
and rewritten atomically, so the final files do not depend on processing order, on
interruptions, or on the number of ranks / workers: byte-identical to an uninterrupted run
(run.json differs in its timing fields only).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

from detection.engine.sources import SourceItem
from detection.io import write_json_atomic, write_text_atomic

RUN_FILE = "run.json"
PREDICTIONS_FILE = "predictions.jsonl"
ERRORS_FILE = "errors.jsonl"
DETECTIONS_FILE = "detections.json"
PARTS_DIR = ".parts"


class RunFolderMismatch(ValueError):
    """The folder holds a run made with different settings (resuming would mix results)."""


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def repair_journal(path: Path) -> int:
    """Cut a trailing partial line (left by a kill mid-write); returns bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as handle:
        # find the last newline, scanning back in blocks
        end = size
        block = 65536
        last_newline = -1
        while end > 0 and last_newline < 0:
            start = max(0, end - block)
            handle.seek(start)
            chunk = handle.read(end - start)
            found = chunk.rfind(b"\n")
            if found >= 0:
                last_newline = start + found
            end = start
        keep = last_newline + 1
        if keep < size:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        return size - keep


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of a journal (a trailing partial line is ignored)."""
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    lines.pop()  # "" after the final newline, or a partial line left by a kill
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: corrupt journal line ({err}); delete the run folder or this file") from None
    return records


class Journal:
    """Append-only JSON-lines file: each record is one write() of a complete line + fsync."""

    def __init__(self, path: Path, truncate: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self._fd = os.open(path, flags, 0o644)
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        data = (_dumps(record) + "\n").encode("utf-8")
        with self._lock:
            written = os.write(self._fd, data)
            while written < len(data):  # regular files write fully; loop for safety
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def fingerprint_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _sort_key(record: dict[str, Any]) -> tuple[int, str]:
    return int(record.get("image_id", 0)), str(record.get("key", ""))


class RunFolder:
    """One rank's view of an output folder.

    items: every item of the run (all ranks), to recompute ids and drop stale records.
    fingerprint: settings that change outputs; a folder made with others is refused.
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
        return self.out / "overlays" / f"{key}.{suffix}"

    def detection_overlay_path(self, key: str, index: int, suffix: str) -> Path:
        return self.out / "overlays" / key / f"det_{index}.{suffix}"

    def attention_path(self, key: str) -> Path:
        return self.out / "attention" / f"{key}.npz"

    # -- lifecycle ------------------------------------------------------------------------
    def check_compatible(self, fingerprint: dict[str, Any]) -> None:
        """Raise RunFolderMismatch if OUT/run.json was written with other settings."""
        run_path = self.out / RUN_FILE
        if not run_path.exists():
            return
        try:
            previous = json.loads(run_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise RunFolderMismatch(f"{run_path}: unreadable ({err}); use another --out or --overwrite") from None
        differing = fingerprint_mismatch(previous.get("fingerprint", {}), fingerprint)
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
        for folder in (self.out, self.out / PARTS_DIR, self.out / "overlays", self.out / "attention"):
            if not folder.is_dir():
                continue
            pattern = ".*.tmp" if folder == self.out or folder.name == PARTS_DIR else "**/.*.tmp"
            for path in folder.glob(pattern):
                if path.is_file():
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

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
        `items`. Returns counts.
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

        write_text_atomic(self.out / PREDICTIONS_FILE, "".join(_dumps(r) + "\n" for r in predictions))
        write_text_atomic(self.out / ERRORS_FILE, "".join(_dumps(r) + "\n" for r in error_list))
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
