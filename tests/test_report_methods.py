"""The report of a `predict --explain` run: it names the saved methods, puts each detection's
methods side by side (one row per detection), never runs a model; a run without --explain
renders as before."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from detection.data.image_codec import write_image
from detection.render.report import write_report
from detection.render.report_contents import read_run
from detection.render.report_html import render_html
from test_report import make_run, pdf_page_count

METHODS = ("relevance", "drise")


def _add_methods(run_dir: Path, methods=METHODS, image_ids=(1, 3)) -> None:
    """Give images `image_ids` per-method overlays (a flat colour per method) and "methods" records."""
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    for line in lines:
        if line["image_id"] not in image_ids:
            continue
        stem = {1: "a__one", 2: "b__two", 3: "three <x>"}[line["image_id"]]
        for number, method in enumerate(methods):
            for k in range(len(line["detections"])):
                write_image(run_dir / "overlays" / stem / method / f"det_{k}.png",
                            np.full((40, 60, 3), 50 * (number + 1), np.uint8))
        line["methods"] = {method: f"attention/{method}/{stem}.npz" for method in methods}
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_report_names_each_saved_method_and_shows_them_side_by_side(tmp_path):
    run_dir = make_run(tmp_path)
    _add_methods(run_dir)
    run = read_run(run_dir)
    assert run.methods == list(METHODS)
    assert list(run.images[0].method_overlays) == list(METHODS)
    assert [p.name for p in run.images[0].method_overlays["drise"]] == ["det_0.png", "det_1.png"]
    assert run.images[1].method_overlays == {}
    out = tmp_path / "report"
    text = render_html(run, out, link_images=True)
    # the picker names raw and each saved method, in the run's order
    assert re.findall(r'<label for="show-(m\d)">([^<]+)</label>', text) == [("m0", "raw"), ("m1", "relevance"),
                                                                           ("m2", "drise")]
    sections = re.findall(r'<section class="image".*?</section>', text, flags=re.S)
    first = sections[0]
    # one row per detection: its caption, then raw's, relevance's and drise's overlay of that detection
    rows = re.findall(r"<tr><td>(#\d[^<]*)</td>(.*?)</tr>", first)
    assert len(rows) == 2
    for k, (caption, cells) in enumerate(rows):
        assert caption.startswith(f"#{k} ")
        sources = re.findall(r'<td class="(m\d)"><img src="([^"]+)"', cells)
        assert sources == [("m0", f"../run/overlays/a__one/det_{k}.png"),
                           ("m1", f"../run/overlays/a__one/relevance/det_{k}.png"),
                           ("m2", f"../run/overlays/a__one/drise/det_{k}.png")]
    assert re.findall(r'<th class="(m\d)">([^<]+)</th>', first) == [("m0", "raw"), ("m1", "relevance"), ("m2", "drise")]
    # unticking a method hides its column in every image
    assert "#show-m2:not(:checked)~section .m2{display:none}" in text
    # the third image (12 detections) too; the second has none and no table
    assert len(re.findall(r'<td class="m2"><img', sections[2])) == 12
    assert 'class="methods"' not in sections[1]


def test_a_run_without_explain_renders_as_before(tmp_path):
    plain = make_run(tmp_path / "a")
    text = render_html(read_run(plain), tmp_path / "out", link_images=True)
    assert 'class="picker"' not in text and 'type="checkbox"' not in text and 'class="methods"' not in text
    assert text.count("<figure>") == 14  # raw's per-detection overlays, as before
    # method folders the records do not name are not shown; an empty "methods" changes nothing
    lines = [json.loads(line) for line in (plain / "predictions.jsonl").read_text().splitlines()]
    (plain / "overlays" / "a__one" / "drise").mkdir()
    shutil.copy(plain / "overlays" / "a__one" / "det_0.png", plain / "overlays" / "a__one" / "drise" / "det_0.png")
    (plain / "predictions.jsonl").write_text("".join(json.dumps({**line, "methods": {}}) + "\n" for line in lines))
    assert render_html(read_run(plain), tmp_path / "out", link_images=True) == text


def test_the_pdf_has_a_tile_per_method_and_detection(tmp_path):
    plain = make_run(tmp_path / "a")
    explained = make_run(tmp_path / "b")
    _add_methods(explained)
    _, plain_pdf = write_report(plain)
    _, explained_pdf = write_report(explained)
    # 12 detections x 3 methods at 3 detections a page: more pages than 12 tiles at 9 a page
    assert pdf_page_count(explained_pdf) > pdf_page_count(plain_pdf)
