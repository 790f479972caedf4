"""Cost of each explanation method (issue #13) on one image: the demo model and a random DETR-R50.

    PYTHONPATH=. .venv/bin/python scripts/bench_explain.py [--models demo r50 r50-small] [--demo-masks 1000]
        [--r50-masks 16] [--detections 10] [--threads 2] [--drise-precisions fp32 bf16] [--gradient-bf16]

Per model: the inference pass (fast path, fp32, attention record with self-attention), then each
method for the same detections (the top --detections by score): raw (last/mean, cells -> image),
rollout, attn-grad, relevance (one forward of the transformer with a graph + one batched backward
for all detections), D-RISE (N masked forward passes shared by all detections). The gradient
methods run twice (issue #23): on the inference pass's features (the record's
`transformer_inputs`: no backbone forward) and from the images (the backbone rerun without a
graph); the floor "inference + one batched backward" (the transformer forward with a graph from
the features and one backward of the same targets' logits to the features) is timed alone.
--gradient-bf16: the gradient maps with the transformer under bf16 autocast on a bf16 inference
pass's features, against the fp32 maps: max |difference| of the peak-normalised maps and Spearman
rank correlation per detection (min over detections), and their time. r50-small: the random
DETR-R50 with its input at 400 x 533 (a 2-core machine's stand-in for 800 x 1066). Prints s/img, the overhead over
inference + raw maps, and for D-RISE s per mask and the linear extrapolation to N = 1000 (its cost
is N forward passes plus a (T x N) @ (N x pixels) product). Wall-clock medians; CPU named.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
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


def random_r50(seed: int = 0, min_size: int = 800) -> torch.nn.Module:
    """DETR-R50 with random, lively weights (BN statistics and every float tensor perturbed);
    min_size 400: the 800 x 1066 test image is resized to 400 x 533 (`r50-small`)."""
    torch.manual_seed(seed)
    config = load_config("detr-r50")
    model = build_model(config.replace(min_size=min_size, max_size=min_size * 1333 // 800)).eval()
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
        return load_image(sorted((ROOT / "demo" / "images").glob("*.[jp][pn]g"))[0]).rgb
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


def batched_backward(model: torch.nn.Module, inputs: Any, targets: Targets) -> tuple[torch.Tensor, ...]:
    """The cost floor of relevance: the transformer + heads with a graph from the features (the
    forward relevance records: explicit attention weights), and ONE backward of the targets'
    class logits (batched one-hot rows) to the features, through every layer."""
    inputs = inputs.to("cpu", torch.float32, copy=True)
    inputs = dataclasses.replace(inputs, features=inputs.features.requires_grad_(True))
    with torch.enable_grad():
        logits = model.decode_features(inputs, cross_attention=True, encoder_attention=True,  # relevance's forward
                                       decoder_self_attention=True)["pred_logits"][0]
        chosen = logits[targets.query_index, targets.labels]
        return torch.autograd.grad(chosen, inputs.features, torch.eye(len(chosen)), is_grads_batched=True)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(values)).double()


def bench_gradient_bf16(model: torch.nn.Module, rgb: np.ndarray, targets: Targets, repeats: int) -> None:
    """Gradient maps with the transformer under bf16 autocast on a bf16 pass's features vs fp32."""
    from detection.attention.gradients import attn_grad_maps, relevance_maps
    records = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(model, PredictorSettings(precision=precision, score_threshold=0.0, keep_features=True))
        records[precision] = predictor.predict_arrays([rgb])[1].select_image(0).transformer_inputs
    engine = InferenceModel(model, "cpu", "bf16").model  # transformer and heads: the model's fp32 weights
    args = (0, targets.query_index, targets.labels)
    for name, fn in (("attn-grad/last", attn_grad_maps), ("relevance", relevance_maps)):
        reference = fn(model, None, None, *args, features=records["fp32"])
        fp32_on_bf16 = fn(model, None, None, *args, features=records["bf16"])  # a bf16 run's default
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(engine, None, None, *args, features=records["bf16"])  # warm-up
            seconds, low = timed(lambda: fn(engine, None, None, *args, features=records["bf16"]), repeats)
        for label, maps in (("fp32 on a bf16 pass's features", fp32_on_bf16), ("bf16 autocast, bf16 features", low)):
            flat_ref, flat_low = reference.flatten(1).double(), maps.float().flatten(1).double()
            norm_ref = flat_ref / flat_ref.amax(1, keepdim=True).clamp_min(1e-30)
            norm_low = flat_low / flat_low.amax(1, keepdim=True).clamp_min(1e-30)
            spearman = min(float(torch.corrcoef(torch.stack((_ranks(a), _ranks(b))))[0, 1])
                           for a, b in zip(flat_ref, flat_low))
            timing = f"{seconds:8.3f} s/img {cpu()}" if label.startswith("bf16") else " " * 32
            print(f"  {f'{name} {label}':<52} {timing}   max |normalised map difference| "
                  f"{float((norm_ref - norm_low).abs().max()):.4f}, min Spearman {spearman:.4f}")


