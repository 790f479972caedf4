"""The README's Python API example runs as written (from the repository root) and gives the
demo image's detections and maps."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def readme_example(heading: str) -> str:
    """The first python block under `heading` in the README."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, f"README's {heading!r} section has no python code block"
    return match.group(1)


def readme_api_example() -> str:
    return readme_example("## Python API")


def test_readme_api_example_runs_as_written(monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(readme_api_example(), "README.md:Python API", "exec"), namespace)
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
