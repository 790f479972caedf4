#!/usr/bin/env python
"""Training-step benchmark: HF DetrForObjectDetection + its loss (the reference) vs ours.

DETR-R50 with random weights (no download), the very same weights in both (scripts/bench.py's
`build_pair`), the same trainable set (ResNet layers 2-4, the authors' rule; printed as
parameter counts), one batch of --batch images at --height x --width with --boxes random boxes
each; a step is forward + loss + backward + gradient clipping (0.1) + AdamW step:

  * HF fp32: torch's default AdamW, its own Hungarian loss (auxiliary_loss=True, as ours); and the
    same with the authors' dropouts (attention weights and FFN activations 0.1, as ours; HF's config
    defaults them to 0), so that both do the same work;
  * ours fp32: detection.train (SetCriterion, fused AdamW, NCHW);
  * ours bf16: bf16 autocast, channels_last backbone, float32 heads and loss (train/precision.py);
    --bf16-nchw also times it without channels_last;
  * ours fp32 torch.compile (inductor; --no-compile skips it): dropout set to 0 in that copy so
    that the loss of its first step (which compiles, timed apart) is the eval-mode loss.

Prints median s/step after --warmup steps (and the fastest; the fp32 rows run interleaved step by
step, bf16 after them), the ratios to HF fp32, and the
loss agreement on one batch with dropout off: HF fp32 vs ours fp32, ours bf16 and compiled vs ours
fp32. --profile STEPS runs torch.profiler over HF fp32 and ours fp32 instead (phases, top operators).

    PYTHONPATH=. .venv/bin/python scripts/bench_train.py                  # CPU, batch 2, 512x672
    PYTHONPATH=. .venv/bin/python scripts/bench_train.py --device cuda --batch 8
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import build_pair, cpu_name, interleaved  # noqa: E402
from detection.models.backbone import freeze_backbone_layers  # noqa: E402
from detection.runtime.device import autocast  # noqa: E402
from detection.train.losses import SetCriterion  # noqa: E402
from detection.train.matcher import HungarianMatcher  # noqa: E402
from detection.train.optim import build_optimizer  # noqa: E402
from detection.train.precision import float32_heads  # noqa: E402

OPTIM = {"lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4, "adamw": "fused"}
CLIP = 0.1


def make_batch(batch: int, height: int, width: int, boxes: int, num_classes: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((batch, 3, height, width), generator=generator)
    targets = []
    for _ in range(batch):
        centre = torch.rand((boxes, 2), generator=generator) * 0.6 + 0.2
        size = torch.rand((boxes, 2), generator=generator) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (boxes,), generator=generator),
                        "boxes": torch.cat([centre, size], dim=1)})
    return images, targets


def freeze_hf_like_the_authors(hf) -> None:
    for name, parameter in hf.model.backbone.named_parameters():
        if "layer2" not in name and "layer3" not in name and "layer4" not in name:
            parameter.requires_grad_(False)


def with_the_authors_dropouts(hf, p: float = 0.1):
    """A copy of the HF model that drops out as the DETR authors (and ours) do: attention weights and
    the FFN's hidden activations at `p` too (HF's DetrConfig defaults attention_dropout and
    activation_dropout to 0; dropout after each sublayer, 0.1, is the same in all three)."""
    import copy

    model = copy.deepcopy(hf)
    changed = 0
    for module in model.modules():
        for name in ("attention_dropout", "activation_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)
                changed += 1
    if not changed:
        raise RuntimeError("no attention_dropout / activation_dropout attribute found in the HF model")
    return model


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> float:
    """The part of a training step both implementations share: backward, clip, AdamW step."""
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        loss.backward()
    with record_function("clip"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    with record_function("optimizer"):
        optimizer.step()
    return loss.item()


def hf_step(hf, images, targets, device) -> Callable[[], float]:
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    pixel_values = ((images - mean) / std).to(device)
    pixel_mask = torch.ones((images.shape[0], *images.shape[-2:]), dtype=torch.long, device=device)
    labels = [{"class_labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in targets]
    backbone = [p for n, p in hf.named_parameters() if p.requires_grad and "backbone" in n]
    rest = [p for n, p in hf.named_parameters() if p.requires_grad and "backbone" not in n]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": OPTIM["lr"]},
                                   {"params": backbone, "lr": OPTIM["lr_backbone"]}],
                                  weight_decay=OPTIM["weight_decay"])

    def step() -> float:
        with record_function("forward + loss"):
            loss = hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
        return optimizer_step(loss, optimizer, hf)

    return step


def ours_step(model, criterion, images, targets, device, precision: str, channels_last: bool,
              compiled: torch.nn.Module | None = None):
    """A training step of ours; `compiled`: run the forward through this `torch.compile(model)`."""
    images = images.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    optimizer = build_optimizer(model, OPTIM)

    def step() -> float:
        with record_function("forward + loss"):
            with autocast(device, precision, training=True):
                outputs = (model if compiled is None else compiled)(images, mask)
            loss, _ = criterion(outputs, targets)
        return optimizer_step(loss, optimizer, model)

    return step


def ours_loss(model, criterion, images, targets, precision: str, device) -> float:
    mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=device)
    with torch.no_grad(), autocast(device, precision, training=True):
        outputs = model(images.to(device), mask)
    return float(criterion(outputs, [{k: v.to(device) for k, v in t.items()} for t in targets])[0])


def profile_steps(name: str, step: Callable[[], float], warmup: int, steps: int, top: int = 15) -> None:
    """torch.profiler over `steps` steps: seconds per step in each phase (forward + loss,
    backward, clip, optimizer) and the `top` operators by self CPU time, per step."""
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / steps / 1e6 for e in events
              if e.key in ("forward + loss", "backward", "clip", "optimizer")}
    total = sum(phases.values())
    print(f"\n== {name}: {total:.3f} s/step under the profiler: " + ", ".join(
        f"{k} {v:.3f} s ({v / total:.0%})" for k, v in phases.items()))
    ops = sorted((e for e in events if e.key not in phases), key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"{'operator':48s} {'self s/step':>11s} {'calls/step':>10s}")
    for e in ops[:top]:
        print(f"{e.key[:48]:48s} {e.self_cpu_time_total / steps / 1e6:11.3f} {e.count / steps:10.0f}")


def timed(steps: dict[str, Callable[[], float]], device, warmup: int, repeats: int
          ) -> dict[str, tuple[float, float]]:
    """Time `steps` interleaved (`bench.interleaved`: step r of every row in turn, so a load change
    on a shared machine hits every row alike). Prints each row's steps; returns {name: (median, fastest)}."""
    times = interleaved(steps, warmup, repeats, device)
    for name, values in times.items():
        print(f"  {name} steps: {', '.join(f'{t:.2f}' for t in values)} s", flush=True)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=672)
    parser.add_argument("--boxes", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--bf16-nchw", action="store_true", help="also time bf16 without channels_last")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--skip-bf16-timing", action="store_true",
                        help="no bf16 row (its loss is still compared): bf16 steps are slow without AMX")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="instead of timing: torch.profiler over STEPS steps of HF fp32 and ours fp32 "
                             "(after --warmup): time per phase and the top operators of each")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}, "
          f"{platform.python_version()}")
    print(f"DETR-R50 random weights, batch {args.batch} at {args.height}x{args.width}, {args.boxes} boxes each, "
          f"median of {args.repeats} after {args.warmup} warm-up")

    hf, ours = build_pair()
    hf.config.auxiliary_loss = True  # ours supervises every decoder layer, as the authors do
    freeze_hf_like_the_authors(hf)
    freeze_backbone_layers(ours.backbone, 3)
    num_classes = ours.config.num_classes
    images, targets = make_batch(args.batch, args.height, args.width, args.boxes, num_classes)
    criterion = SetCriterion(num_classes, HungarianMatcher(1.0, 5.0, 2.0), eos_coef=0.1,
                             weight_dict={"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}).to(device)
    hf, ours = hf.to(device), ours.to(device)
    print(f"trainable parameters: HF {trainable(hf):,}, ours {trainable(ours):,}")

    # loss agreement on one batch, dropout off (before any step changes the weights)
    hf.eval(), ours.eval()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        hf_loss = float(hf(pixel_values=(images.to(device) - mean) / std,
                           pixel_mask=torch.ones((args.batch, args.height, args.width), dtype=torch.long,
                                                 device=device),
                           labels=[{"class_labels": t["labels"].to(device), "boxes": t["boxes"].to(device)}
                                   for t in targets]).loss)
    fp32_loss = ours_loss(ours, criterion, images, targets, "fp32", device)
    bf16_model = float32_heads(_copy(ours))
    bf16_model.backbone.to(memory_format=torch.channels_last)
    bf16_loss = ours_loss(bf16_model, criterion, images, targets, "bf16", device)
    print(f"loss on one batch (eval mode): HF fp32 {hf_loss:.6f}, ours fp32 {fp32_loss:.6f} "
          f"(rel. diff {abs(hf_loss - fp32_loss) / abs(fp32_loss):.2e}), ours bf16 {bf16_loss:.6f} "
          f"(rel. diff to fp32 {abs(bf16_loss - fp32_loss) / abs(fp32_loss):.2e})")
    compiled_model = None if args.no_compile or args.profile else _copy(ours)
    if compiled_model is not None:
        # dropout off, so that its first training step computes the eval-mode loss above
        # (frozen batch norm: train mode differs by dropout only); one compilation, not two
        for module in compiled_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if args.profile:
        hf.train(), ours.train()
        for name, step in (("HF fp32", hf_step(hf, images, targets, device)),
                           ("ours fp32", ours_step(ours, criterion, images, targets, device, "fp32", False))):
            profile_steps(name, step, args.warmup, args.profile)
        return 0

    results: dict[str, tuple[float, float]] = {}
    nchw = float32_heads(_copy(ours)) if args.bf16_nchw else None  # taken before ours trains
    hf_authors = with_the_authors_dropouts(hf) if not args.skip_hf else None
    hf.train(), ours.train(), bf16_model.train()
    if hf_authors is not None:
        hf_authors.train()
    if compiled_model is not None:  # first: compilation is the longest part of the run
        compiled_model.train()
        step = ours_step(compiled_model, criterion, images, targets, device, "fp32", False,
                         compiled=torch.compile(compiled_model))
        start = time.perf_counter()
        compiled_loss = step()  # compiles forward and backward
        print(f"ours fp32 torch.compile (dropout 0): first step {time.perf_counter() - start:.1f} s "
              f"(compilation), its loss {compiled_loss:.6f} (rel. diff to eager fp32 "
              f"{abs(compiled_loss - fp32_loss) / abs(fp32_loss):.2e})", flush=True)
        compiled_step = step
    # the fp32 rows (and the compiled one) interleaved, step by step; bf16 apart (on a CPU without
    # AMX one bf16 step takes as long as ten fp32 steps)
    rows: dict[str, Callable[[], float]] = {}
    if not args.skip_hf:
        rows["HF fp32"] = hf_step(hf, images, targets, device)
        # the same work as ours: HF with the authors' attention and FFN dropouts (taken before HF trains)
        rows["HF fp32, the authors' dropouts"] = hf_step(hf_authors, images, targets, device)
    rows["ours fp32"] = ours_step(ours, criterion, images, targets, device, "fp32", False)
    if compiled_model is not None:
        rows["ours fp32 torch.compile (dropout 0)"] = compiled_step
    results.update(timed(rows, device, args.warmup, args.repeats))
    low_precision: dict[str, Callable[[], float]] = {}
    if nchw is not None:
        nchw.train()
        low_precision["ours bf16 (NCHW, fp32 heads)"] = ours_step(nchw, criterion, images, targets, device, "bf16", False)
    if not args.skip_bf16_timing:
        low_precision["ours bf16 (channels_last, fp32 heads)"] = ours_step(bf16_model, criterion, images, targets,
                                                                           device, "bf16", True)
    if low_precision:
        results.update(timed(low_precision, device, args.warmup, args.repeats))
    reference = results.get("HF fp32", results["ours fp32"])[0]
    print(f"{'implementation':40s} {'s/step':>8s} {'fastest':>8s} {'img/s':>7s} {'vs HF fp32':>10s}")
    for name, (median, fastest) in results.items():
        print(f"{name:40s} {median:8.3f} {fastest:8.3f} {args.batch / median:7.2f} {reference / median:9.2f}x")
    print(f"load average at the end {os.getloadavg()}")
    return 0


def _copy(model: Any):
    import copy
    return copy.deepcopy(model)


if __name__ == "__main__":
    raise SystemExit(main())
