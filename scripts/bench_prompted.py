#!/usr/bin/env python
"""Prompted HF families (OWL-ViT, OWLv2, Grounding DINO, OmDet-Turbo): transformers (eager) vs ours, and the
cost of the per-detection maps and prompt-token scores.

Each family at its default configuration (random weights, no download; OWL-ViT: ViT-B/32 at 768;
OWLv2: ViT-B/16 at 960, as the published models, on a 720x1280 image; Grounding DINO: Swin-T +
BERT-base, 900 queries; OmDet-Turbo: timm Swin-T + CLIP text, 900 queries at 640) runs one image with
the prompt PROMPT. Timed in one run (interleaved), same weights, same input, fp32:
  * HF eager: the transformers model itself on the processor's tensors (image + tokenized prompt);
    OWLv2: Owlv2ImageProcessor's square (pad, blur, resize, on the uint8 image) + the model, since
    ours makes that square inside its forward (from the image at its size, normalised: not timed);
  * ours: the same module through our detector (OwlDetector / GroundingDetector) + InferenceModel;
  * ours + maps: attention capture (keeping what the token scores reuse, as predict
    --save-attention does), post-processing and the maps of the top --top-k detections;
  * + tokens: that plus the prompt-token scores of those detections (text_token_scores on the
    pass's kept inputs: OWL's text tower, Grounding DINO's last decoder layer run again);
  * scores alone: the token scores by themselves, on one pass's kept inputs (their share of ours);
  * --rerun-tokens adds + tokens (rerun): the scores from the whole model run again (the path of
    bf16 / fp16 passes, and the one before the kept inputs).
Printed: seconds (median of --repeats after --warmup), ours / HF, and the overheads in percent.

    .venv/bin/python scripts/bench_prompted.py --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import cpu_name, interleaved  # noqa: E402
from detection.attention.maps import detection_maps  # noqa: E402
from detection.attention.token_scores import text_token_scores  # noqa: E402
from detection.engine.fast import InferenceModel  # noqa: E402
from detection.models.hf.families import FAMILIES  # noqa: E402
from detection.models.hf.folder import processor_spec  # noqa: E402
from detection.models.hf.grounding import build_grounding_detector  # noqa: E402
from detection.models.hf.omdet import build_omdet_detector  # noqa: E402
from detection.models.hf.owl import build_owl_detector  # noqa: E402
from detection.models.hf.owlv2 import build_owlv2_detector  # noqa: E402
from detection.postprocess import postprocess  # noqa: E402

PROMPT = ("cat", "remote control", "bicycle")
INPUTS = {"owlvit": (768, 768), "owlv2": (720, 1280), "grounding-dino": (800, 1066), "omdet-turbo": (640, 640)}


def build(family_name: str, folder: Path):
    """(our detector, the HF module, HF's forward kwargs for one image) with random default-size weights."""
    import hf_prompted_models
    import transformers

    family = FAMILIES[family_name]
    height, width = INPUTS[family_name]
    torch.manual_seed(0)
    if family_name == "owlvit":
        hf_prompted_models.write_clip_tokenizer(folder, 16)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
        hf = transformers.OwlViTForObjectDetection(transformers.OwlViTConfig(attn_implementation="eager")).eval()
        detector = build_owl_detector(hf, family, processor_spec(None, family, folder / "x"), tokenizer, PROMPT,
                                      "owlvit-random", "random weights")
        text = detector.text_inputs(1)
    elif family_name == "omdet-turbo":
        hf_prompted_models.write_clip_tokenizer(folder, 77)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
        config = transformers.OmDetTurboConfig(attn_implementation="eager")
        config.backbone_config.use_pretrained_backbone = False  # timm's Swin-T, random weights
        hf = transformers.OmDetTurboForObjectDetection(config).eval()
        detector = build_omdet_detector(hf, family, processor_spec(
            {"image_processor_type": "DetrImageProcessor", "size": {"height": height, "width": width}}, family,
            folder / "x"), tokenizer, PROMPT, "omdet-turbo-random", "random weights")
        text = {"classes_input_ids": detector.classes_input_ids, "classes_attention_mask": detector.classes_attention_mask,
                "tasks_input_ids": detector.tasks_input_ids, "tasks_attention_mask": detector.tasks_attention_mask,
                "classes_structure": torch.tensor([len(PROMPT)])}
    elif family_name == "owlv2":
        hf_prompted_models.write_clip_tokenizer(folder, 16)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
        config = transformers.Owlv2Config(vision_config={"image_size": 960}, attn_implementation="eager")
        hf = transformers.Owlv2ForObjectDetection(config).eval()
        detector = build_owlv2_detector(hf, family, processor_spec(None, family, folder / "x"), tokenizer, PROMPT,
                                        "owlv2-random", "random weights")
        text = detector.text_inputs(1)
    else:
        hf_prompted_models.write_bert_tokenizer(folder)
        tokenizer = transformers.BertTokenizer.from_pretrained(folder)
        hf = transformers.GroundingDinoForObjectDetection(transformers.GroundingDinoConfig(
            attn_implementation="eager", use_pretrained_backbone=False)).eval()
        detector = build_grounding_detector(hf, family, processor_spec(None, family, folder / "x"), tokenizer,
                                            PROMPT, "grounding-dino-random", "random weights")
        text = {"input_ids": detector.input_ids, "token_type_ids": detector.token_type_ids,
                "attention_mask": detector.text_attention_mask,
                "pixel_mask": torch.ones((1, height, width), dtype=torch.long)}
    return detector, hf, text, (height, width)


def bench_family(name: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        detector, hf, text, (height, width) = build(name, Path(folder))
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand((1, 3, height // 32, width // 32), generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    mask = torch.zeros((1, height, width), dtype=torch.bool)
    engine = InferenceModel(detector, "cpu", "fp32")
    hf_pixels = lambda: images  # noqa: E731 - the processor's tensor is the input itself
    if name == "owlv2":  # ours takes the image at its size, normalised; HF's processor makes the square
        import transformers

        processor = transformers.Owlv2ImageProcessor()
        uint8 = (images[0] * 255).round().to(torch.uint8)
        hf_pixels = lambda: processor(images=uint8, return_tensors="pt")["pixel_values"]  # noqa: E731
        spec = detector.preprocess_spec
        mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (spec.mean, spec.std))
        images = (uint8[None].float() / 255 - mean) / std

    def run_hf():
        with torch.inference_mode():
            return hf(pixel_values=hf_pixels(), **text)

    def run_ours():
        return engine(images, mask)

    def run_maps():
        outputs = engine(images, mask, cross_attention=True, keep_features=True)
        detections = postprocess(outputs, [(height, width)], detector.config.class_names, 0.0,
                                 rule=detector.postprocess_rule)[0][: args.top_k]
        maps = detection_maps(outputs["attention"], 0, detections.query_index, (height, width))
        return detections, maps, outputs["attention"].kept_inputs

    def run_tokens():
        detections, maps, kept = run_maps()
        return maps, text_token_scores(engine.model, None, detections.query_index, detections.labels,
                                       kept=kept.to("cpu", copy=True))

    def run_rerun_tokens():
        detections, maps, _ = run_maps()
        return maps, text_token_scores(engine.model, images, detections.query_index, detections.labels)

    _, _, kept_once = run_maps()
    top = run_maps()[0]

    def run_token_part():  # the token scores alone, on one pass's kept inputs
        return text_token_scores(engine.model, None, top.query_index, top.labels, kept=kept_once.to("cpu", copy=True))

    runs = {"hf": run_hf, "ours": run_ours, "maps": run_maps, "tokens": run_tokens, "part": run_token_part}
    if args.rerun_tokens:
        runs["rerun"] = run_rerun_tokens
    times = interleaved(runs, args.warmup, args.repeats)
    return {"input": f"{height}x{width}", **{key: statistics.median(t) for key, t in times.items()},
            **{f"{key}_min": min(t) for key, t in times.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--rerun-tokens", action="store_true",
                        help="also time the token scores from the whole model run again (the path before reuse)")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"machine: {cpu_name()}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; fp32, batch 1, random weights at each family's default "
          f"config; prompt {'. '.join(PROMPT)}.; median of {args.repeats} after {args.warmup} warm-up; maps and "
          f"token scores of the top {args.top_k}")
    print(f"{'family':<16}{'input':>10}{'HF eager s':>12}{'ours s':>9}{'ours/HF':>9}{'+maps s':>9}{'maps +%':>9}"
          f"{'+tokens s':>11}{'tokens +%':>11}{'min: ours/HF':>14}{'min: tokens +%':>16}"
          f"{'scores alone s':>15}{'alone +%':>10}"
          + (f"{'+rerun s':>10}{'rerun +%':>10}" if args.rerun_tokens else ""))
    for name in args.families:
        row = bench_family(name, args)
        print(f"{name:<16}{row['input']:>10}{row['hf']:>12.3f}{row['ours']:>9.3f}{row['ours'] / row['hf']:>9.2f}"
              f"{row['maps']:>9.3f}{100 * (row['maps'] / row['ours'] - 1):>8.1f}%"
              f"{row['tokens']:>11.3f}{100 * (row['tokens'] / row['ours'] - 1):>10.1f}%"
              f"{row['ours_min'] / row['hf_min']:>14.2f}{100 * (row['tokens_min'] / row['ours_min'] - 1):>15.1f}%"
              f"{row['part']:>15.3f}{100 * row['part'] / row['ours']:>9.1f}%"
              + (f"{row['rerun']:>10.3f}{100 * (row['rerun'] / row['ours'] - 1):>9.1f}%" if args.rerun_tokens else ""),
              flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
