"""One rank's writing view of a predict run folder: journals, resume, overwrite, the final merge
(`RunFolder`), and the fingerprint check that refuses to mix runs."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from detection.data.sources import SourceItem
from detection.io import write_json_atomic, write_text_atomic
from detection.runfolder.journal import Journal, dumps_record, read_journal, repair_journal
from detection.runfolder.layout import (ATTENTION_DIR, DETECTIONS_FILE, ERRORS_FILE, LOCK_FILE, OVERLAYS_DIR,
                                        OWN_OUTPUTS, PARTS_DIR, PREDICTIONS_FILE, RUN_FILE, attention_name,
                                        detection_overlay_name, grids_name, image_overlays_dir,
                                        method_attention_name, overlay_name, tokens_name)
from detection.runfolder.lock import RunLock
from detection.runfolder.records import coco_results, error_record
from detection.runfolder.versions import MAPS_FORMAT_KEY


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

    def overlay_path(self, key: str, method: str, suffix: str) -> Path:
        return self.out / overlay_name(key, method, suffix)

    def detection_overlay_path(self, key: str, index: int, method: str, suffix: str, style: str = "heatmap") -> Path:
        return self.out / detection_overlay_name(key, index, method, suffix, style)

    def image_overlay_bytes(self, key: str, method: str, suffix: str) -> int:
        """Bytes of image `key`'s overlays on disk: its combined overlay (`method`'s) and every
        per-detection overlay of every method."""
        combined = self.overlay_path(key, method, suffix)
        total = combined.stat().st_size if combined.is_file() else 0
        folder = self.out / image_overlays_dir(key)
        if folder.is_dir():
            total += sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        return total

    def attention_path(self, key: str) -> Path:
        return self.out / attention_name(key)

    def grids_path(self, key: str) -> Path:
        return self.out / grids_name(key)

    def tokens_path(self, key: str) -> Path:
        return self.out / tokens_name(key)

    def method_attention_path(self, key: str, method: str) -> Path:
        return self.out / method_attention_name(key, method)

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
