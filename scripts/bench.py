#!/usr/bin/env python
"""Inference benchmark: HF transformers DETR (reference) vs our engine, same weights, same input.

One run builds a DETR-R50 with random weights (no download) in HF transformers, converts the
very same weights to our model with detection.models.convert.hf_to_native, and times on one
800x1066 input (batch 1 unless --batch-sizes):

  * HF DetrForObjectDetection fp32 (its default attention path, no attention output);
  * ours fp32 as built (no BN folding, NCHW) and the fast path (BN folded, channels_last),
    bf16 fast path (bf16 ResNet body, autocast transformer, fp32 heads), each without and
    with attention maps (decoder cross-attention of the top detections mapped to image
    pixels with detection.attention.maps.detection_maps);
  * the bf16 ResNet-50 body alone (the floor under every bf16 figure);
  * drawing one overlay at 800x1066 (combined, and one detection), PNG encoding apart;
  * agreement: fp32 vs HF, bf16 vs fp32 (max |box| in pixels, max |logit|, same top queries).
    With random weights the decoder gives nearly the same score to every query (the printed
    score gap says how close): "same top queries" is only meaningful for a trained model
    (tests/test_fast.py checks that on the shipped demo model).

Times are medians over --repeats runs after --warmup runs; figures depend on the machine and
on its load (print `lscpu` / load average with the table). GPU: --device cuda --batch-sizes
1 8 32 times our bf16 path (with attention record) and HF fp32 per batch size.

    .venv/bin/python scripts/bench.py                       # CPU, batch 1
    .venv/bin/python scripts/bench.py --device cuda --batch-sizes 1 8 32
    .venv/bin/python scripts/bench.py --model hf-families   # HF families: scripts/bench_hf.py
    .venv/bin/python scripts/bench.py --job                  # the predict job on 12-MP photos: scripts/bench_job.py
    .venv/bin/python scripts/bench.py --explain [--models demo r50 --demo-masks 1000 ...]
        # each explanation method's overhead over inference + raw maps: scripts/bench_explain.py
    .venv/bin/python scripts/bench.py --train [--batch 2 --profile 2 ...]
        # one training step, HF fp32 vs ours fp32 / bf16 / compiled: scripts/bench_train.py
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.engine.allocator import retain_freed_memory  # noqa: E402
from detection.engine.fast import InferenceModel  # noqa: E402
from detection.models import convert  # noqa: E402
from detection.models.registry import build_model, load_config  # noqa: E402
from detection.postprocess import postprocess  # noqa: E402

HEIGHT, WIDTH = 800, 1066


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BEST_TIMES: dict[int, float] = {}


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> tuple[float, Any]:
    """Median seconds of fn() over `repeats` runs after `warmup` runs, and the last result.

    The fastest run is kept in BEST_TIMES[id(fn)]: on a shared machine the minimum is the
    better estimate of the uncontended speed, the median of what a user sees."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    BEST_TIMES[id(fn)] = min(times)
    return statistics.median(times), result


def interleaved(runs: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                device: torch.device | None = None) -> dict[str, list[float]]:
    """Seconds of each run, the runs taken in turn (a, b, c, a, b, ...) so that a load change on a
    shared machine hits them all alike; `warmup` untimed turns first. `device`: CUDA work is
    synchronised around each timed run."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if device is not None:
                sync(device)
            start = time.perf_counter()
            run()
            if device is not None:
                sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_ratio(numerator: Callable[[], Any], denominator: Callable[[], Any], device: torch.device,
                      pairs: int) -> dict[str, float]:
    """Time `numerator` and `denominator` alternately, `pairs` times each (after one warm-up run of
    each): the median of the per-pair ratios and the ratio of the fastest runs."""
    times = interleaved({"numerator": numerator, "denominator": denominator}, 1, pairs, device)
    tops, bottoms = times["numerator"], times["denominator"]
    return {"median": statistics.median(t / b for t, b in zip(tops, bottoms)), "fastest": min(tops) / min(bottoms)}


def flop_counts(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """GFLOP (multiply-add = 2) of the CNN body alone and of the whole forward with cross-attention,
    by torch's FlopCounterMode (fp32, no grad). Its counter has no formula for the CPU's fused SDPA
    kernel, so the encoder's and the decoder self-attention's q·k / a·v products are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    import copy

    model = copy.deepcopy(model).eval().requires_grad_(False)  # the counter's module tracker needs no autograd
    mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
    with torch.no_grad():
        normalised = (images - model.image_mean) / model.image_std
        with FlopCounterMode(display=False) as body:
            model.backbone.body(normalised)
        with FlopCounterMode(display=False) as whole:
            model(images, mask, cross_attention=True)
    return {"body_gflop": body.get_total_flops() / 1e9, "whole_gflop": whole.get_total_flops() / 1e9}


