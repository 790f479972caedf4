"""The report of a predict run folder: `write_report` writes its HTML page (`report_html`) and
its PDF (`report_pdf`) side by side; never runs a model."""
from __future__ import annotations

import os
from pathlib import Path

from detection.io import write_text_atomic
from detection.render.report_contents import read_run
from detection.render.report_html import render_html
from detection.render.report_pdf import write_pdf


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
