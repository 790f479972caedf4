#!/usr/bin/env python
"""One overlay per HF family for the README (docs/hf_families.jpg), from RANDOM weights.

Each family's small lively test model (tests/hf_dense_models.py, tests/hf_sampled_models.py:
random weights, scaled so that queries differ) is saved as a Hub-style folder and run through
`detr-attn predict` on demo/images/shapes_1.png. The tile shows the top detection's map (and,
for the deformable families, its sampling points, `--overlay-style points`). Random weights
detect nothing meaningful: the tiles show the geometry of each family's attention (a dense
grid, or points on several levels), not what a trained model looks at.

    .venv/bin/python scripts/hf_gallery.py --out docs/hf_families.jpg
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_hf_equivalence import CASES, hf_folder  # noqa: E402

from detection.attention.methods import DEFAULT_METHOD  # noqa: E402
from detection.cli import main  # noqa: E402
from detection.render.panel import fit_image  # noqa: E402
from detection.runfolder.layout import detection_overlay_name  # noqa: E402

FAMILIES = ["yolos", "conditional_detr", "dab-detr", "table-transformer", "deformable_detr", "rt_detr",
            "rt_detr_v2", "d_fine", "rf_detr"]
TILE = 240


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((22, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, tile])


def _tile(path: Path) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    scale = TILE / max(rgb.shape[:2])
    tile = fit_image(rgb, max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    canvas = np.full((TILE, TILE, 3), 255, np.uint8)
    canvas[:tile.shape[0], :tile.shape[1]] = tile
    return canvas


def family_tiles(family: str, image: Path, work: Path) -> list[np.ndarray]:
    folder = hf_folder(family, work / family / "model")
    tiles = []
    styles = ["heatmap", "points"] if CASES[family][0].__name__ == "hf_sampled_models" else ["heatmap"]
    for style in styles:
        out = work / family / style
        code = main(["predict", str(image), "--model", str(folder), "--out", str(out), "--score-threshold", "0.0",
                     "--device", "cpu", "--precision", "fp32", "--workers", "0", "--overlays", "--overlay-style",
                     style, "--quiet"])
        if code != 0:
            raise SystemExit(f"{family}: predict exited {code}")
        record = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
        best = max(range(len(record["detections"])), key=lambda k: record["detections"][k]["score"])
        overlay = out / detection_overlay_name(record["key"], best, DEFAULT_METHOD, "png", style)
        tiles.append(_label(_tile(overlay), f"{family} ({style})"))
    return tiles


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "hf_families.jpg")
    parser.add_argument("--image", type=Path, default=ROOT / "demo" / "images" / "shapes_1.png")
    parser.add_argument("--columns", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        tiles = [tile for family in FAMILIES for tile in family_tiles(family, args.image, Path(work))]
    blank = np.full_like(tiles[0], 255)
    rows = [tiles[i:i + args.columns] for i in range(0, len(tiles), args.columns)]
    rows[-1] += [blank] * (args.columns - len(rows[-1]))
    grid = np.concatenate([np.concatenate(row, axis=1) for row in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
    print(f"wrote {args.out} ({len(tiles)} tiles; random weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
