"""A self-contained HTML page and a multi-page PDF of a predict run folder, read through
`runfolder.reader.RunReader` (the layout's one owner); never runs a model.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import cv2
import numpy as np
from PIL import Image

from detection.attention.methods import DEFAULT_METHOD
from detection.runfolder.reader import RunReader
from detection.io import write_bytes_atomic, write_text_atomic
from detection.render.overlay import ascii_text
from detection.data.image_codec import decode_image, encode_image
from detection.render.panel import compose_grid, fit_image

THUMB_WIDTH = 240
COMBINED_WIDTH = 960
DETECTION_WIDTH = 360
PDF_DPI = 100
PDF_PAGE = (1169, 827)  # A4 portrait (height, width) at 100 dpi
PDF_DETECTIONS_PER_PAGE = 9


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
            paths = reader.method_detection_overlays(stem, str(method), len(row["detections"]))
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
    )


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


# -- HTML ---------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
.thumbs a{display:block;width:240px;text-decoration:none;color:#333;font-size:12px;word-break:break-all}
.thumbs img{width:240px;border:1px solid #ccc;background:#fff}
img.combined{max-width:100%;border:1px solid #ccc}
.dets{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:360px}figure img{width:360px;border:1px solid #ccc}
figcaption{font-size:13px}.note{color:#a04000}.missing{color:#888;font-style:italic}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border:1px solid #888}
table.methods img{width:240px;border:1px solid #ccc}.picker{margin:8px 0}.picker label{margin-right:12px}
"""


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


class _ImageSource:
    """Turns an image file of the run into an <img> src: a data URI, or a relative link."""

    def __init__(self, out_dir: Path, link_images: bool) -> None:
        self.out_dir = out_dir
        self.link_images = link_images

    def __call__(self, path: Path, width: int) -> str:
        if self.link_images:
            return quote(Path(os.path.relpath(path.resolve(), self.out_dir.resolve())).as_posix())
        image = decode_image(path.read_bytes(), str(path))
        if image.shape[1] > width:
            image = fit_image(image, width)
        return "data:image/jpeg;base64," + base64.b64encode(encode_image(image, ".jpg", 88)).decode("ascii")


def _settings_rows(info: dict) -> list[tuple[str, str]]:
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


def _detection_cells(index: int, det: dict) -> list[str]:
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


def _caption(index: int, det: dict) -> str:
    """"#k <class> <score> (query q)" for figure captions and PDF tile titles."""
    _, name, score, _, query = _detection_cells(index, det)
    return f"#{index} {name} {score}" + (f" (query {query})" if query else "")


