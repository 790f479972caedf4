#!/usr/bin/env python
"""`make demo`: the main job on the shipped demo model, offline.

1. `detr-attn predict demo/images --model demo --overlays --save-attention --save-encoder-attention` -> OUT/
2. `detr-attn report OUT` and `detr-attn report OUT --viewer` -> OUT/report/index.html, report.pdf, viewer.html
3. Python API: a DETR-paper style panel and a combined overlay of the first demo image
   -> OUT/panel.png, OUT/overlay.png (with --docs-images DIR also copied there for the README).
Ends by printing the files to open.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--images", default=str(REPO / "demo" / "images"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--docs-images", default=None, help="also copy panel/overlay PNGs here")
    args = parser.parse_args(argv)

    from detection.cli import main as cli

    started = time.perf_counter()
    out = Path(args.out)
    status = cli(["predict", args.images, "--model", args.model, "--out", str(out), "--overwrite",
                  "--overlays", "--save-attention", "--save-encoder-attention", "--workers", "0", "--quiet"])
    if status not in (0, 1):
        return status
    for report in (["report", str(out)], ["report", str(out), "--viewer"]):
        report_status = cli(report)
        if report_status != 0:
            return report_status

    # The Python API, end to end, for one image: model -> detections + attention -> maps -> panel.
    from detection.attention.maps import detection_maps
    from detection.engine.predictor import Predictor, PredictorSettings
    from detection.models.registry import load_model
    from detection.render.overlay import render_overlay
    from detection.data.image_codec import write_image
    from detection.render.panel import render_panel

    first = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[0]
    model = load_model(args.model)
    predictor = Predictor(model, PredictorSettings(cross_attention=True, keep_images=True, score_threshold=0.7))
    result = next(iter(predictor.run([first])))
    if result.error is not None:
        print(f"demo: {first}: {result.error}", file=sys.stderr)
        return 1
    dets = result.detections
    maps = detection_maps(result.attention, 0, dets.query_index, dets.image_size, heads="mean", layers="last")
    panel = render_panel(result.image, dets, maps, title=f"{first.name}: {len(dets)} detections")
    overlay = render_overlay(result.image, dets, maps)
    write_image(out / "panel.png", panel)
    write_image(out / "overlay.png", overlay)
    if args.docs_images:
        docs = Path(args.docs_images)
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "panel.png", docs / "demo_panel.png")
        shutil.copyfile(out / "overlay.png", docs / "demo_overlay.png")

    elapsed = time.perf_counter() - started
    print(f"demo: {len(dets)} detections in {first.name}; outputs in {out}/ in {elapsed:.1f} s. Open:\n"
          f"  {out / 'report' / 'index.html'}   the report (also {out / 'report' / 'report.pdf'})\n"
          f"  {out / 'report' / 'viewer.html'}   the interactive viewer (layers, heads, encoder attention)\n"
          f"  {out / 'panel.png'}   a DETR-paper panel of {first.name}\n"
          f"  {out / 'predictions.jsonl'}   every detection with its query index (maps: {out / 'attention'}/)")
    return status


if __name__ == "__main__":
    sys.exit(main())
