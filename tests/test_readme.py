"""The documented Python examples run as written (from the repository root) and give the demo
image's detections and maps: the README's "One call" and docs/python-api.md's "Python API"."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
README = "README.md"
PYTHON_API_PAGE = "docs/python-api.md"


def doc_example(page: str, heading: str) -> str:
    """The first python block under the line `heading` (the whole heading line) of `page`."""
    text = (REPO / page).read_text(encoding="utf-8")
    parts = re.split(rf"^{re.escape(heading)}[ \t]*$", text, maxsplit=1, flags=re.M)
    assert len(parts) == 2, f"{page} has no heading {heading!r}"
    match = re.search(r"```python\n(.*?)```", parts[1], flags=re.S)
    assert match, f"{page}'s {heading!r} section has no python code block"
    return match.group(1)


def readme_example(heading: str) -> str:
    """The first python block under `heading` in the README."""
    return doc_example(README, heading)


def readme_api_example() -> str:
    """The Python API example (moved from the README to docs/python-api.md)."""
    return doc_example(PYTHON_API_PAGE, "## Python API")


def test_readme_api_example_runs_as_written(monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(readme_api_example(), f"{PYTHON_API_PAGE}:Python API", "exec"), namespace)
    dets, maps, record = namespace["dets"], namespace["maps"], namespace["att"]
    height, width = namespace["img"].original_size
    assert len(dets) >= 1 and record.kind == "dense"
    assert maps.shape == (len(dets), height, width) and maps.dtype == np.float32
    assert np.allclose(maps.max(axis=(1, 2)), 1.0) and maps.min() >= 0.0
    # each map peaks inside its own detection's box (the demo model's pointing game is 0.95)
    for k in range(len(dets)):
        y, x = np.unravel_index(int(np.argmax(maps[k])), maps[k].shape)
        x0, y0, x1, y1 = dets.boxes[k].tolist()
        assert x0 - 1 <= x <= x1 + 1 and y0 - 1 <= y <= y1 + 1
    per_layer_head = namespace["per_layer_head"]
    assert tuple(per_layer_head.shape[-2:]) == record.feature_size


def test_readme_one_call_example_runs_as_written(monkeypatch, tmp_path):
    from PIL import Image

    from detection.render.overlay import render_overlay

    (tmp_path / "demo").symlink_to(REPO / "demo")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example("## One call"), "README.md:One call", "exec"), namespace)
    explanation = namespace["explanation"]
    image = np.asarray(Image.open(REPO / "demo/images/shapes_1.png").convert("RGB"))
    assert len(explanation.detections) >= 1
    assert explanation.maps.shape == (len(explanation.detections), *image.shape[:2])
    saved = np.asarray(Image.open(tmp_path / "shapes_1_overlay.png").convert("RGB"))
    assert np.array_equal(saved, render_overlay(image, explanation.detections, explanation.maps))


def test_python_api_page_shows_the_readme_one_call_example():
    # the page repeats the README's example (tested above) rather than a copy that could drift
    assert doc_example(PYTHON_API_PAGE, "## One call: `detection.explain`") == readme_example("## One call")
