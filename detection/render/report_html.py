"""The report's self-contained HTML page: an index of thumbnails, then a section per image with
its overlays and detections (explanation methods side by side); images inlined or linked."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from detection.attention.methods import DEFAULT_METHOD
from detection.data.image_codec import decode_image, encode_image
from detection.render.panel import fit_image
from detection.render.report_contents import (ImageEntry, RunContents, detection_caption, detection_cells,
                                              method_columns, settings_rows)
from detection.render.token_view import TOKEN_VIEW_CSS, token_table_html
from detection.text import plural

THUMB_WIDTH = 240
COMBINED_WIDTH = 960
DETECTION_WIDTH = 360


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
""" + TOKEN_VIEW_CSS + "\n"


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


def _image_section(number: int, entry: ImageEntry, source: _ImageSource, classes: dict[str, str]) -> str:
    parts = [f'<section class="image" id="img-{number}">', f"<h2>{_escape(entry.file)}</h2>"]
    parts.append(
        f"<p>{entry.width} &times; {entry.height} px &middot; {plural(len(entry.detections), 'detection')}"
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
            cells = detection_cells(index, det)
            parts.append(
                "<tr>"
                + "".join(
                    f'<td class="num">{_escape(c)}</td>' if i in (0, 2, 4) else f"<td>{_escape(c)}</td>"
                    for i, c in enumerate(cells)
                )
                + "</tr>"
            )
        parts.append("</table>")
    if entry.detections and entry.token_scores is not None:
        parts.append(token_table_html(entry.token_scores, [str(det.get("class_name", "")) for det in entry.detections]))
    if entry.detections and entry.method_overlays:
        parts.append(_method_table(entry, source, classes))
    elif entry.detections:
        parts.append('<div class="dets">')
        for index, (det, path) in enumerate(zip(entry.detections, entry.detection_overlays)):
            caption = detection_caption(index, det)
            image = (
                f'<img src="{_escape(source(path, DETECTION_WIDTH))}" alt="{_escape(caption)}">'
                if path is not None
                else '<p class="missing">no overlay</p>'
            )
            parts.append(f"<figure>{image}<figcaption>{_escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _method_table(entry: ImageEntry, source: _ImageSource, classes: dict[str, str]) -> str:
    """One row per detection, one column per explanation method: the methods side by side.
    classes: method -> the CSS class of its column (`_method_picker`)."""
    columns = method_columns(entry)
    parts = ['<table class="methods"><tr><th>detection</th>'
             + "".join(f'<th class="{classes[m]}">{_escape(m)}</th>' for m, _ in columns) + "</tr>"]
    for index, det in enumerate(entry.detections):
        caption = detection_caption(index, det)
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
        f"<p>{plural(len(run.images), 'image')}, {plural(run.detection_count, 'detection')}, "
        f"{plural(len(run.errors), 'error')}</p>",
    ]
    parts.extend(f'<p class="note">{_escape(note)}</p>' for note in run.notes)
    parts.append('</header><section id="index"><h2>Images</h2><div class="thumbs">')
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
    # the run's settings last, folded: the images come first
    parts.append('<details id="settings"><summary>Model and run settings</summary><table>')
    parts.extend(f"<tr><th>{_escape(k)}</th><td>{_escape(v)}</td></tr>" for k, v in settings_rows(run.info))
    parts.append("</table></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
