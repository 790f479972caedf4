"""The README's Python API example runs as written (from the repository root) and gives the
demo image's detections and maps."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def readme_api_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README's Python API section has no python code block"
    return match.group(1)


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
