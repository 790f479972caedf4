"""Cost of each explanation method (issue #13) on one image: the demo model and a random DETR-R50.

    PYTHONPATH=. .venv/bin/python scripts/bench_explain.py [--models demo r50] [--demo-masks 1000]
        [--r50-masks 16] [--detections 10] [--threads 2] [--drise-precisions fp32 bf16]

Per model: the inference pass (fast path, fp32, attention record with self-attention), then each
method for the same detections (the top --detections by score): raw (last/mean, cells -> image),
rollout, attn-grad, relevance (one forward + one batched backward for all detections), D-RISE
(N masked forward passes shared by all detections). Prints s/img, the overhead over
inference + raw maps, and for D-RISE s per mask and the linear extrapolation to N = 1000 (its cost
is N forward passes plus a (T x N) @ (N x pixels) product). Wall-clock medians; CPU named.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import cpu_name  # noqa: E402  (scripts/bench.py)
from detection.attention.drise_saliency import DriseOptions  # noqa: E402
from detection.attention.methods import (AttentionRollout, AttnGrad, Drise, ImageInput, RawAttention,  # noqa: E402
                                         Relevance, Targets)
from detection.data.images import load_image  # noqa: E402
from detection.data.preprocess import image_to_input, pad_batch  # noqa: E402
from detection.engine.fast import InferenceModel  # noqa: E402
from detection.engine.predictor import Predictor, PredictorSettings  # noqa: E402
from detection.models.registry import build_model, load_config, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def random_r50(seed: int = 0) -> torch.nn.Module:
    """DETR-R50 with random, lively weights (BN statistics and every float tensor perturbed)."""
    torch.manual_seed(seed)
    model = build_model(load_config("detr-r50")).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return model


def test_image(name: str) -> np.ndarray:
    if name == "demo":
        folder = ROOT / "data" / "demo" / "val"
        files = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if files:
            return load_image(files[0]).rgb
        return load_image(sorted((ROOT / "demo" / "images").glob("*.jpg"))[0]).rgb
    rng = np.random.default_rng(0)  # smooth random colours, 800 x 1066
    small = rng.integers(0, 255, (25, 34, 3), dtype=np.uint8)
    return cv2.resize(small, (1066, 800), interpolation=cv2.INTER_LINEAR)


CPU_SECONDS: list[float] = []  # per timed() call: median CPU seconds of this process (all threads)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall seconds of `repeats` calls (and the median CPU seconds in CPU_SECONDS[-1]:
    on a shared machine wall time measures the other jobs too, CPU time much less so)."""
    times, cpu, result = [], [], None
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    CPU_SECONDS.append(statistics.median(cpu))
    return statistics.median(times), result


def cpu() -> str:
    return f"(CPU {CPU_SECONDS[-1]:8.3f} s)"


def bench_model(name: str, model: torch.nn.Module, masks: int, detections: int, repeats: int,
                precisions: list[str]) -> None:
    rgb = test_image(name)
    original = (int(rgb.shape[0]), int(rgb.shape[1]))
    predictor = Predictor(model, PredictorSettings(precision="fp32", score_threshold=0.0, rollout=True))
    predictor.predict_arrays([rgb])  # warm-up
    inference, (dets, record) = timed(lambda: predictor.predict_arrays([rgb]), repeats)
    det = dets[0]
    top = torch.argsort(det.scores, descending=True)[:detections].tolist()
    targets = Targets.from_detections(det, top)
    images, mask = pad_batch([image_to_input(rgb, model.preprocess_spec)])
    image = ImageInput(original, attention=record.select_image(0), images=images, padding_mask=mask)

    def run(method) -> Callable[[], Any]:
        return lambda: [m.to_image(original) for m in method.explain(image, targets).values()]

    raw, _ = timed(run(RawAttention(("last",), ("mean",))), repeats)
    base = inference + raw
    print(f"\n{name}: input {tuple(images.shape[-2:])} from {original}, {len(targets)} detections, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    base_cpu = CPU_SECONDS[-2] + CPU_SECONDS[-1]
    print(f"  {'inference pass (fp32 fast path, + self-attention)':<52} {inference:8.3f} s/img "
          f"(CPU {CPU_SECONDS[-2]:8.3f} s)")
    print(f"  {'raw last/mean (cells -> image)':<52} {raw:8.3f} s/img {cpu()}   (inference + raw = {base:.3f} s, "
          f"CPU {base_cpu:.3f} s)")
    for label, method in (("rollout/mean", AttentionRollout(("mean",))), ("attn-grad/last", AttnGrad(model)),
                          ("relevance", Relevance(model))):
        method_run = run(method)
        method_run()  # warm-up
        seconds, _ = timed(method_run, repeats)
        print(f"  {label:<52} {seconds:8.3f} s/img {cpu()}   overhead {seconds / base:6.2f}x inference + raw "
              f"(CPU {CPU_SECONDS[-1] / base_cpu:6.2f}x)")
    for precision in precisions:
        engine = InferenceModel(model, "cpu", precision)
        options = DriseOptions(num_masks=masks)
        drise = Drise(model, engine, options)
        warm = Drise(model, engine, DriseOptions(num_masks=min(masks, 4)))
        run(warm)()
        seconds, _ = timed(run(drise), 1)
        per_mask = seconds / masks
        batch = options.batch_size or max(1, min(64, 2_000_000 // int(images.shape[-2] * images.shape[-1])))
        cpu_per_mask = CPU_SECONDS[-1] / masks
        print(f"  {f'drise {precision}, N = {masks} (batch {batch})':<52} {seconds:8.3f} s/img {cpu()}   "
              f"overhead {seconds / base:6.1f}x (CPU {CPU_SECONDS[-1] / base_cpu:6.1f}x);  {per_mask * 1e3:.1f} ms/mask "
              f"(CPU {cpu_per_mask * 1e3:.1f} ms) -> N = 1000: {per_mask * 1000:.1f} s/img (CPU {cpu_per_mask * 1000:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "r50"], choices=("demo", "r50"))
    parser.add_argument("--demo-masks", type=int, default=1000)
    parser.add_argument("--r50-masks", type=int, default=16)
    parser.add_argument("--detections", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--drise-precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    amx = "amx" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads, AMX {'yes' if amx else 'no'}), "
          f"torch {torch.__version__}, load average {load:.1f} at the start")
    for name in args.models:
        model = load_model("demo") if name == "demo" else random_r50()
        masks = args.demo_masks if name == "demo" else args.r50_masks
        bench_model(name, model, masks, args.detections, args.repeats, args.drise_precisions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
