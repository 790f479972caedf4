#!/usr/bin/env python
"""HF detector families: transformers (eager) vs ours, without and with per-detection maps.

For each family, a model at its default configuration (random weights, no download) runs one
input at its default size. Timed in one run, same weights, same input:
  * HF eager: the transformers model itself (attn_implementation="eager"), no attention output;
  * ours: the same module through HFDetector + InferenceModel (fp32), logits and boxes;
  * ours + maps: the same with attention capture, post-processing and the maps of the top
    --top-k detections in image pixels (detection.attention.maps.detection_maps).
Printed: seconds (median of --repeats after --warmup), ours / HF, and the maps' overhead
(ours + maps / ours - 1; target <= 10 %). Run through `scripts/bench.py --model hf-families`
or directly; `--families` picks some.

    .venv/bin/python scripts/bench.py --model hf-families --repeats 3
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

from bench import cpu_name, interleaved  # noqa: E402 (interleaved: bench_hf_gradients imports it from here)
from detection.attention.maps import detection_maps  # noqa: E402
from detection.engine.fast import InferenceModel  # noqa: E402
from detection.models.hf.detector import HFDetector, HFDetectorConfig  # noqa: E402
from detection.models.hf.families import FAMILIES  # noqa: E402
from detection.models.hf.folder import processor_spec  # noqa: E402
from detection.postprocess import postprocess  # noqa: E402

# family -> (config class, config options, input (height, width))
DETR_LIKE_INPUT = (800, 1066)
DEFAULTS = {
    "yolos": ("YolosConfig", dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                  intermediate_size=768, image_size=[800, 1333], num_detection_tokens=100,
                                  use_mid_position_embeddings=False),
              DETR_LIKE_INPUT),  # YOLOS-Ti
    "conditional_detr": ("ConditionalDetrConfig", dict(use_pretrained_backbone=False), DETR_LIKE_INPUT),
    "dab-detr": ("DabDetrConfig", dict(use_pretrained_backbone=False), DETR_LIKE_INPUT),
    "table-transformer": ("TableTransformerConfig", dict(use_pretrained_backbone=False), DETR_LIKE_INPUT),
    "deformable_detr": ("DeformableDetrConfig", dict(use_pretrained_backbone=False), DETR_LIKE_INPUT),
    "rt_detr": ("RTDetrConfig", {}, (640, 640)),
    "rt_detr_v2": ("RTDetrV2Config", {}, (640, 640)),
    "d_fine": ("DFineConfig", {}, (640, 640)),
    "rf_detr": ("RfDetrConfig", {}, (560, 560)),
    "deimv2": ("Deimv2Config", {}, (640, 640)),  # HGNetV2 backbone, hybrid encoder
    # LwDetrConfig has no projector level by default: one at the ViT's stride 16 (scale 1.0)
    "lw_detr": ("LwDetrConfig", dict(projector_scale_factors=[1.0]), (640, 640)),
}


def build_detector(family_name: str, seed: int = 0) -> tuple[HFDetector, torch.nn.Module, tuple[int, int]]:
    import transformers

    family = FAMILIES[family_name]
    config_name, options, size = DEFAULTS[family_name]
    config = getattr(transformers, config_name)(attn_implementation="eager", **options)
    torch.manual_seed(seed)
    hf = getattr(transformers, family.model_class)(config).eval()
    names = config.id2label
    detector_config = HFDetectorConfig(
        name=f"{family_name}-random", model_type=family_name, class_names=tuple(names[i] for i in sorted(names)),
        category_ids=tuple(sorted(names)),
        num_queries=int(getattr(config, "num_queries", None) or getattr(config, "num_detection_tokens")),
        source="random weights")
    spec = processor_spec(None, family, Path("preprocessor_config.json"))
    return HFDetector(hf, family, spec, detector_config), hf, size


def bench_family(name: str, args: argparse.Namespace) -> dict[str, float]:
    detector, hf, (height, width) = build_detector(name)
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand((1, 3, height // 32, width // 32), generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    mask = torch.zeros((1, height, width), dtype=torch.bool)
    engine = InferenceModel(detector, "cpu", "fp32")
    kwargs = {"pixel_values": images}
    if detector.family.takes_padding:
        kwargs["pixel_mask"] = torch.ones((1, height, width), dtype=torch.long)

    def run_hf():
        with torch.inference_mode():
            return hf(**kwargs)

    def run_ours():
        return engine(images, mask)

    def run_maps():
        outputs = engine(images, mask, cross_attention=True)
        detections = postprocess(outputs, [(height, width)], detector.config.class_names, 0.0,
                                 rule=detector.postprocess_rule)[0]
        top = detections.query_index[: args.top_k]
        return detection_maps(outputs["attention"], 0, top, (height, width))

    runs = {"hf": run_hf, "ours": run_ours, "maps": run_maps}
    times = interleaved(runs, args.warmup, args.repeats)
    maps = run_maps()
    assert maps.shape[1:] == (height, width)
    return {"input": f"{height}x{width}", **{name: statistics.median(t) for name, t in times.items()},
            **{f"{name}_min": min(t) for name, t in times.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hf-families")
    parser.add_argument("--families", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"machine: {cpu_name()}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; fp32, batch 1, random weights at each family's default "
          f"config; median of {args.repeats} after {args.warmup} warm-up; maps of the top {args.top_k}")
    print("runs interleaved (HF, ours, ours + maps in turn); 'min' columns: the fastest run of each, the better "
          "estimate of uncontended speed on a shared machine")
    print(f"{'family':<20}{'input':>10}{'HF eager s':>12}{'ours s':>9}{'ours/HF':>9}{'+maps s':>9}{'maps +%':>9}"
          f"{'min: ours/HF':>14}{'maps +%':>9}")
    for name in args.families:
        row = bench_family(name, args)
        print(f"{name:<20}{row['input']:>10}{row['hf']:>12.3f}{row['ours']:>9.3f}{row['ours'] / row['hf']:>9.2f}"
              f"{row['maps']:>9.3f}{100 * (row['maps'] / row['ours'] - 1):>8.1f}%"
              f"{row['ours_min'] / row['hf_min']:>14.2f}{100 * (row['maps_min'] / row['ours_min'] - 1):>8.1f}%",
              flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
