#!/usr/bin/env python
"""Sanity check of the explanation methods (Adebayo et al. 2018): cascading randomisation of the
transformer's layers from the top, each method's maps of the trained model's detections compared
with the trained maps (Spearman mean [95 % bootstrap interval over images] / Pearson mean).

    PYTHONPATH=. .venv/bin/python scripts/sanity_check.py --model demo --images demo/images
        [--methods raw,rollout,attn-grad,relevance,drise] [--drise-masks 100] [--seed 0]
        [--score-threshold 0.7] [--out runs/sanity]

Prints the table (and the CPU), writes OUT/sanity.json (every per-detection correlation) and
OUT/sanity.md. Native DETR models only (`detection.evaluation.sanity`). fp32 (CPU unless --device).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cpu_name  # noqa: E402  (scripts/bench.py, next to this file)
from detection.attention.drise_saliency import DriseOptions  # noqa: E402
from detection.attention.methods import MethodOptions, applicable_methods, check_methods, parse_methods  # noqa: E402
from detection.data.images import is_image_path, load_image  # noqa: E402
from detection.evaluation.sanity import sanity_check, sanity_markdown  # noqa: E402
from detection.io import write_json_atomic, write_text_atomic  # noqa: E402
from detection.models.registry import load_model  # noqa: E402


def image_paths(spec: str) -> list[Path]:
    """The image files of a folder (sorted) or one file; SystemExit naming the path otherwise."""
    path = Path(spec)
    paths = sorted(p for p in path.iterdir() if p.is_file() and is_image_path(p)) if path.is_dir() else [path]
    if not paths or not all(p.is_file() for p in paths):
        raise SystemExit(f"{spec}: no image file found")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model name or folder (native DETR)")
    parser.add_argument("--images", default="demo/images", help="an image folder or file")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every method that applies)")
    parser.add_argument("--drise-masks", type=int, default=100, help="D-RISE masks per image (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation, D-RISE's masks, the bootstrap")
    parser.add_argument("--score-threshold", type=float, default=0.7, help="the trained model's detections to explain")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over images")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (fp32 in every case)")
    parser.add_argument("--out", default="runs/sanity", help="folder for sanity.json and sanity.md")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    methods = parse_methods(args.methods) if args.methods else applicable_methods(model)
    check_methods(methods, model)
    paths = image_paths(args.images)
    images = [load_image(p).rgb for p in paths]
    options = MethodOptions(layers=("last",), heads=("mean",), attn_grad_layers=("last",),
                            drise=DriseOptions(num_masks=args.drise_masks, seed=args.seed))
    started = time.perf_counter()
    try:
        result = sanity_check(model, images, methods, sources=[str(p) for p in paths], options=options,
                              score_threshold=args.score_threshold, seed=args.seed, device=args.device,
                              progress=print)
    except ValueError as err:
        raise SystemExit(f"{args.model}: {err}") from None
    seconds = time.perf_counter() - started
    rows = result.rows(args.resamples, args.seed)
    table = sanity_markdown(rows, result.choices)
    command = "scripts/sanity_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"{command}\nmodel {args.model}; {len(paths)} images, {sum(result.detections)} detections "
              f"(score >= {args.score_threshold}); methods {', '.join(methods)}"
              f"{f' (D-RISE {args.drise_masks} masks)' if 'drise' in methods else ''}; seed {args.seed}; "
              f"CPU: {cpu_name()}; {seconds:.1f} s\n"
              "cells: Spearman mean [95 % bootstrap interval over images] / Pearson mean, between the "
              "trained model's map and the map with the top layers re-initialised")
    print(header)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json(args.resamples, args.seed)
    data.update(command=command, model=args.model, methods=methods, seed=args.seed,
                score_threshold=args.score_threshold, drise_masks=args.drise_masks, device=args.device, cpu=cpu_name(),
                seconds=seconds)
    write_json_atomic(out / "sanity.json", data)
    write_text_atomic(out / "sanity.md", f"# Sanity check\n\n```\n{header}\n```\n\n{table}\n")
    print(f"-> {out / 'sanity.json'}, {out / 'sanity.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
