#!/usr/bin/env python
"""Cost of capturing dense attention from Hugging Face detectors (DenseCapture) on CPU.

Per family, a model of the published size with random weights (YOLOS-small; Conditional DETR,
DAB-DETR, Table Transformer: HF defaults, timm ResNet-50, no download), batch 1, at its input size
class (YOLOS 512x683, the DETR-like ~480x640 as 800x1066 is too slow on a small CPU), each run
interleaved so that load changes hit every variant alike:

  * plain: the model's own forward in its default attention (SDPA where HF supports it, else eager);
  * capture: the same forward inside DenseCapture (decoder cross-attention) + record();
  * +enc+dself: also encoder self-attention and decoder self-attention (opt-in; YOLOS's encoder
    block is the full patch x patch attention, computed again from q and k);
  * eager+output_attentions: HF's own way to get attention, for comparison (families on SDPA only).

Times are medians over --repeats after one warm-up; the ratio is (time / plain - 1). On a loaded
machine that difference of two long forwards is noisy, so "in capture" also gives the time spent
inside the capture's own code (its hooks' computations and record()) as a share of the plain
forward: the part of the overhead that is the capture's work rather than load.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_hf_capture.py --repeats 5 [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cpu_name  # noqa: E402  (scripts/bench.py, next to this file)
from detection.models.hf.capture_dense import DenseCapture  # noqa: E402
from tests import hf_dense_models  # noqa: E402

SIZES = {"yolos": (512, 683)}
DEFAULT_SIZE = (480, 640)


HOOK_SECONDS = [0.0]


def _timed(function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            HOOK_SECONDS[0] += time.perf_counter() - start
    return wrapper


for _name in ("_store_interface", "_ask_for_weights", "_take_weights", "_take_feature_mask", "_take_patch_grid",
              "record"):
    setattr(DenseCapture, _name, _timed(getattr(DenseCapture, _name)))


def forward(model, family: str, pixels: torch.Tensor, capture: dict | None = None, **extra):
    kwargs = {"pixel_values": pixels, **extra}
    if family != "yolos":
        kwargs["pixel_mask"] = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long)
    with torch.no_grad():
        if capture is None:
            return model(**kwargs)
        with DenseCapture(model, **capture) as dense:
            outputs = model(**kwargs, **dense.forward_kwargs())
        sizes = torch.tensor([list(pixels.shape[-2:])] * pixels.shape[0])
        return dense.record(outputs, input_size=tuple(pixels.shape[-2:]), image_sizes=sizes, padding_mask=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(hf_dense_models.FAMILIES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 on a shared, oversubscribed machine: a parallel region of 2+ threads "
                             "then waits for descheduled threads, which inflates small ops tenfold and skews ratios)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    header = f"{'family':<18} {'input':>9} {'attn':>6} {'plain s':>8} {'capture':>14} {'+enc+dself':>14} {'eager+out_attn':>15}"
    print(header)
    for family in args.families:
        model = hf_dense_models.build(family, full_size=True)
        height, width = SIZES.get(family, DEFAULT_SIZE)
        pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        variants = {
            "plain": lambda: forward(model, family, pixels),
            "capture": lambda: forward(model, family, pixels, {}),
            "full": lambda: forward(model, family, pixels, {"encoder": True, "decoder_self": True}),
        }
        implementation = model.config._attn_implementation
        if implementation != "eager":
            eager = hf_dense_models.build(family, attn_implementation="eager", full_size=True)
            variants["eager"] = lambda: forward(eager, family, pixels, output_attentions=True)
        times: dict[str, list[float]] = {name: [] for name in variants}
        in_capture: list[float] = []
        for name, run in variants.items():  # warm-up
            run()
        for _ in range(args.repeats):
            for name, run in variants.items():
                HOOK_SECONDS[0] = 0.0
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
                if name == "capture":
                    in_capture.append(HOOK_SECONDS[0])
        median = {name: statistics.median(values) for name, values in times.items()}
        plain = median["plain"]

        def cell(name: str) -> str:
            if name not in median:
                return "-"
            return f"{median[name]:.3f} {100 * (median[name] / plain - 1):+.1f}%"

        print(f"{family:<18} {height}x{width:<5} {implementation:>6} {plain:8.3f} {cell('capture'):>14} "
              f"{cell('full'):>14} {cell('eager'):>15} {100 * statistics.median(in_capture) / plain:10.2f}%", flush=True)


if __name__ == "__main__":
    main()