def build_pair(seed: int = 0):
    """HF DetrForObjectDetection (R50, random, perturbed) + our DETR with the same weights."""
    import transformers

    config = load_config("detr-r50")
    hf_config = transformers.DetrConfig(
        use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False, dilation=False,
        num_queries=config.num_queries, d_model=config.hidden_dim, encoder_layers=config.enc_layers,
        decoder_layers=config.dec_layers, encoder_attention_heads=config.nheads,
        decoder_attention_heads=config.nheads, encoder_ffn_dim=config.dim_feedforward,
        decoder_ffn_dim=config.dim_feedforward,
        id2label={i: name for i, name in enumerate(config.class_names)})
    torch.manual_seed(seed)
    hf = transformers.DetrForObjectDetection(hf_config).eval()
    # random init leaves frozen BN at identity and biases at 0: perturb every tensor so the
    # network is not degenerate (and folding BN has real statistics to fold)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif "query_position_embeddings" in name:
                # N(0, 1) like the authors' nn.Embedding; HF's 0.02-std init makes all 100
                # queries nearly identical, so every query would predict the same box
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            elif tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)
    ours = build_model(config).eval()
    missing, unexpected = ours.load_state_dict(convert.hf_to_native(hf.state_dict()), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight transfer failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf, ours


def make_input(batch: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image (float [0, 1], (B, 3, 800, 1066)); smooth so attention is not flat."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((batch, 3, HEIGHT // 32, WIDTH // 32), generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    return (image + 0.05 * torch.rand(image.shape, generator=generator)).clamp(0, 1)


def hf_runner(hf, images: torch.Tensor, device: torch.device, attentions: bool = False):
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    pixel_values = (images.to(device) - mean) / std
    pixel_mask = torch.ones((images.shape[0], *images.shape[-2:]), dtype=torch.long, device=device)

    @torch.inference_mode()
    def run():
        out = hf(pixel_values=pixel_values, pixel_mask=pixel_mask, output_attentions=attentions)
        return {"pred_logits": out.logits.float(), "pred_boxes": out.pred_boxes.float()}

    return run


def ours_runner(engine: InferenceModel, images: torch.Tensor, maps: str, top_k: int, class_names):
    """Model + postprocess, and per `maps`:
    "none": no attention; "record": the model returns its AttentionRecord (decoder
    cross-attention; the last layer, all heads, moved to the CPU); "image": also the top_k maps
    at image resolution (detection_maps: last layer, head mean, min-max)."""
    from detection.attention.maps import detection_maps

    mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
    sizes = torch.tensor([[images.shape[-2], images.shape[-1]]] * images.shape[0])

    def run():
        outputs = engine(images, mask, cross_attention=maps != "none")
        detections = postprocess(outputs, sizes, class_names, score_threshold=0.0)
        result = {"outputs": outputs, "detections": detections, "maps": None}
        if maps != "none":
            # what the engine keeps for layers="last": the last layer, every head, on the CPU
            record = outputs["attention"].keep_last_layer().to("cpu")
            if maps == "image":
                result["maps"] = [detection_maps(record, i, det.query_index[:top_k], det.image_size)
                                  for i, det in enumerate(detections)]
        return result

    return run


def body_only_runner(engine: InferenceModel, images: torch.Tensor):
    """The engine's prepared CNN body alone (normalised input, as the model feeds it)."""
    model = engine.model
    body = model.backbone.body
    normalised = (images.to(engine.device) - model.image_mean) / model.image_std

    @torch.inference_mode()
    def run():
        return body(normalised)

    return run


def agreement(reference: dict, other: dict, top_k: int) -> dict[str, Any]:
    """Max |box| difference in pixels, max |logit|, and whether the top-k queries agree."""
    box_px = ((reference["pred_boxes"] - other["pred_boxes"]).abs()
              * torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT])).max().item()
    logit = (reference["pred_logits"] - other["pred_logits"]).abs().max().item()

    def ranked(outputs):  # (best object-class score per query, sorted descending; query order)
        return outputs["pred_logits"].softmax(-1)[..., :-1].max(-1).values[0].sort(descending=True)

    scores, reference_order = ranked(reference)
    top_reference, top_other = reference_order[:top_k].tolist(), ranked(other).indices[:top_k].tolist()
    return {"max_box_px": box_px, "max_logit": logit, "same_top_queries": top_reference == top_other,
            "same_top_queries_as_set": set(top_reference) == set(top_other),
            "reference_top_score_gap": float(scores[top_k - 1] - scores[top_k]) if len(scores) > top_k else None,
            "reference_top_scores": [round(float(v), 4) for v in scores[:top_k]]}


