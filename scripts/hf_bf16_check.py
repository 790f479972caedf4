#!/usr/bin/env python
"""fp32 vs bf16 autocast on CPU for the Hugging Face detector families: do the detections agree?

Per family, a model with lively random weights (queries differ, scores spread; tests/hf_dense_models
and tests/hf_sampled_models) runs one batch of two differently sized images in
fp32 and under bf16 autocast (detection.runtime.device.autocast). The fp32 top-10 detections
(detection.postprocess with the family's rule) are compared with bf16's:

  * top-10 kept: how many of fp32's top-10 (query, label) pairs are also in bf16's top-10;
  * |d score|: largest score change of those pairs; |d box|: largest box corner change, input px;
  * labels: fp32 top-10 queries whose best label is the same in bf16;
  * |d attn|: largest change of their last-layer, head-mean cross-attention (dense families),
    relative to the fp32 map's peak;
  * spread: fp32 top-1 and top-10 scores of image 0 (a check that the weights are lively).

The verdict applies the proposed tolerance (column tol): |d score| <= TOL_SCORE, |d box| <= TOL_BOX,
the same best label for every fp32 top-10 query, and every fp32 top-10 pair kept in bf16's
top-10 unless it was within TOL_SCORE of the 10th score (a swap among near-ties; column
"hard out" counts the others). The lead decides bf16_ok per family.

    PYTHONPATH=$PWD .venv/bin/python scripts/hf_bf16_check.py             # published sizes
    PYTHONPATH=$PWD .venv/bin/python scripts/hf_bf16_check.py --small     # the test configs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import cpu_name  # noqa: E402  (scripts/bench.py, next to this file)
from detection.models.contract import PostprocessRule  # noqa: E402
from detection.models.hf.capture_dense import DenseCapture  # noqa: E402
from detection.models.hf.families import FAMILIES  # noqa: E402
from detection.postprocess import postprocess  # noqa: E402
from detection.runtime.device import autocast, cpu_supports_bf16  # noqa: E402
import hf_dense_models  # noqa: E402  (tests/)
import hf_sampled_models  # noqa: E402  (tests/)

# Proposed tolerance, the same for every family: the native DETR's stated bf16 tolerance (README:
# scores within 0.03, boxes within 1 px with float32 heads) with 2 px for boxes, as autocast runs
# the HF heads in bf16 too (bf16 heads move DETR's boxes ~2 px at 1066 px).
TOL_SCORE = 0.03  # probability units
TOL_BOX = 2.0  # input pixels
TOP = 10


def _dense_families(small: bool):
    for family in hf_dense_models.FAMILIES:
        yield family, lambda family=family: hf_dense_models.build(family, full_size=not small), True


def _sampled_families():
    """The deformable builders of tests/hf_sampled_models.py (small configs), livened as the
    equivalence tests use them (`build_lively`)."""
    for family in hf_sampled_models.FAMILIES:
        yield family, lambda family=family: hf_sampled_models.build_lively(family), False


def _run(model, pixels: torch.Tensor, padding: torch.Tensor, dense: bool, bf16: bool):
    kwargs = {"pixel_values": pixels}
    if model.config.model_type != "yolos":
        kwargs["pixel_mask"] = (~padding).long()
    sizes = hf_dense_models.image_sizes(padding)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16" if bf16 else "fp32"):
        if not dense:
            return model(**kwargs), None
        with DenseCapture(model) as capture:
            outputs = model(**kwargs)
        record = capture.record(outputs, input_size=tuple(pixels.shape[-2:]), image_sizes=sizes, padding_mask=padding)
    return outputs, record


def outputs_queries(model) -> int:
    config = model.config
    return int(getattr(config, "num_queries", None) or getattr(config, "num_detection_tokens"))


def _compare(family: str, model, pixels, padding, dense: bool) -> dict:
    family_row = FAMILIES[model.config.model_type]  # the family's post-processing rule
    rule = PostprocessRule(kind=family_row.postprocess, top_k=family_row.top_k or outputs_queries(model))
    runs = [_run(model, pixels, padding, dense, bf16) for bf16 in (False, True)]
    sizes = hf_dense_models.image_sizes(padding)
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    result = {"hard": 0, "kept": 0, "total": 0, "score": 0.0, "box": 0.0, "labels": 0, "attn": None, "top1": 1.0, "top10": 0.0}
    for image in range(pixels.shape[0]):
        detections, probabilities, boxes = [], [], []
        for outputs, _ in runs:
            raw = {"pred_logits": outputs.logits[image:image + 1].float(), "pred_boxes": outputs.pred_boxes[image:image + 1].float()}
            detections.append(postprocess(raw, sizes[image:image + 1], names, score_threshold=-1.0, rule=rule)[0][:TOP])
            probabilities.append(rule.class_probabilities(raw["pred_logits"])[0])
            height, width = sizes[image].tolist()
            cx, cy, w, h = raw["pred_boxes"][0].unbind(-1)
            boxes.append(torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1))
        fp32, bf16 = detections
        pairs32 = set(zip(fp32.query_index.tolist(), fp32.labels.tolist()))
        pairs16 = set(zip(bf16.query_index.tolist(), bf16.labels.tolist()))
        queries = torch.as_tensor(fp32.query_index)
        labels = torch.as_tensor(fp32.labels)
        result["kept"] += len(pairs32 & pairs16)
        tenth = float(fp32.scores[-1])
        result["hard"] += sum(1 for pair, score in zip(zip(fp32.query_index.tolist(), fp32.labels.tolist()),
                                                      fp32.scores.tolist())
                              if pair not in pairs16 and score - tenth > TOL_SCORE)
        result["total"] += len(pairs32)
        result["score"] = max(result["score"], float((probabilities[0][queries, labels] - probabilities[1][queries, labels]).abs().max()))
        result["box"] = max(result["box"], float((boxes[0][queries] - boxes[1][queries]).abs().max()))
        result["labels"] += int((probabilities[0][queries].argmax(-1) == probabilities[1][queries].argmax(-1)).sum())
        if image == 0:
            result["top1"], result["top10"] = float(fp32.scores[0]), float(fp32.scores[-1])
        if dense:
            maps = [record.decoder_cross[-1, image].mean(0)[queries].float() for _, record in runs]
            change = float(((maps[0] - maps[1]).abs().amax(dim=(-2, -1)) / maps[0].amax(dim=(-2, -1))).max())
            result["attn"] = max(result["attn"] or 0.0, change)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the small test configs instead of the published sizes")
    parser.add_argument("--size", nargs=2, type=int, default=None, help="padded batch H W (default 480 640; 128 128 --small)")
    args = parser.parse_args()
    height, width = args.size or ((128, 128) if args.small else (480, 640))
    print(f"CPU: {cpu_name()} (native bf16: {cpu_supports_bf16()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; batch 2: {height}x{width} and {height * 3 // 4}x{width * 5 // 8}, padded")
    pixels, padding = hf_dense_models.batch(((height, width), (height * 3 // 4, width * 5 // 8)))
    print(f"{'family':<28} {'top-10 kept':>11} {'|d score|':>9} {'|d box| px':>10} {'labels':>7} {'|d attn|':>8} "
          f"{'fp32 top1/top10':>15} {'hard out':>8} {'tol':>9}  verdict")
    families = list(_dense_families(args.small)) + list(_sampled_families())
    for family, build, dense in families:
        torch.manual_seed(0)
        result = _compare(family, build(), pixels, padding, dense)
        ok = (result["score"] <= TOL_SCORE and result["box"] <= TOL_BOX and result["hard"] == 0
              and result["labels"] == result["total"])
        attn = "-" if result["attn"] is None else f"{result['attn']:.3f}"
        print(f"{family:<28} {result['kept']:>5}/{result['total']:<5} {result['score']:9.4f} {result['box']:10.2f} "
              f"{result['labels']:>3}/{result['total']:<3} {attn:>8} {result['top1']:7.3f}/{result['top10']:<7.3f} "
              f"{result['hard']:>8} {TOL_SCORE:.2f}/{TOL_BOX:.0f}px  {'bf16 ok' if ok else 'NOT ok'}", flush=True)


if __name__ == "__main__":
    main()