def _image_section(number: int, entry: ImageEntry, source: _ImageSource, classes: dict[str, str]) -> str:
    parts = [f'<section class="image" id="img-{number}">', f"<h2>{_escape(entry.file)}</h2>"]
    parts.append(
        f"<p>{entry.width} &times; {entry.height} px &middot; {len(entry.detections)} detection(s)"
        + (f" &middot; image id {_escape(entry.image_id)}" if entry.image_id is not None else "")
        + "</p>"
    )
    if entry.overlay is not None:
        parts.append(f'<img class="combined" src="{_escape(source(entry.overlay, COMBINED_WIDTH))}" alt="{_escape(entry.file)}">')
    else:
        parts.append('<p class="missing">no combined overlay in this run folder</p>')
    if entry.detections:
        parts.append('<table class="detections"><tr><th>#</th><th>class</th><th>score</th><th>box x, y, w, h (px)</th><th>query</th></tr>')
        for index, det in enumerate(entry.detections):
            cells = _detection_cells(index, det)
            parts.append(
                "<tr>"
                + "".join(
                    f'<td class="num">{_escape(c)}</td>' if i in (0, 2, 4) else f"<td>{_escape(c)}</td>"
                    for i, c in enumerate(cells)
                )
                + "</tr>"
            )
        parts.append("</table>")
    if entry.detections and entry.method_overlays:
        parts.append(_method_table(entry, source, classes))
    elif entry.detections:
        parts.append('<div class="dets">')
        for index, (det, path) in enumerate(zip(entry.detections, entry.detection_overlays)):
            caption = _caption(index, det)
            image = (
                f'<img src="{_escape(source(path, DETECTION_WIDTH))}" alt="{_escape(caption)}">'
                if path is not None
                else '<p class="missing">no overlay</p>'
            )
            parts.append(f"<figure>{image}<figcaption>{_escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _method_columns(entry: ImageEntry) -> list[tuple[str, list[Path | None]]]:
    """(method, per-detection overlays) for raw (when saved) and each saved method, in order."""
    columns = [(DEFAULT_METHOD, entry.detection_overlays)] if any(p is not None for p in entry.detection_overlays) else []
    return columns + list(entry.method_overlays.items())


def _method_table(entry: ImageEntry, source: _ImageSource, classes: dict[str, str]) -> str:
    """One row per detection, one column per explanation method: the methods side by side.
    classes: method -> the CSS class of its column (`_method_picker`)."""
    columns = _method_columns(entry)
    parts = ['<table class="methods"><tr><th>detection</th>'
             + "".join(f'<th class="{classes[m]}">{_escape(m)}</th>' for m, _ in columns) + "</tr>"]
    for index, det in enumerate(entry.detections):
        caption = _caption(index, det)
        cells = []
        for method, paths in columns:
            path = paths[index] if index < len(paths) else None
            image = (f'<img src="{_escape(source(path, DETECTION_WIDTH))}" alt="{_escape(f"{caption} {method}")}">'
                     if path is not None else '<span class="missing">no overlay</span>')
            cells.append(f'<td class="{classes[method]}">{image}</td>')
        parts.append(f"<tr><td>{_escape(caption)}</td>{''.join(cells)}</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _method_picker(methods: list[str]) -> tuple[str, dict[str, str]]:
    """The method picker (a checkbox per method that shows / hides its column in every image's
    table; no script: the checkboxes precede the sections as siblings of them, so a
    `:not(:checked) ~ section` rule reaches the columns) and method -> its columns' CSS class."""
    classes = {method: f"m{number}" for number, method in enumerate(methods)}
    css = "".join(f"#show-{c}:not(:checked)~section .{c}{{display:none}}" for c in classes.values())
    boxes = "".join(f'<input type="checkbox" id="show-{c}" checked><label for="show-{c}">{_escape(m)}</label> '
                    for m, c in classes.items())
    return (f'<style>{css}</style><p class="picker">Explanation methods saved (tick to compare side by side):</p>'
            + boxes), classes


def render_html(run: RunContents, out_dir: Path, link_images: bool = False, title: str | None = None) -> str:
    """The report page as a string (deterministic for the same run folder)."""
    source = _ImageSource(out_dir, link_images)
    title = title or f"detr-attn report: {run.run_dir.resolve().name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_escape(title)}</h1>",
        f"<p>{len(run.images)} image(s), {run.detection_count} detection(s), {len(run.errors)} error(s)</p>",
    ]
    parts.extend(f'<p class="note">{_escape(note)}</p>' for note in run.notes)
    parts.append('</header><section id="settings"><h2>Model and settings</h2><table>')
    parts.extend(f"<tr><th>{_escape(k)}</th><td>{_escape(v)}</td></tr>" for k, v in _settings_rows(run.info))
    parts.append('</table></section><section id="index"><h2>Images</h2><div class="thumbs">')
    for number, entry in enumerate(run.images, start=1):
        thumb_path = entry.overlay or next((p for p in entry.detection_overlays if p is not None), None)
        thumb = (
            f'<img src="{_escape(source(thumb_path, THUMB_WIDTH))}" alt="{_escape(entry.file)}" loading="lazy">'
            if thumb_path is not None
            else '<span class="missing">no overlay</span>'
        )
        parts.append(
            f'<a href="#img-{number}">{thumb}<br>{_escape(entry.file)} ({len(entry.detections)})</a>'
        )
    parts.append("</div></section>")
    classes: dict[str, str] = {}
    if run.methods:
        picker, classes = _method_picker([DEFAULT_METHOD, *run.methods])
        parts.append(picker)
    parts.extend(_image_section(number, entry, source, classes) for number, entry in enumerate(run.images, start=1))
    if run.errors:
        parts.append('<section id="errors"><h2>Errors</h2><table><tr><th>file</th><th>reason</th></tr>')
        parts.extend(
            f"<tr><td>{_escape(e.get('file', ''))}</td><td>{_escape(e.get('reason', ''))}</td></tr>" for e in run.errors
        )
        parts.append("</table></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# -- PDF ----------------------------------------------------------------------------------------------
_PAGE_MARGIN = 40
_TEXT_SCALE = 0.5  # Hershey simplex: ~11 px capitals at 100 dpi (about 8 pt)
_LINE_HEIGHT = 18


def _blank_page() -> np.ndarray:
    return np.full((*PDF_PAGE, 3), 255, np.uint8)


def _write_lines(page: np.ndarray, lines: Iterable[str], top: int, scale: float = _TEXT_SCALE) -> int:
    """Draw text lines (cut to the page width) from `top`; returns the y below the last line."""
    width = page.shape[1] - 2 * _PAGE_MARGIN
    line_height = int(round(_LINE_HEIGHT * scale / _TEXT_SCALE))
    for line in lines:
        text = ascii_text(line)
        while text and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width:
            text = text[:-4] + "..."
        top += line_height
        cv2.putText(page, text, (_PAGE_MARGIN, top), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 1, cv2.LINE_AA)
    return top + line_height // 2


_TABLE_COLUMNS = (0, 40, 300, 380, 620)  # x offsets of the detection table's columns


def _write_table(page: np.ndarray, header: list[str], rows: list[list[str]], top: int) -> int:
    """Draw a table with fixed column offsets (Hershey fonts are proportional, so no padding)."""
    for line in [header, *rows]:
        top += _LINE_HEIGHT
        for offset, cell in zip(_TABLE_COLUMNS, line):
            text = ascii_text(cell)[:32]
            origin = (_PAGE_MARGIN + offset, top)
            cv2.putText(page, text, origin, cv2.FONT_HERSHEY_SIMPLEX, _TEXT_SCALE, (20, 20, 20), 1, cv2.LINE_AA)
    return top + _LINE_HEIGHT // 2


def _paste(page: np.ndarray, image: np.ndarray, top: int, max_height: int) -> int:
    """Paste `image` scaled to fit the page width and `max_height` (enlarged at most 2x) at `top`;
    returns its bottom."""
    max_width = min(page.shape[1] - 2 * _PAGE_MARGIN, 2 * image.shape[1])
    fitted = fit_image(image, max_width, max(1, min(max_height, 2 * image.shape[0])))
    page[top : top + fitted.shape[0], _PAGE_MARGIN : _PAGE_MARGIN + fitted.shape[1]] = fitted
    return top + fitted.shape[0]


def _fit_scale(image: np.ndarray, max_height: int) -> float:
    return min((PDF_PAGE[1] - 2 * _PAGE_MARGIN) / image.shape[1], max_height / image.shape[0])


def _cover_page(run: RunContents, title: str, shown: int) -> np.ndarray:
    page = _blank_page()
    top = _write_lines(page, [title], _PAGE_MARGIN, scale=0.9)
    summary = [
        f"{len(run.images)} image(s), {run.detection_count} detection(s), {len(run.errors)} error(s)",
        f"this PDF shows {shown} of {len(run.images)} image(s); the HTML report shows all" if shown < len(run.images) else "",
        *run.notes,
        "",
        "Model and settings:",
    ]
    top = _write_lines(page, [line for line in summary if line is not None], top)
    top = _write_lines(page, [f"  {k}: {v}" for k, v in _settings_rows(run.info)][:40], top)
    if run.errors:
        lines = ["Errors:", *(f"  {e.get('file', '')}: {e.get('reason', '')}" for e in run.errors[:10])]
        if len(run.errors) > 10:
            lines.append(f"  ... and {len(run.errors) - 10} more (see the HTML report)")
        _write_lines(page, lines, top)
    return page


def _image_pages(entry: ImageEntry) -> list[np.ndarray]:
    page = _blank_page()
    header = f"{entry.file}  ({entry.width} x {entry.height} px, {len(entry.detections)} detection(s))"
    top = _write_lines(page, [header], _PAGE_MARGIN, scale=0.6)
    usable = PDF_PAGE[0] - _PAGE_MARGIN
    if entry.overlay is not None:
        top = _paste(page, decode_image(entry.overlay.read_bytes(), str(entry.overlay)), top, int(PDF_PAGE[0] * 0.38)) + 8
    else:
        top = _write_lines(page, ["(no combined overlay in this run folder)"], top)
    if entry.detections:
        shown = [_detection_cells(i, d) for i, d in enumerate(entry.detections[:12])]
        top = _write_table(page, ["#", "class", "score", "box x, y, w, h", "query"], shown, top)
    if len(entry.detections) > 12:
        top = _write_lines(page, [f"... and {len(entry.detections) - 12} more (see the HTML report)"], top - _LINE_HEIGHT // 2)
    pages = [page]
    # with explanation methods: a row per detection, a tile per method (as the HTML compares them)
    columns = _method_columns(entry) if entry.method_overlays else [("", entry.detection_overlays)]
    tiles = [
        (decode_image(path.read_bytes(), str(path)), f"{_caption(k, entry.detections[k])} {method}".strip())
        for k in range(len(entry.detections))
        for method, paths in columns
        if (path := paths[k] if k < len(paths) else None) is not None
    ]
    per_row = 3 if not entry.method_overlays else len(columns)
    per_page = PDF_DETECTIONS_PER_PAGE if not entry.method_overlays else 3 * per_row
    for start in range(0, len(tiles), per_page):
        chunk = tiles[start : start + per_page]
        # 3 x 240 px tiles + gaps ~ the page's usable width, so titles are not shrunk
        grid = compose_grid([t for t, _ in chunk], [c for _, c in chunk], columns=per_row,
                            tile_width=720 // max(3, per_row))
        # a grid shrunk much below its drawn size has unreadable titles: give it a fresh page
        if start > 0 or _fit_scale(grid, usable - top) < 0.8:
            pages.append(_blank_page())
            top = _write_lines(pages[-1], [f"{entry.file} (continued)"], _PAGE_MARGIN, scale=0.6)
        _paste(pages[-1], grid, top, usable - top)
    return pages


def write_pdf(run: RunContents, path: Path, title: str, max_images: int | None = 50) -> int:
    """Write the PDF; returns its page count. max_images None or 0: every image."""
    shown = run.images if not max_images else run.images[:max_images]
    pages = [_cover_page(run, title, len(shown))]
    for entry in shown:
        pages.extend(_image_pages(entry))
    pil_pages = [Image.fromarray(page) for page in pages]
    buffer = io.BytesIO()
    # no creation/modification dates: the same run folder gives the same bytes
    pil_pages[0].save(
        buffer,
        "PDF",
        save_all=True,
        append_images=pil_pages[1:],
        resolution=float(PDF_DPI),
        title=ascii_text(title),
        creationDate=None,
        modDate=None,
    )
    write_bytes_atomic(path, buffer.getvalue())
    return len(pages)


# -- entry points -------------------------------------------------------------------------------------
def write_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    link_images: bool = False,
    pdf_max_images: int | None = 50,
    title: str | None = None,
) -> tuple[Path, Path]:
    """Write `index.html` and `report.pdf` for a predict run (default: RUN_DIR/report/).

    HTML: index of thumbnails, then one section per image (combined overlay, detections table,
    per-detection overlays), model and settings from run.json. Images are embedded as base64
    JPEG data URIs (downscaled), so the single file opens offline anywhere; `link_images=True`
    instead refers to the run folder's images by relative path (small HTML for big runs; keep
    the folder together). All text is HTML-escaped.
    PDF: a cover page with the settings, then one page per image (more when an image has many
    detections), composed with OpenCV and written by Pillow; `pdf_max_images` bounds its size
    (None/0: all images). Returns (html_path, pdf_path).
    """
    run = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"detr-attn report: {run.run_dir.resolve().name}"
    html_path, pdf_path = out / "index.html", out / "report.pdf"
    write_text_atomic(html_path, render_html(run, out, link_images, title))
    write_pdf(run, pdf_path, title, pdf_max_images)
    return html_path, pdf_path