def bench_overlay(top_k: int, repeats: int) -> dict[str, float]:
    from detection.data.image_codec import encode_image
    from detection.render.overlay import render_detection_overlay, render_overlay
    from detection.structures import Detections

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    boxes = []
    for _ in range(top_k):
        x, y = rng.uniform(0, WIDTH - 200), rng.uniform(0, HEIGHT - 200)
        boxes.append([x, y, x + rng.uniform(50, 200), y + rng.uniform(50, 200)])
    detections = Detections((HEIGHT, WIDTH), boxes=torch.tensor(boxes), scores=torch.full((top_k,), 0.9),
                            labels=torch.arange(top_k) % 5, query_index=torch.arange(top_k),
                            class_names=[f"class {i % 5}" for i in range(top_k)])
    maps = rng.random((top_k, HEIGHT, WIDTH), dtype=np.float32)
    device = torch.device("cpu")
    combined, drawn = timed(lambda: render_overlay(image, detections, maps), device, 2, repeats)
    single, _ = timed(lambda: render_detection_overlay(image, detections[0], maps[0]), device, 2, repeats)
    png, _ = timed(lambda: encode_image(drawn, ".png", png_compression=1), device, 1, repeats)
    jpg, _ = timed(lambda: encode_image(drawn, ".jpg", jpeg_quality=92), device, 1, repeats)
    return {"combined_overlay_s": combined, "one_detection_overlay_s": single, "png_encode_s": png,
            "jpg_encode_s": jpg}


