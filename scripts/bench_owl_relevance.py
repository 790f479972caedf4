#!/usr/bin/env python
"""OWL-ViT / OWLv2 relevance: what it costs beside inference and the raw maps, at the published size.

Random weights at the family's default configuration (`bench_prompted.build`: OWL-ViT ViT-B/32 at
768; OWLv2 ViT-B/16 at 960 on a 720x1280 image), one image, fp32, timed interleaved:
  * ours: our detector through InferenceModel (plain inference: the last layer is not even hooked);
  * + raw maps: inference with the record, post-processing and the raw maps of the top --top-k;
  * relevance: `attention.gradients.relevance` of those detections (a forward with every vision
    layer's attention in the graph, batched backward, the ViT rule per detection).
Printed: seconds (median of --repeats after --warmup), and the gradient values relevance holds per
detection (layers x heads x (1 + P)^2), from the model's shapes.

    .venv/bin/python scripts/bench_owl_relevance.py --families owlvit --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import cpu_name, interleaved  # noqa: E402
from bench_prompted import build  # noqa: E402
from detection.attention.gradients import relevance  # noqa: E402
from detection.attention.maps import detection_maps  # noqa: E402
from detection.engine.fast import InferenceModel  # noqa: E402
from detection.postprocess import postprocess  # noqa: E402


def bench_family(name: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        detector, _hf, _text, (height, width) = build(name, Path(folder))
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand((1, 3, height // 32, width // 32), generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    mask = torch.zeros((1, height, width), dtype=torch.bool)
    engine = InferenceModel(detector, "cpu", "fp32")

    def run_ours():
        return engine(images, mask)

    def run_maps():
        outputs = engine(images, mask, cross_attention=True)
        detections = postprocess(outputs, [(height, width)], detector.config.class_names, 0.0,
                                 rule=detector.postprocess_rule)[0][: args.top_k]
        return detections, detection_maps(outputs["attention"], 0, detections.query_index, (height, width))

    detections, _ = run_maps()

    def run_relevance():
        return relevance(engine.model, images, mask, 0, detections.query_index, detections.labels)

    times = interleaved({"ours": run_ours, "maps": run_maps, "relevance": run_relevance}, args.warmup, args.repeats)
    vision = detector.hf_model.config.vision_config
    tokens = 1 + (int(vision.image_size) // int(vision.patch_size)) ** 2
    per_detection = int(vision.num_hidden_layers) * int(vision.num_attention_heads) * tokens ** 2
    return {"tokens": tokens, "values": per_detection, **{key: statistics.median(t) for key, t in times.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["owlvit"], choices=["owlvit", "owlv2"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"machine: {cpu_name()}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; fp32, batch 1, random weights; median of {args.repeats} "
          f"after {args.warmup} warm-up; maps and relevance of the top {args.top_k}")
    print(f"{'family':<10}{'tokens':>8}{'grad values/det':>17}{'ours s':>9}{'+raw maps s':>13}{'relevance s':>13}"
          f"{'relevance/ours':>16}")
    for name in args.families:
        row = bench_family(name, args)
        print(f"{name:<10}{row['tokens']:>8}{row['values']:>17,}{row['ours']:>9.3f}{row['maps']:>13.3f}"
              f"{row['relevance']:>13.3f}{row['relevance'] / row['ours']:>16.1f}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
