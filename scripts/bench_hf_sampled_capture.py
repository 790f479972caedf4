"""Cost of SampledCapture over a plain Hugging Face forward (RT-DETR, Deformable DETR), CPU or GPU.

Builds full-size models from default configs (ResNet-50 backbones, d_model 256, 300 queries,
6 decoder layers; random weights, nothing downloaded), runs a 640x640 batch and prints the
median time of the plain forward and of the forward inside the capture plus `record()`
(runs alternate, so that load drifts hit both alike), and times the capture's own work
(installing, the hooks, removing, `record()`) and the maps of the 10 best queries
(`detection_maps`) directly -- on a loaded machine the direct timings are the
reliable part, the ratio of medians carries the forward's own noise.

    PYTHONPATH=$PWD python scripts/bench_hf_sampled_capture.py [--repeats 5] [--batch 1] [--device cpu] [--families rt_detr deformable_detr]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers
from transformers import ResNetConfig

from detection.attention.maps import detection_maps
from detection.models.hf.capture_sampled import SampledCapture


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "rt_detr":
        return transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(anchor_image_size=None)).eval()
    backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(use_timm_backbone=False, backbone_config=backbone,
                                               use_pretrained_backbone=False)
    return transformers.DeformableDetrForObjectDetection(config).eval()


class TimedCapture(SampledCapture):
    """SampledCapture that adds up the time spent in its own work: install, hooks/wrappers, removal."""

    spent = 0.0

    def _add(self, function):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                TimedCapture.spent += time.perf_counter() - start
        return timed_call

    def _core_hook(self, index):
        return self._add(super()._core_hook(index))

    def __enter__(self):
        return self._add(super().__enter__)()

    def __exit__(self, *exc):
        return self._add(super().__exit__)(*exc)


def timed(function) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", nargs="+", default=["rt_detr", "deformable_detr"])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"CPU: {cpu_model()}; torch threads {torch.get_num_threads()}; torch {torch.__version__}; "
          f"transformers {transformers.__version__}; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    size = (640, 640)
    pixels = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    pixel_mask = torch.ones(args.batch, *size, dtype=torch.long, device=device)
    image_sizes = torch.tensor([size] * args.batch)
    for family in args.families:
        model = build(family).to(device)
        plain_times, capture_times, record_times, map_times = [], [], [], []

        def plain():
            return model(pixel_values=pixels, pixel_mask=pixel_mask)

        def captured():
            with TimedCapture(model) as capture:
                outputs = model(pixel_values=pixels, pixel_mask=pixel_mask, **capture.forward_kwargs())
            start = time.perf_counter()
            record = capture.record(outputs, input_size=size, image_sizes=image_sizes, padding_mask=None)
            record_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            best = outputs.logits[0].sigmoid().amax(-1).topk(10).indices
            detection_maps(record, 0, best, size)
            map_times.append(time.perf_counter() - start)

        with torch.inference_mode():
            plain()  # warm-up
            captured()
            record_times.clear()
            map_times.clear()
            TimedCapture.spent = 0.0
            for _ in range(args.repeats):
                plain_times.append(timed(plain))
                total = timed(captured)
                capture_times.append(total - map_times[-1])  # forward + hooks + record(), maps excluded
        base, capture = statistics.median(plain_times), statistics.median(capture_times)
        record_cost, map_cost = statistics.median(record_times), statistics.median(map_times)
        print(f"{family} 640x640 batch {args.batch}, {args.repeats} alternating runs: plain forward median "
              f"{base * 1e3:.0f} ms (min {min(plain_times) * 1e3:.0f}, max {max(plain_times) * 1e3:.0f}); "
              f"forward inside the capture + record() median {capture * 1e3:.0f} ms (min "
              f"{min(capture_times) * 1e3:.0f}, max {max(capture_times) * 1e3:.0f}) -> ratio of medians "
              f"{capture / base:.3f}")
        hooks = TimedCapture.spent / args.repeats
        print(f"  measured directly: install + hooks + removal {hooks * 1e3:.2f} ms, record() {record_cost * 1e3:.2f} ms "
              f"-> capture {(hooks + record_cost) / base * 100:.2f} % of the plain forward; maps of 10 detections "
              f"{map_cost * 1e3:.1f} ms = {map_cost / base * 100:.2f} %")


if __name__ == "__main__":
    main()