#: Benchmarks of their own, reached through this script: the flag -> scripts/<module>.py (the
#: flag is dropped, the other arguments are passed on).
FORWARDED = {
    "--explain": "bench_explain",  # explanation methods (issue 13): overhead over the raw maps
    "--job": "bench_job",  # the predict job at photo scale, with and without exports (issue 14)
    "--train": "bench_train",  # training step: HF fp32 vs ours fp32 / bf16 / compiled (issue 16)
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for flag, module in FORWARDED.items():
        if flag in argv:
            return importlib.import_module(module).main([arg for arg in argv if arg != flag])
    if any(arg == "--model" or arg.startswith("--model=") for arg in argv):
        # HF detector families (scripts/bench_hf.py): transformers eager vs ours, with and without maps
        import bench_hf

        return bench_hf.main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=10, help="detections whose maps are computed")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the CNN body")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0 = torch's default). On a machine shared with other "
                             "busy processes, fewer threads than cores avoids OpenMP oversubscription, "
                             "which can slow every figure down several-fold")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # Our engine keeps freed CPU memory for reuse (detection/engine/allocator.py). The setting
    # is process-wide, so it is made before anything runs: the HF reference gets it too.
    # DETR_ATTN_MALLOC=default measures everything with glibc's default behaviour instead.
    allocator = "glibc keeps freed memory" if retain_freed_memory() else "default allocator"

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: CUDA is not available", file=sys.stderr)
        return 2
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    load_before = os.getloadavg()
    print(f"machine: {machine}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{allocator}; load average {load_before[0]:.2f} (shared machines slow every figure down)")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; input {HEIGHT}x{WIDTH}; DETR-R50 random weights; "
          f"median of {args.repeats} after {args.warmup} warm-up")

    hf, ours = build_pair()
    class_names = ours.config.class_names
    report: dict[str, Any] = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "device": str(device),
                              "load_average_start": load_before[0], "allocator": allocator, "rows": []}

    def row(name: str, batch: int, seconds: float, best: float, reference: float | None) -> None:
        per_image, best_per_image = seconds / batch, best / batch
        entry = {"name": name, "batch": batch, "s_per_img": per_image, "img_per_s": 1.0 / per_image,
                 "best_s_per_img": best_per_image}
        if reference:
            entry["speedup_vs_hf"] = reference / per_image
        report["rows"].append(entry)
        ratio = f"{reference / per_image:6.2f}x" if reference else "     -"
        print(f"  {name:<40} batch {batch:>3}  {per_image:8.4f} s/img (best {best_per_image:7.4f})  "
              f"{1 / per_image:8.2f} img/s  vs HF {ratio}")

    for batch in args.batch_sizes:
        images = make_input(batch)
        print(f"\nbatch {batch}:")
        hf_seconds = None
        if not args.skip_hf:
            hf_dev = hf.to(device)
            runner = hf_runner(hf_dev, images, device)
            hf_seconds, hf_out = timed(runner, device, args.warmup, args.repeats)
            row("HF transformers fp32", batch, hf_seconds, BEST_TIMES[id(runner)], None)
            hf_seconds /= batch
            hf_out = {k: v.cpu() for k, v in hf_out.items()}

        variants = [("ours fp32 (as built)", "fp32", False, False, False)]
        variants += [("ours fp32 fast", "fp32", True, True, False)]
        variants += [("ours bf16 fast", "bf16", True, True, False)]
        if args.compile:
            variants += [("ours bf16 fast + compile", "bf16", True, True, True)]
        if device.type == "cuda":
            variants = [v for v in variants if v[1] != "fp32" or v[2]]
        results: dict[str, dict[str, Any]] = {}
        for name, precision, fold, channels_last, compile_body in variants:
            engine = InferenceModel(ours, device, precision, fold_bn=fold, channels_last=channels_last,
                                    compile=compile_body)
            seconds = {}
            outputs = {}
            modes = ["none", "record"] + (["image"] if device.type == "cpu" or batch == 1 else [])
            for mode in modes:
                runner = ours_runner(engine, images, mode, args.top_k, class_names)
                seconds[mode], outputs[mode] = timed(runner, device, args.warmup, args.repeats)
                label = {"none": "", "record": " + attention", "image": f" + attention + {args.top_k} image maps"}[mode]
                row(name + label, batch, seconds[mode], BEST_TIMES[id(runner)], hf_seconds)
            for mode in modes[1:]:
                overhead = 100.0 * (seconds[mode] - seconds["none"]) / seconds["none"]
                what = "attention record" if mode == "record" else f"record + {args.top_k} maps at {HEIGHT}x{WIDTH}"
                print(f"  {'':<40} overhead of the {what}: {overhead:+.1f} %")
                report[f"overhead_percent[{name}][{mode}][batch {batch}]"] = overhead
            results[name] = {"outputs": {k: outputs["none"]["outputs"][k].cpu() for k in ("pred_logits", "pred_boxes")}}
            if name == "ours bf16 fast":
                # the floor under every other bf16 figure: the ResNet-50 body on its own
                body_runner = body_only_runner(engine, images)
                body_seconds, _ = timed(body_runner, device, args.warmup, args.repeats)
                row("  of which the ResNet-50 body alone", batch, body_seconds, BEST_TIMES[id(body_runner)],
                    hf_seconds)
                if "image" in modes:
                    whole = ours_runner(engine, images, "image", args.top_k, class_names)
                    ratio = interleaved_ratio(whole, body_runner, device, args.repeats)
                    report[f"model_path_ratio[batch {batch}]"] = ratio
                    print(f"  {'':<40} model path / body alone (interleaved, {args.repeats} pairs): median "
                          f"{ratio['median']:.3f}, fastest runs {ratio['fastest']:.3f} (target <= 1.25)")
                    flops = flop_counts(ours, images)
                    report[f"flops[batch {batch}]"] = flops
                    print(f"  {'':<40} FLOPs: body {flops['body_gflop']:.1f} G, whole forward "
                          f"{flops['whole_gflop']:.1f} G ({flops['whole_gflop'] / flops['body_gflop']:.3f}x; "
                          f"fused SDPA not counted)")
            del engine

        print("\n  agreement (batch image 0):")
        pairs = []
        if not args.skip_hf:
            pairs.append(("HF fp32", {k: v[:1] for k, v in hf_out.items()}, "ours fp32 (as built)"))
            pairs.append(("HF fp32", {k: v[:1] for k, v in hf_out.items()}, "ours fp32 fast"))
        pairs.append(("ours fp32 fast", None, "ours bf16 fast"))
        for ref_name, ref_out, other_name in pairs:
            ref_out = ref_out or {k: v[:1] for k, v in results[ref_name]["outputs"].items()}
            other = {k: v[:1] for k, v in results[other_name]["outputs"].items()}
            stats = agreement(ref_out, other, args.top_k)
            report[f"agreement[{ref_name} vs {other_name}]"] = stats
            print(f"  {ref_name:>15} vs {other_name:<22} max |box| {stats['max_box_px']:.4f} px, "
                  f"max |logit| {stats['max_logit']:.4f}, top-{args.top_k} queries same order "
                  f"{stats['same_top_queries']}, same set {stats['same_top_queries_as_set']} "
                  f"(reference top-{args.top_k} scores {stats['reference_top_scores'][0]:.4f}..."
                  f"{stats['reference_top_scores'][-1]:.4f}; gap to the next {stats['reference_top_score_gap']:.2e})")

    overlay = bench_overlay(args.top_k, args.repeats)
    report["overlay"] = overlay
    print(f"\noverlay at {HEIGHT}x{WIDTH}: combined ({args.top_k} detections) {overlay['combined_overlay_s'] * 1000:.1f} ms, "
          f"one detection {overlay['one_detection_overlay_s'] * 1000:.1f} ms; encode PNG "
          f"{overlay['png_encode_s'] * 1000:.1f} ms, JPEG {overlay['jpg_encode_s'] * 1000:.1f} ms")
    report["load_average_end"] = os.getloadavg()[0]
    print(f"load average at the end: {report['load_average_end']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
