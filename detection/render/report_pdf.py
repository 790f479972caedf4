"""The report's multi-page PDF: a cover page, then pages per image composed with OpenCV, with
their text as an invisible text layer (`pdf_pages`; the same run folder gives the same bytes)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from detection.attention.token_scores import TokenScores
from detection.data.image_codec import decode_image
from detection.io import write_bytes_atomic
from detection.render.labels import ascii_text
from detection.render.panel import compose_grid, fit_image
from detection.render.pdf_pages import RasterPage, pdf_bytes
from detection.render.report_contents import (ImageEntry, RunContents, detection_caption, detection_cells,
                                              method_columns, settings_rows)
from detection.render.token_view import token_colors
from detection.text import plural

PDF_DPI = 100
PDF_PAGE = (1169, 827)  # A4 portrait (height, width) at 100 dpi
PDF_DETECTIONS_PER_PAGE = 9

_PAGE_MARGIN = 40
_TEXT_SCALE = 0.5  # Hershey simplex: ~11 px capitals at 100 dpi (about 8 pt)
_LINE_HEIGHT = 18


def _blank_page() -> RasterPage:
    return RasterPage(np.full((*PDF_PAGE, 3), 255, np.uint8))


def _write_lines(page: RasterPage, lines: Iterable[str], top: int, scale: float = _TEXT_SCALE) -> int:
    """Draw text lines (cut to the page width) from `top`; returns the y below the last line."""
    width = page.pixels.shape[1] - 2 * _PAGE_MARGIN
    line_height = int(round(_LINE_HEIGHT * scale / _TEXT_SCALE))
    for line in lines:
        text = ascii_text(line)
        while text and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width:
            text = text[:-4] + "..."
        top += line_height
        page.put_text(text, (_PAGE_MARGIN, top), scale, (20, 20, 20))
    return top + line_height // 2


_TABLE_COLUMNS = (0, 40, 300, 380, 620)  # x offsets of the detection table's columns


def _write_table(page: RasterPage, header: list[str] | None, rows: list[list[str]], top: int) -> int:
    """Draw a table with fixed column offsets (Hershey fonts are proportional, so no padding)."""
    for line in ([header] if header else []) + rows:
        top += _LINE_HEIGHT
        for offset, cell in zip(_TABLE_COLUMNS, line):
            page.put_text(ascii_text(cell)[:32], (_PAGE_MARGIN + offset, top), _TEXT_SCALE, (20, 20, 20))
    return top + _LINE_HEIGHT // 2


_TOKEN_PAD, _TOKEN_GAP, _PHRASE_GAP = 3, 4, 14  # px: inside a token's background, between tokens, between phrases


def _token_lines(scores: TokenScores, k: int, width: int) -> list[list[tuple[int, int, str, tuple[int, int, int], float, bool]]]:
    """Detection k's prompt laid out in lines of at most `width` px: (x, width of its background,
    token, colour, opacity, a phrase separator before it) per token, colours by `token_view.token_colors`."""
    lines: list[list] = [[]]
    x, previous = 0, None
    for text, phrase, (color, opacity) in zip(scores.tokens, scores.token_phrase.tolist(), token_colors(scores.scores[k])):
        text = ascii_text(text)
        size = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, _TEXT_SCALE, 1)[0][0] + 2 * _TOKEN_PAD
        separator = previous is not None and phrase != previous
        gap = (_PHRASE_GAP if separator else _TOKEN_GAP) if lines[-1] else 0
        if lines[-1] and x + gap + size > width:
            lines.append([])
            x, gap = 0, 0
        lines[-1].append((x + gap, size, text, color, opacity, separator))
        x, previous = x + gap + size, phrase
    return lines


def _write_token_row(page: RasterPage, lines: list[list], top: int) -> int:
    """Draw `_token_lines` under a table row from `top`: each token on its colour blended over the
    white page, '.' between phrases. Returns the y below the last line."""
    left = _PAGE_MARGIN + _TABLE_COLUMNS[1]
    for line in lines:
        top += _LINE_HEIGHT
        for x, width, text, color, opacity, separator in line:
            x += left
            if separator and x - _PHRASE_GAP > left:
                page.put_text(".", (x - _PHRASE_GAP + 4, top), _TEXT_SCALE, (150, 150, 150))
            page.pixels[top - 13 : top + 5, x : x + width] = np.round(
                255 * (1 - opacity) + np.asarray(color) * opacity).astype(np.uint8)
            page.put_text(text, (x + _TOKEN_PAD, top), _TEXT_SCALE, (20, 20, 20), word=True)
    return top + 4


def _write_prompted_table(pages: list[RasterPage], title: str, header: list[str], rows: list[list[str]],
                          scores: TokenScores, top: int) -> int:
    """The detections table with each detection's prompt tokens under its row (the report's token
    view); a row that does not fit goes on a new page (appended to `pages`). Returns the last top."""
    top = _write_lines(pages[-1], [f"under each detection: its prompt tokens, {scores.token_method}"], top)
    top = _write_table(pages[-1], header, [], top) - _LINE_HEIGHT // 2
    width = PDF_PAGE[1] - 2 * _PAGE_MARGIN - _TABLE_COLUMNS[1]
    for k, cells in enumerate(rows):
        lines = _token_lines(scores, k, width)
        if top + _LINE_HEIGHT * (len(lines) + 2) > PDF_PAGE[0] - _PAGE_MARGIN:
            pages.append(_blank_page())
            top = _write_lines(pages[-1], [f"{title} (continued)"], _PAGE_MARGIN, scale=0.6)
            top = _write_table(pages[-1], header, [], top) - _LINE_HEIGHT // 2
        top = _write_token_row(pages[-1], lines, _write_table(pages[-1], None, [cells], top) - _LINE_HEIGHT // 2)
    return top + _LINE_HEIGHT // 2


def _paste(page: RasterPage, image: np.ndarray, top: int, max_height: int) -> int:
    """Paste `image` scaled to fit the page width and `max_height` (enlarged at most 2x) at `top`;
    returns its bottom."""
    max_width = min(page.pixels.shape[1] - 2 * _PAGE_MARGIN, 2 * image.shape[1])
    fitted = fit_image(image, max_width, max(1, min(max_height, 2 * image.shape[0])))
    page.pixels[top : top + fitted.shape[0], _PAGE_MARGIN : _PAGE_MARGIN + fitted.shape[1]] = fitted
    return top + fitted.shape[0]


def _fit_scale(image: np.ndarray, max_height: int) -> float:
    return min((PDF_PAGE[1] - 2 * _PAGE_MARGIN) / image.shape[1], max_height / image.shape[0])


def _cover_page(run: RunContents, title: str, shown: int) -> RasterPage:
    page = _blank_page()
    top = _write_lines(page, [title], _PAGE_MARGIN, scale=0.9)
    summary = [
        f"{plural(len(run.images), 'image')}, {plural(run.detection_count, 'detection')}, "
        f"{plural(len(run.errors), 'error')}",
        f"this PDF shows {shown} of {plural(len(run.images), 'image')}; the HTML report shows all" if shown < len(run.images) else "",
        *run.notes,
        "",
        "The run's model and settings: the last page.",
        "",
    ]
    top = _write_lines(page, [line for line in summary if line is not None], top)
    if run.errors:
        lines = ["Errors:", *(f"  {e.get('file', '')}: {e.get('reason', '')}" for e in run.errors[:10])]
        if len(run.errors) > 10:
            lines.append(f"  ... and {len(run.errors) - 10} more (see the HTML report)")
        _write_lines(page, lines, top)
    return page


def _image_pages(entry: ImageEntry) -> list[RasterPage]:
    page = _blank_page()
    header = f"{entry.file}  ({entry.width} x {entry.height} px, {plural(len(entry.detections), 'detection')})"
    top = _write_lines(page, [header], _PAGE_MARGIN, scale=0.6)
    usable = PDF_PAGE[0] - _PAGE_MARGIN
    if entry.overlay is not None:
        top = _paste(page, decode_image(entry.overlay.read_bytes(), str(entry.overlay)), top, int(PDF_PAGE[0] * 0.38)) + 8
    else:
        top = _write_lines(page, ["(no combined overlay in this run folder)"], top)
    pages = [page]
    if entry.detections:
        shown = [detection_cells(i, d) for i, d in enumerate(entry.detections[:12])]
        header = ["#", "class", "score", "box x, y, w, h", "query"]
        if entry.token_scores is None:
            top = _write_table(page, header, shown, top)
        else:  # a prompted run: each detection's prompt, shaded, under its row
            top = _write_prompted_table(pages, entry.file, header, shown, entry.token_scores, top)
    if len(entry.detections) > 12:
        top = _write_lines(pages[-1], [f"... and {len(entry.detections) - 12} more (see the HTML report)"],
                           top - _LINE_HEIGHT // 2)
    # with explanation methods: a row per detection, a tile per method (as the HTML compares them)
    columns = method_columns(entry) if entry.method_overlays else [("", entry.detection_overlays)]
    tiles = [
        (decode_image(path.read_bytes(), str(path)), f"{detection_caption(k, entry.detections[k])} {method}".strip())
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


def _settings_page(run: RunContents) -> RasterPage:
    """The appendix: the run's model and settings."""
    page = _blank_page()
    top = _write_lines(page, ["Model and run settings"], _PAGE_MARGIN, scale=0.9)
    _write_lines(page, [f"  {k}: {v}" for k, v in settings_rows(run.info)][:60], top)
    return page


def write_pdf(run: RunContents, path: Path, title: str, max_images: int | None = 50) -> int:
    """Write the PDF; returns its page count. max_images None or 0: every image."""
    shown = run.images if not max_images else run.images[:max_images]
    pages = [_cover_page(run, title, len(shown))]
    for entry in shown:
        pages.extend(_image_pages(entry))
    pages.append(_settings_page(run))
    write_bytes_atomic(path, pdf_bytes(pages, title, float(PDF_DPI)))
    return len(pages)
