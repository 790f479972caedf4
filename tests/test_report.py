"""HTML/PDF report from a hand-built predict run folder: contents, escaping, links, PDF pages, CLI."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import PdfParser

from detection.cli import main as cli_main
from detection.render.overlay import render_detection_overlay, render_overlay
from detection.data.image_codec import write_image
from detection.render.report import write_report
from detection.render.report_contents import read_run
from detection.runfolder.reader import stem_candidates
from detection.structures import Detections

EVIL = '<b>cat</b> & "co"'


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(60, 200, size=(height, width, 3), dtype=np.uint8)


def _gaussian(height: int, width: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)


def make_run(root: Path, detection_counts=(2, 0, 12), absolute_files: bool = True, suffix: str = "png") -> Path:
    """A predict run folder as docs/ARCHITECTURE.md describes it, with real rendered overlays."""
    run_dir = root / "run"
    (run_dir / "overlays").mkdir(parents=True)
    files = ["/data/in/a/one.jpg", "/data/in/b/two.png", "/data/in/three <x>.jpg"]
    if not absolute_files:
        files = [f.replace("/data/in/", "") for f in files]
    stems = ["a__one", "b__two", "three <x>"]
    lines = []
    for image_id, (file, stem, count) in enumerate(zip(files, stems, detection_counts), start=1):
        height, width = 90 + 10 * image_id, 160
        image = _photo(height, width, image_id)
        boxes = torch.tensor([[5.0 + 10 * k % 100, 10.0, 40.0 + 10 * k % 100, 60.0] for k in range(count)]).reshape(-1, 4)
        labels = torch.arange(count) % 5
        names = [EVIL if k == 0 else f"class{int(labels[k])}" for k in range(count)]
        detections = Detections(
            (height, width), boxes=boxes, scores=torch.linspace(0.99, 0.7, count), labels=labels,
            query_index=torch.arange(count) * 3, class_names=names,
        )
        maps = np.stack([_gaussian(height, width, 35, 22 + 10 * k % 100, 6) for k in range(count)]) if count else np.zeros((0, height, width), np.float32)
        write_image(run_dir / "overlays" / f"{stem}.{suffix}", render_overlay(image, detections, maps))
        for k in range(count):
            write_image(run_dir / "overlays" / stem / f"det_{k}.{suffix}", render_detection_overlay(image, detections[k], maps[k]))
        lines.append(
            {
                "file": file, "image_id": image_id, "width": width, "height": height,
                "detections": [
                    {
                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                        "score": float(detections.scores[k]), "category_id": int(labels[k]) + 1,
                        "label": int(labels[k]), "class_name": names[k], "query_index": int(k * 3),
                    }
                    for k, b in enumerate(boxes.tolist())
                ],
            }
        )
    # written out of order, as parallel workers would
    order = [2, 0, 1]
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(lines[i]) + "\n" for i in order))
    (run_dir / "errors.jsonl").write_text(json.dumps({"file": "/data/in/bad<1>.jpg", "reason": "corrupt & truncated"}) + "\n")
    run_info = {
        "model": {"name": "demo <tiny>", "path": "weights/demo"},
        "class_names": [f"c{i}" for i in range(30)],
        "settings": {"score_threshold": 0.7, "heads": "mean", "layers": "last"},
        "versions": {"torch": "2.x"},
    }
    (run_dir / "run.json").write_text(json.dumps(run_info))
    return run_dir


def pdf_page_count(path: Path) -> int:
    parser = PdfParser.PdfParser(str(path))
    try:
        return len(parser.pages)
    finally:
        parser.close()


def test_stem_candidates():
    assert stem_candidates("/data/in/a/one.jpg") == ["data__in__a__one", "in__a__one", "a__one", "one"]
    assert stem_candidates("a/b.c.png") == ["a__b.c", "b.c"]


def test_read_run_sorts_resolves_stems_and_finds_overlays(tmp_path):
    run = read_run(make_run(tmp_path))
    assert [entry.image_id for entry in run.images] == [1, 2, 3]
    assert [entry.stem for entry in run.images] == ["a__one", "b__two", "three <x>"]
    assert run.detection_count == 14
    assert all(entry.overlay is not None for entry in run.images)
    assert [p.name for p in run.images[0].detection_overlays] == ["det_0.png", "det_1.png"]
    assert run.errors[0]["reason"] == "corrupt & truncated"
    assert run.notes == []


def test_html_contents_and_escaping(tmp_path):
    run_dir = make_run(tmp_path)
    html_path, pdf_path = write_report(run_dir)
    assert html_path == run_dir / "report" / "index.html" and pdf_path == run_dir / "report" / "report.pdf"
    text = html_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "3 images, 14 detections, 1 error" in text  # counts in the right number (issue 25)
    assert text.count('<section class="image"') == 3
    # detections table: header row + one row per detection
    sections = re.findall(r'<section class="image".*?</section>', text, flags=re.S)
    rows = [section.count("<tr>") - 1 if "<table" in section else 0 for section in sections]
    assert rows == [2, 0, 12]
    # every overlay embedded: 3 thumbnails + 3 combined + 14 per detection, nothing external
    assert text.count('src="data:image/jpeg;base64,') == 20
    assert not re.search(r'src="(?!data:)', text)
    assert "http://" not in text and "https://" not in text
    # all user text escaped
    assert EVIL not in text and "&lt;b&gt;cat&lt;/b&gt; &amp; &quot;co&quot;" in text
    assert "three &lt;x&gt;.jpg" in text and "<x>" not in text
    assert "demo &lt;tiny&gt;" in text and "corrupt &amp; truncated" in text
    assert "30 items: c0, c1" in text  # long lists summarised
    assert "score_threshold" in text and "0.7" in text
    # the index links to the sections in image id order
    assert re.findall(r'href="#img-(\d)"', text) == ["1", "2", "3"]
    assert text.index("/data/in/a/one.jpg") < text.index("/data/in/b/two.png")
    # the images first; the run's settings folded at the end (issue 25: no settings dump on the first screen)
    assert text.index('<section id="index">') < text.index('<section class="image"') < text.index(
        '<details id="settings"><summary>Model and run settings</summary>')
    assert "score_threshold" not in text[:text.index('<section id="index">')]
    assert text.rstrip().endswith("</table></details>\n</body></html>")


def test_pdf_pages_and_header(tmp_path):
    run_dir = make_run(tmp_path)
    _, pdf_path = write_report(run_dir)
    data = pdf_path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    # cover + image 1 (2 dets) + image 2 (0 dets) + image 3 (12 dets: 9 + 3 on a continuation page)
    # + the settings appendix (issue 25: the cover no longer lists the settings)
    assert pdf_page_count(pdf_path) == 6
    _, limited = write_report(run_dir, tmp_path / "limited", pdf_max_images=1)
    assert pdf_page_count(limited) == 3


def test_report_is_deterministic(tmp_path):
    run_dir = make_run(tmp_path)
    first = [p.read_bytes() for p in write_report(run_dir, tmp_path / "a")]
    second = [p.read_bytes() for p in write_report(run_dir, tmp_path / "b")]
    assert first == second


def test_link_images_uses_relative_paths_inside_the_run(tmp_path):
    run_dir = make_run(tmp_path)
    html_path, _ = write_report(run_dir, link_images=True)
    text = html_path.read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]+)"', text)
    assert len(sources) == 20 and not any(s.startswith("data:") for s in sources)
    from urllib.parse import unquote

    for source in sources:
        target = (html_path.parent / unquote(source)).resolve()
        assert target.is_file() and run_dir.resolve() in target.parents
    assert "../overlays/three%20%3Cx%3E/det_0.png" in sources


def test_stem_field_wins_and_missing_overlays_are_reported(tmp_path):
    run_dir = make_run(tmp_path, absolute_files=False)
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    lines[0]["stem"] = "elsewhere"  # an engine-provided stem with no files behind it
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = read_run(run_dir)
    entry = next(e for e in run.images if e.stem == "elsewhere")
    assert entry.overlay is None and all(p is None for p in entry.detection_overlays)
    assert any("no overlay" in note for note in run.notes)
    html_path, pdf_path = write_report(run_dir)
    assert "no combined overlay in this run folder" in html_path.read_text(encoding="utf-8")
    assert pdf_page_count(pdf_path) >= 4


def test_jpeg_overlays_and_the_engine_key_field(tmp_path):
    run_dir = make_run(tmp_path, suffix="jpg")
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    # the engine names the stem ("key", here with its de-duplication suffix) and the overlay
    for line in lines:
        if line["image_id"] == 1:
            (run_dir / "overlays" / "a__one.jpg").rename(run_dir / "overlays" / "a__one~2.jpg")
            (run_dir / "overlays" / "a__one").rename(run_dir / "overlays" / "a__one~2")
            line["key"] = "a__one~2"
            line["overlay"] = "overlays/a__one~2.jpg"
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = read_run(run_dir)
    assert [entry.stem for entry in run.images] == ["a__one~2", "b__two", "three <x>"]
    assert run.images[0].overlay.name == "a__one~2.jpg"
    assert [p.name for p in run.images[0].detection_overlays] == ["det_0.jpg", "det_1.jpg"]
    assert run.notes == []
    html_path, _ = write_report(run_dir)
    assert html_path.read_text(encoding="utf-8").count('src="data:image/jpeg;base64,') == 20


def test_bad_run_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="predictions.jsonl: missing"):
        write_report(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "predictions.jsonl").write_text('{"file": "a.jpg", "detections": []}\n{oops\n')
    with pytest.raises(ValueError, match="predictions.jsonl line 2: not valid JSON"):
        write_report(bad)
    (bad / "predictions.jsonl").write_text('{"detections": []}\n')
    with pytest.raises(ValueError, match="line 1: missing 'file'"):
        write_report(bad)


def test_cli_report_verb(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["report", str(run_dir), "--out", str(out), "--pdf-max-images", "0", "--title", "My <run>"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed and str(out / "report.pdf") in printed
    assert "<title>My &lt;run&gt;</title>" in (out / "index.html").read_text(encoding="utf-8")
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_reads_the_run_folder_through_the_layout_owner(tmp_path, monkeypatch):
    """No reader of its own: every file the report finds comes from runfolder.reader.RunReader."""
    import detection.render.report_contents as report
    from detection.runfolder.reader import RunReader

    calls: list[str] = []

    class SpyReader(RunReader):
        def __getattribute__(self, name):
            if name in ("info", "predictions", "errors", "image_key", "overlay", "detection_overlays"):
                calls.append(name)
            return super().__getattribute__(name)

    monkeypatch.setattr(report, "RunReader", SpyReader)
    run_dir = make_run(tmp_path)
    run = read_run(run_dir)
    assert {"info", "predictions", "errors", "image_key", "overlay", "detection_overlays"} <= set(calls)
    reader = RunReader(run_dir)
    rows = sorted(reader.predictions(), key=lambda row: row["image_id"])
    assert [entry.stem for entry in run.images] == [reader.image_key(row) for row in rows]
    assert [entry.overlay for entry in run.images] == [reader.overlay(row, reader.image_key(row)) for row in rows]
    assert run.errors == reader.errors() and run.info == reader.info()
    assert not hasattr(report, "_read_jsonl") and not hasattr(report, "_resolve_stem")
