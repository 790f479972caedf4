#!/usr/bin/env python
"""HF detector families: cost of the gradient methods (attn-grad, relevance) over the raw maps.

For each family, a model at its default configuration (random weights, no download; the builders
of scripts/bench_hf.py) runs one input at its default size times --scale. Timed in one run,
interleaved (scripts/bench_hf.interleaved), same weights, same input, the top --top-k queries:
  * raw: forward with attention capture + the raw cell maps of the top detections;
  * attn-grad: detection.attention.gradients.attn_grad (one forward + batched backward);
  * relevance: detection.attention.gradients.relevance (dense families only).
Printed: seconds (median of --repeats after --warmup) and each method / raw.

    .venv/bin/python scripts/bench_hf_gradients.py --families yolos conditional_detr deformable_detr --scale 0.5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import cpu_name  # noqa: E402
from bench_hf import DEFAULTS, build_detector, interleaved  # noqa: E402
from detection.attention.gradients import attn_grad, relevance  # noqa: E402
from detection.attention.maps import query_cell_maps  # noqa: E402


def bench_family(name: str, args: argparse.Namespace) -> dict[str, object]:
    detector, _, (height, width) = build_detector(name)
    detector.eval()
    height, width = (max(64, int(round(v * args.scale / 32)) * 32) for v in (height, width))
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand((1, 3, max(1, height // 32), max(1, width // 32)), generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    mask = torch.zeros((1, height, width), dtype=torch.bool)
    with torch.no_grad():
        logits = detector(images, mask)["pred_logits"][0]
    classes = logits.shape[1] - (1 if detector.postprocess_rule.kind == "softmax_no_object" else 0)
    scores, labels = logits[:, :classes].max(dim=1)
    queries = scores.argsort(descending=True)[: args.top_k]
    labels = labels[queries]

    def run_raw():
        with torch.no_grad():
            record = detector(images, mask, cross_attention=True)["attention"]
        return query_cell_maps(record, 0, queries)

    runs = {"raw": run_raw, "attn-grad": lambda: attn_grad(detector, images, mask, 0, queries, labels)}
    if detector.family.attention == "dense":
        runs["relevance"] = lambda: relevance(detector, images, mask, 0, queries, labels)
    times = interleaved(runs, args.warmup, args.repeats)
    return {"input": f"{height}x{width}", **{method: statistics.median(t) for method, t in times.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    parser.add_argument("--scale", type=float, default=1.0, help="input size = the family's default x scale")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"machine: {cpu_name()}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; fp32, batch 1, random weights, default config; median of "
          f"{args.repeats} after {args.warmup} warm-up; top {args.top_k} queries")
    print(f"{'family':<18} {'input':>9} {'raw s':>8} {'attn-grad s':>12} {'x raw':>6} {'relevance s':>12} {'x raw':>6}")
    for name in args.families:
        row = bench_family(name, args)
        relevance_s = row.get("relevance")
        tail = f"{relevance_s:>12.3f} {relevance_s / row['raw']:>6.1f}" if relevance_s is not None else f"{'-':>12} {'-':>6}"
        print(f"{name:<18} {row['input']:>9} {row['raw']:>8.3f} {row['attn-grad']:>12.3f} "
              f"{row['attn-grad'] / row['raw']:>6.1f} {tail}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
