"""Reading a finished (or hand-made) predict run folder: records, errors, and where each image's
overlays, maps and grids are (`RunReader`); never writes, never runs a model."""
from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Any, Callable

from detection.io import read_json
from detection.attention.methods.table import DEFAULT_METHOD
from detection.runfolder.layout import (ERRORS_FILE, OVERLAY_FORMATS, OVERLAYS_DIR, POINTS_VIEW, PREDICTIONS_FILE,
                                        RUN_FILE, attention_name, detection_overlay_name, grids_name,
                                        legacy_overlay_name, method_attention_name, overlay_name)
from detection.runfolder.records import read_json_lines


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
            if self._find_overlay(candidate, None, DEFAULT_METHOD) or (self.root / OVERLAYS_DIR / candidate).is_dir():
                return candidate
            if (self.root / attention_name(candidate)).is_file():
                return candidate
        return None

    def overlay(self, record: dict[str, Any], key: str) -> Path | None:
        """The combined overlay: the record's "overlay" path when it names a file inside the
        folder, else overlays/<key>.<default method>.<png|jpg|jpeg> (or an older folder's
        overlays/<key>.<fmt>), else None."""
        return self._inside(record.get("overlay")) or self._find_overlay(key, None, DEFAULT_METHOD)

    def detection_overlays(self, key: str, count: int, method: str = DEFAULT_METHOD) -> list[Path | None]:
        """Per-detection overlays of image `key` drawn with explanation method `method` (heat map
        or point view; None where a file is missing)."""
        return [self._find_overlay(key, k, method) for k in range(count)]

    def method_attention(self, key: str, method: str) -> Path | None:
        """attention/<method>/<key>.npz, or None when the run did not save it."""
        path = self.root / method_attention_name(key, method)
        return path if path.is_file() else None

    def attention(self, key: str) -> Path | None:
        path = self.root / attention_name(key)
        return path if path.is_file() else None

    def tokens(self, record: dict[str, Any]) -> Path | None:
        """A prompted detector's token scores of the record's image (predictions.jsonl's "tokens"),
        or None when the run did not save them."""
        return self._inside(record.get("tokens"))

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

    def _find_overlay(self, key: str, index: int | None, method: str) -> Path | None:
        """Detection `index`'s overlay (None: the combined one) drawn from `method`: its heat map,
        else its point view, else where an older folder put it (`layout.legacy_overlay_name`)."""
        if index is None:
            names = [lambda fmt: overlay_name(key, method, fmt)]
        else:
            names = [lambda fmt: detection_overlay_name(key, index, method, fmt),
                     lambda fmt: detection_overlay_name(key, index, method, fmt, POINTS_VIEW)]
        names.append(lambda fmt: legacy_overlay_name(key, index, method, DEFAULT_METHOD, fmt))
        for name in names:
            found = self._find_image(name)
            if found is not None:
                return found
        return None

    def _inside(self, relative: Any) -> Path | None:
        if not isinstance(relative, str) or not relative:
            return None
        path = (self.root / relative).resolve()
        return path if path.is_file() and self.root.resolve() in path.parents else None