def bench_model(name: str, model: torch.nn.Module, masks: int, detections: int, repeats: int,
                precisions: list[str], gradient_bf16: bool = False) -> None:
    rgb = test_image(name)
    original = (int(rgb.shape[0]), int(rgb.shape[1]))
    predictor = Predictor(model, PredictorSettings(precision="fp32", score_threshold=0.0, rollout=True,
                                                   keep_features=True))
    predictor.predict_arrays([rgb])  # warm-up
    inference, (dets, record) = timed(lambda: predictor.predict_arrays([rgb]), repeats)
    inference_cpu = CPU_SECONDS[-1]
    det = dets[0]
    top = torch.argsort(det.scores, descending=True)[:detections].tolist()
    targets = Targets.from_detections(det, top)
    images, mask = pad_batch([image_to_input(rgb, model.preprocess_spec)])
    image = ImageInput(original, attention=record.select_image(0), images=images, padding_mask=mask)
    rerun = ImageInput(original, attention=dataclasses.replace(record.select_image(0), transformer_inputs=None),
                       images=images, padding_mask=mask)  # no features: the gradient methods rerun the backbone

    def run(method, on: ImageInput = image) -> Callable[[], Any]:
        return lambda: [m.to_image(original) for m in method.explain(on, targets).values()]

    raw, _ = timed(run(RawAttention(("last",), ("mean",))), repeats)
    base = inference + raw
    print(f"\n{name}: input {tuple(images.shape[-2:])} from {original}, {len(targets)} detections, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    base_cpu = CPU_SECONDS[-2] + CPU_SECONDS[-1]
    print(f"  {'inference pass (fp32 fast path, + self-attention)':<52} {inference:8.3f} s/img "
          f"(CPU {CPU_SECONDS[-2]:8.3f} s)")
    print(f"  {'raw last/mean (cells -> image)':<52} {raw:8.3f} s/img {cpu()}   (inference + raw = {base:.3f} s, "
          f"CPU {base_cpu:.3f} s)")
    floor, _ = timed(lambda: batched_backward(model, record.select_image(0).transformer_inputs, targets), repeats)
    floor_cpu = inference_cpu + CPU_SECONDS[-1]
    print(f"  {'one batched backward of the targets (transformer)':<52} {floor:8.3f} s/img {cpu()}   "
          f"(inference + backward = {inference + floor:.3f} s, CPU {floor_cpu:.3f} s)")
    for label, method, on in (("rollout/mean", AttentionRollout(("mean",)), image),
                              ("attn-grad/last (inference pass's features)", AttnGrad(model), image),
                              ("attn-grad/last (backbone rerun, no graph)", AttnGrad(model), rerun),
                              ("relevance (inference pass's features)", Relevance(model), image),
                              ("relevance (backbone rerun, no graph)", Relevance(model), rerun)):
        method_run = run(method, on)
        method_run()  # warm-up
        seconds, _ = timed(method_run, repeats)
        extra = ""
        if label.startswith("relevance"):
            extra = f", {(inference + seconds) / (inference + floor):5.2f}x inference + backward"
        print(f"  {label:<52} {seconds:8.3f} s/img {cpu()}   overhead {seconds / base:6.2f}x inference + raw "
              f"(CPU {CPU_SECONDS[-1] / base_cpu:6.2f}x){extra}")
    if gradient_bf16:
        bench_gradient_bf16(model, rgb, targets, repeats)
    for precision in precisions:
        engine = InferenceModel(model, "cpu", precision)
        options = DriseOptions(num_masks=masks)
        drise = Drise(model, engine, options)
        batch = options.batch_size or max(1, min(64, 2_000_000 // int(images.shape[-2] * images.shape[-1])))
        run(Drise(model, engine, DriseOptions(num_masks=min(masks, batch))))()  # warm-up at the run's batch size
        seconds, _ = timed(run(drise), 1)
        drise_cpu = CPU_SECONDS[-1]
        per_mask = seconds / masks
        bare, _ = timed(lambda: bare_forwards(engine, images, mask, masks, batch), 1)
        print(f"  {f'{masks} bare forwards {precision} (batch {batch})':<52} {bare:8.3f} s/img {cpu()}   "
              f"D-RISE / bare forwards {seconds / bare:5.2f}x (CPU {drise_cpu / CPU_SECONDS[-1]:5.2f}x)")
        cpu_per_mask = drise_cpu / masks
        print(f"  {f'drise {precision}, N = {masks} (batch {batch})':<52} {seconds:8.3f} s/img (CPU {drise_cpu:8.3f} s)   "
              f"overhead {seconds / base:6.1f}x (CPU {drise_cpu / base_cpu:6.1f}x);  {per_mask * 1e3:.1f} ms/mask "
              f"(CPU {cpu_per_mask * 1e3:.1f} ms) -> N = 1000: {per_mask * 1000:.1f} s/img (CPU {cpu_per_mask * 1000:.1f} s)")


def bare_forwards(engine: Any, images: torch.Tensor, padding: torch.Tensor, count: int, batch: int) -> None:
    """`count` forwards of the unmasked input through D-RISE's own forward, `batch` copies at a time:
    what D-RISE's N forwards cost without masks, scores or sums (its target: <= 1.2x this)."""
    copies = images[:1].expand(batch, -1, -1, -1).contiguous()
    pads = padding[:1].expand(batch, -1, -1).contiguous()
    with torch.no_grad():
        for start in range(0, count, batch):
            size = min(batch, count - start)
            engine(copies[:size], pads[:size])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "r50"], choices=("demo", "r50", "r50-small"))
    parser.add_argument("--demo-masks", type=int, default=1000)
    parser.add_argument("--r50-masks", type=int, default=16)
    parser.add_argument("--detections", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--drise-precisions", nargs="*", default=["fp32", "bf16"], help="none: no D-RISE")
    parser.add_argument("--gradient-bf16", action="store_true", help="bf16 gradient maps against fp32 ones")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    amx = "amx" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads, AMX {'yes' if amx else 'no'}), "
          f"torch {torch.__version__}, load average {load:.1f} at the start")
    for name in args.models:
        model = load_model("demo").eval() if name == "demo" else random_r50(min_size=400 if name == "r50-small" else 800)
        masks = args.demo_masks if name == "demo" else args.r50_masks
        bench_model(name, model, masks, args.detections, args.repeats, args.drise_precisions, args.gradient_bf16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
