"""Deletion / insertion: eval's batched path (`perturbation_curves`) against the step-by-step path it
replaced (`perturbation_curve` per detection, map and mode, chunks of 8 images), on the same images.

    PYTHONPATH=. .venv/bin/python scripts/bench_deletion.py [--data DIR --split val] [--images 10]
        [--model demo] [--floors gaussian] [--best-box-only box-gauss-0.25] [--steps 16] [--max-detections 3] [--batch-size 32] [--threads 1]

Without --data, a demo-like synthetic set (seed 2, 128 px, the demo model's validation recipe) is
written to a temporary folder. Maps: eval's default raw choices (last/mean/rollout x mean/max) and the
floors of --floors. Per image both paths run back to back; prints seconds, images forwarded, the
speed-up and the largest AUC difference, and the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import cpu_name  # noqa: E402  (scripts/bench.py)
from detection.attention.floors import parse_floors  # noqa: E402
from detection.attention.methods import MethodOptions, Targets  # noqa: E402
from detection.attention.metrics import FaithfulnessAccumulator  # noqa: E402
from detection.attention.perturbation import CurveRequest, perturbation_curve, perturbation_curves  # noqa: E402
from detection.data.ground_truth import load_coco_gt  # noqa: E402
from detection.data.sources import SourceItem  # noqa: E402
from detection.data.synthetic import SynthConfig, generate_split  # noqa: E402
from detection.engine.explain import build_methods, method_names  # noqa: E402
from detection.engine.fast import PreparedModels  # noqa: E402
from detection.engine.predictor import Predictor, PredictorSettings  # noqa: E402
from detection.evaluation.model_run import (DEFAULT_HEADS, DEFAULT_LAYERS, ModelRunOptions,  # noqa: E402
                                            detection_score_fn, detection_scores_fn, floor_settings, model_cell_grid)
from detection.models.registry import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--floors", default="gaussian")
    parser.add_argument("--best-box-only", default="box-gauss-0.25", help="with --floors all or best-box-only")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-detections", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp())
    if not args.data:
        generate_split(root, args.split, args.images, 2, SynthConfig(image_size=128, size_jitter=0.15, difficulty=0.3,
                                                                     max_objects=6, min_object_size=20, max_object_size=80))
    gt = load_coco_gt(root / "annotations" / f"instances_{args.split}.json")
    model = load_model(args.model, device="cpu")
    options = ModelRunOptions(floors=parse_floors(args.floors), best_box_only=args.best_box_only, progress=False)
    prepared = PreparedModels(model)
    runner = build_methods(model, method_names(None, DEFAULT_LAYERS), "cpu",
                           MethodOptions(layers=DEFAULT_LAYERS, heads=DEFAULT_HEADS), prepared)
    predictor = Predictor(model, PredictorSettings(device="cpu", precision="fp32", batch_size=1,
                                                   cross_attention=True, rollout=runner.needs_self_attention,
                                                   keep_images=True), prepared)
    accumulator = FaithfulnessAccumulator(runner.choices(), floor_settings=floor_settings(options))
    items = [SourceItem(key=f"img{im['id']}", file=str(root / args.split / im["file_name"]), image_id=int(im["id"]), unit=k)
             for k, im in enumerate(gt["images"][: args.images])]
    gt_by_image: dict[int, list] = {}
    for ann in gt["annotations"]:
        gt_by_image.setdefault(ann["image_id"], []).append(ann)
    seconds = {"step": 0.0, "batched": 0.0}
    forwarded = {"step": 0, "batched": 0}
    curves = worst = 0.0
    for result in predictor.run(items):
        det = result.detections
        keep = [k for k in range(len(det.scores)) if float(det.scores[k]) >= 0.5][: args.max_detections]
        if not keep:
            continue
        size = tuple(result.original_size)
        cells = runner.image_cell_maps(result.image, size, result.attention, Targets.from_detections(det, keep))
        maps = {choice: m.to_image(size) for choice, m in cells.items()}
        boxes = det.boxes.numpy().astype(np.float64)[keep]
        labels = [int(det.labels[k]) for k in keep]
        _, floors = accumulator.score_image(result.item.image_id, size, boxes, det.scores.numpy()[keep], labels,
                                            maps, gt_by_image.get(result.item.image_id, []), model_cell_grid(cells.values()))
        maps.update(floors)
        engine = predictor.engine

        def counting(fn, key):
            def run(batch):
                forwarded[key] += len(batch)
                return fn(batch)
            return run

        started = time.perf_counter()
        step_aucs = {}
        for j in range(len(keep)):
            score_fn = counting(detection_score_fn(engine, model, boxes[j], labels[j]), "step")
            for name, stack in maps.items():
                for mode in ("deletion", "insertion"):
                    step_aucs[(name, j, mode)] = perturbation_curve(
                        result.image, stack[j], score_fn, mode, steps=args.steps, batch_size=8,
                        tie_seed=result.item.image_id).auc
        seconds["step"] += time.perf_counter() - started
        started = time.perf_counter()
        requests = [CurveRequest((name, j, mode), stack[j], mode, j)
                    for j in range(len(keep)) for name, stack in maps.items() for mode in ("deletion", "insertion")]
        batched = perturbation_curves(result.image, requests, counting(detection_scores_fn(engine, model, boxes, labels),
                                                                       "batched"),
                                      steps=args.steps, batch_size=args.batch_size, tie_seed=result.item.image_id)
        seconds["batched"] += time.perf_counter() - started
        curves += len(requests)
        worst = max(worst, max(abs(batched[key].auc - auc) for key, auc in step_aucs.items()))
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); torch {torch.__version__}")
    print(f"model {args.model}, {len(items)} images of {root / args.split}, {int(curves)} curves "
          f"({len(maps)} maps: {', '.join(maps)}; up to {args.max_detections} detections per image, {args.steps} steps)")
    print(f"step by step: {seconds['step']:.2f} s, {forwarded['step']} images forwarded (chunks of 8)")
    print(f"batched:      {seconds['batched']:.2f} s, {forwarded['batched']} images forwarded "
          f"(chunks of {args.batch_size}, each distinct image once)")
    print(f"speed-up {seconds['step'] / max(seconds['batched'], 1e-9):.2f}x; largest |AUC difference| {worst:.2e}")


if __name__ == "__main__":
    main()
