"""What a report shows of a predict run folder, read through `runfolder.reader.RunReader` (the
layout's one owner), and the text rows that the HTML page and the PDF both print."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detection.attention.methods import DEFAULT_METHOD
from detection.attention.token_scores import TokenScores
from detection.runfolder.reader import RunReader
from detection.runfolder.tokens_npz import load_tokens_npz


# -- reading the run folder (through runfolder, the layout's one owner) ----------------------
@dataclass
class ImageEntry:
    """One line of predictions.jsonl plus the files the run folder holds for it."""

    file: str
    image_id: Any
    width: int
    height: int
    detections: list[dict]
    stem: str | None
    overlay: Path | None
    detection_overlays: list[Path | None] = field(default_factory=list)
    #: method -> per-detection overlays drawn with that explanation method (predict --explain;
    #: raw's are `detection_overlays`), in the order the run lists the methods
    method_overlays: dict[str, list[Path | None]] = field(default_factory=dict)
    #: a prompted detector's token scores of the detections (predict --save-attention), or None
    token_scores: TokenScores | None = None


@dataclass
class RunContents:
    run_dir: Path
    info: dict
    images: list[ImageEntry]
    errors: list[dict]
    notes: list[str]

    @property
    def detection_count(self) -> int:
        return sum(len(entry.detections) for entry in self.images)

    @property
    def methods(self) -> list[str]:
        """The explanation methods other than raw whose overlays the run saved (predict --explain)."""
        return list(dict.fromkeys(method for entry in self.images for method in entry.method_overlays))


def _image_entry(row: dict, reader: RunReader) -> ImageEntry:
    stem = reader.image_key(row)
    overlay = per_detection = None
    per_method: dict[str, list[Path | None]] = {}
    if stem is not None:
        overlay = reader.overlay(row, stem)
        per_detection = reader.detection_overlays(stem, len(row["detections"]))
        methods = row.get("methods") if isinstance(row.get("methods"), dict) else {}
        for method in methods:
            paths = reader.detection_overlays(stem, len(row["detections"]), str(method))
            if any(path is not None for path in paths):
                per_method[str(method)] = paths
    return ImageEntry(
        file=str(row["file"]),
        image_id=row.get("image_id"),
        width=int(row.get("width") or 0),
        height=int(row.get("height") or 0),
        detections=row["detections"],
        stem=stem,
        overlay=overlay,
        detection_overlays=per_detection or [None] * len(row["detections"]),
        method_overlays=per_method,
        token_scores=read_token_scores(row, reader),
    )


def read_token_scores(row: dict, reader: RunReader) -> TokenScores | None:
    """The token scores of a predictions.jsonl row (detection k = row k), or None when the run saved
    none (a closed-set model, or predict without --save-attention). ValueError names the file."""
    path = reader.tokens(row)
    if path is None:
        return None
    scores, _ = load_tokens_npz(path)
    if len(scores) != len(row["detections"]):
        raise ValueError(f"{path}: token scores of {len(scores)} detections for {len(row['detections'])}")
    return scores


def read_run(run_dir: str | os.PathLike) -> RunContents:
    """Parse a predict run folder. Raises FileNotFoundError / ValueError naming the bad file."""
    reader = RunReader(run_dir)
    notes: list[str] = []
    info = reader.info()
    if info is None:
        info = {}
        notes.append("run.json is missing: model and settings unknown")
    entries: dict[Any, ImageEntry] = {}
    for row in reader.predictions():
        entry = _image_entry(row, reader)
        # a resumed run may repeat an image: the last line wins
        entries[entry.image_id if entry.image_id is not None else entry.file] = entry
    images = sorted(entries.values(), key=lambda e: (e.image_id is None, str(type(e.image_id)), e.image_id or 0, e.file))
    errors = reader.errors()
    missing = sum(1 for e in images if e.overlay is None)
    if missing:
        notes.append(f"{missing} image(s) have no overlay in overlays/ (run predict with --overlays)")
    return RunContents(run_dir=reader.root, info=info, images=images, errors=errors, notes=notes)



# -- text the HTML page and the PDF both print -------------------------------------------------------
def settings_rows(info: dict) -> list[tuple[str, str]]:
    """Flatten run.json one level for display; long lists are summarised."""

    def show(value: Any) -> str:
        if isinstance(value, list):
            if len(value) > 12:
                return f"{len(value)} items: " + ", ".join(map(str, value[:8])) + ", ..."
            return ", ".join(map(str, value))
        if isinstance(value, dict):
            return json.dumps(value, sort_keys=True, ensure_ascii=False)
        return str(value)

    rows: list[tuple[str, str]] = []
    for key in sorted(info):
        value = info[key]
        if isinstance(value, dict) and value:
            rows.extend((f"{key}.{sub}", show(value[sub])) for sub in sorted(value))
        else:
            rows.append((key, show(value)))
    return rows


def detection_cells(index: int, det: dict) -> list[str]:
    """The detections table's row for detection `index`: #, class, score, box x, y, w, h, query."""
    bbox = det.get("bbox") or [0, 0, 0, 0]
    name = det.get("class_name", det.get("label", ""))
    score = det.get("score")
    return [
        str(index),
        str(name),
        f"{float(score):.3f}" if score is not None else "",
        ", ".join(f"{float(v):.1f}" for v in bbox),
        str(det.get("query_index", "")),
    ]


def detection_caption(index: int, det: dict) -> str:
    """"#k <class> <score> (query q)" for figure captions and PDF tile titles."""
    _, name, score, _, query = detection_cells(index, det)
    return f"#{index} {name} {score}" + (f" (query {query})" if query else "")


def method_columns(entry: ImageEntry) -> list[tuple[str, list[Path | None]]]:
    """(method, per-detection overlays) for raw (when saved) and each saved method, in order."""
    columns = [(DEFAULT_METHOD, entry.detection_overlays)] if any(p is not None for p in entry.detection_overlays) else []
    return columns + list(entry.method_overlays.items())
