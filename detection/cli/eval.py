"""`detr-attn eval`: COCO(-subset) evaluation of a model or of any detector's results file.

Box AP is pycocotools' COCOeval on the results file the run writes (identical numbers to
running pycocotools yourself on that file with the same imgIds/catIds). With a model, the
attention maps of matched detections are scored for faithfulness (detection.attention.metrics)
per aggregation choice, against a Gaussian-in-the-box baseline.

Run folder written (RUN_DIR):
    detections.json   COCO results ({"image_id", "category_id", "bbox" xywh px, "score"}) that were scored
    metrics.json      {"bbox": 12 stats, "per_category": [...], "attention": {choice: {...}}, ...}
    metrics.md        the same as markdown tables
    pr_curve.png      precision-recall at IoU .50 / .75 / .50:.95 (mean over categories)
    pr_per_category.png   one curve per category at IoU .50
    errors.jsonl      images that could not be processed (model path only)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from detection.cli.vocabulary import MODEL_HELP, add_quiet, add_workers, examples
from detection.attention.methods import AttentionRollout
from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.attention.floors import BEST_BOX_ONLY, BOX_FAMILY, parse_floors
from detection.attention.methods.in_box import DEFAULT_POWER as IN_BOX_POWER
from detection.cli.drise_options import add_drise_arguments, drise_options
from detection.cli.prompt_options import add_prompt_arguments, prompt_from_args
from detection.attention.methods import METHODS, MethodNotApplicable, applicable_methods, parse_methods
from detection.data.ground_truth import GroundTruthError, load_coco_gt
from detection.evaluation.classes import load_class_map, map_classes
from detection.evaluation.mask_export import scored_mask_results
from detection.evaluation.model_run import (DEFAULT_HEADS, DEFAULT_LAYERS, ModelEvaluationRun, ModelRunOptions,
                                            run_model_on_ranks)
from detection.evaluation.prompt_runs import merge_prompt_runs
from detection.evaluation.results import EvaluationError, results_for_subset
from detection.evaluation.subsets import Subset, SubsetSpec, select_subset
from detection.evaluation.writer import format_metric, write_evaluation
from detection.io import write_json_atomic
from detection.models.registry import is_prompted_model, load_model
from detection.runtime.distributed import DistContext, init_distributed


EXAMPLES = examples(
    'detr-attn eval --model demo --ann data/val.json --images data/val --out runs/eval',
    'detr-attn eval --model detr-r50 --ann instances_val2017.json --images val2017 --random 500 --out runs/coco500',
    'detr-attn eval --detections results.json --ann data/val.json --images data/val --out runs/scored',
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=MODEL_HELP)
    add_prompt_arguments(parser)
    source.add_argument("--detections", help="score an existing COCO results JSON (any detector) instead of running a model")
    parser.add_argument("--match-file-names", action="store_true",
                        help="with --detections: take image ids from each result's file_name (e.g. detr-attn predict output)")
    parser.add_argument("--ann", required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument("--images", help="image folder (file_name in the annotations is relative to it); needed with --model")
    parser.add_argument("--out", required=True, help="run folder for detections.json, metrics.json, metrics.md, PR curves")
    subset = parser.add_argument_group("subset")
    pick = subset.add_mutually_exclusive_group()
    pick.add_argument("--first", type=int, help="the first N images (annotation-file order)")
    pick.add_argument("--random", type=int, help="N random images (see --seed)")
    subset.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    subset.add_argument("--image-ids", help="file with image ids (JSON list or whitespace/comma separated)")
    subset.add_argument("--categories", nargs="+", help="evaluate only these category names (quote names with spaces)")
    subset.add_argument("--min-objects", type=int, default=0, help="only images with at least K objects of the evaluated categories")
    mapping = parser.add_argument_group("class mapping (--model)")
    mapping.add_argument("--class-map", help='JSON {"model class": "dataset category name" | id | null}')
    mapping.add_argument("--allow-unmapped", action="store_true", help="score dataset categories without a model class as missed instead of failing")
    model = parser.add_argument_group("inference (--model)")
    model.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1")
    model.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                       help="auto = bf16 where the hardware runs it natively (CUDA, CPU with AMX/AVX512-BF16)")
    model.add_argument("--batch-size", type=int, default=2)
    add_workers(model, 0)
    model.add_argument("--score-threshold", type=float, default=0.0, help="keep detections above this score for AP (default 0: all queries, as DETR's COCO eval)")
    attention = parser.add_argument_group("attention faithfulness (--model)")
    attention.add_argument("--no-attention", action="store_true", help="skip the attention metrics")
    attention.add_argument("--attention-threshold", type=float, default=0.5, help="explain detections with score >= this (default 0.5)")
    attention.add_argument("--layers", help=f"comma list of layer choices: last, mean, rollout, or an index (default "
                           f"{','.join(DEFAULT_LAYERS)}; rollout left out for families whose cross-attention is "
                           "sampled points)")
    attention.add_argument("--heads", default=",".join(DEFAULT_HEADS), help="comma list of head choices: mean, max, or an index")
    attention.add_argument("--explain", metavar="METHODS",
                           help=f"comma list of explanation methods: {', '.join(METHODS)} (default: raw for the "
                                "--layers choices, plus rollout when listed there); metrics.json `attention` gets one "
                                "entry per method and choice, e.g. last/mean, attn-grad/last, relevance, drise")
    attention.add_argument("--attn-grad-layers", default="last", help="comma list of attn-grad layer choices: last, mean, or an index")
    attention.add_argument("--in-box-power", type=float, default=None,
                           help=f"in-box maps: the contrast exponent (default {IN_BOX_POWER}, chosen on the "
                                "hard-shapes selection split; docs/methods.md)")
    add_drise_arguments(attention, "--precision")
    attention.add_argument("--gaussian-sigma", type=float, default=0.25, help="baseline Gaussian sigma as a fraction of box width/height")
    attention.add_argument("--floors", default="gaussian",
                           help="maps scored like the methods (docs/methods.md): comma list of gaussian, uniform, "
                                "random, best-box-only, ceiling (the GT mask on the model's cell grid), box-family "
                                "(every box-only map, to choose --best-box-only on a selection split), or all")
    attention.add_argument("--best-box-only", metavar="NAME", choices=sorted(BOX_FAMILY),
                           help="the box-only map frozen as the best-box-only floor (chosen on the selection split)")
    attention.add_argument("--class-agnostic-maps", action="store_true",
                           help="match explained detections to GT objects by IoU alone and score each map under the "
                                "matched object's category (a model without the data set's classes, e.g. the demo "
                                "model on --shapes hard)")
    attention.add_argument("--per-category", action="store_true", help="attention metrics per category too (per shape)")
    attention.add_argument("--bootstrap", type=int, default=0, metavar="N",
                           help="95 %% intervals over images from N seeded resamples (pointing, energy, deletion, "
                                "insertion; default 0: none)")
    attention.add_argument("--deletion-insertion", action="store_true", help="also compute deletion/insertion AUCs (slow: steps+1 forward passes per map)")
    attention.add_argument("--di-steps", type=int, default=16)
    attention.add_argument("--di-substrate", choices=("mean", "blur"), default="mean")
    attention.add_argument("--di-max-detections", type=int, default=3, help="per image")
    attention.add_argument("--di-batch-size", type=int, default=32,
                           help="perturbed images per forward; every curve of an image shares them (default 32)")
    attention.add_argument("--export-masks", metavar="FILE",
                           help="also write the explanation masks eval scored (COCO results, RLE "
                                "segmentation, a 'choice' field per entry) to FILE")
    add_quiet(parser)


def _parse_choice_list(text: str) -> list[Any]:
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    context = init_distributed()
    try:
        return _run(args, context)
    finally:
        context.close()


def _run(args: argparse.Namespace, context: DistContext) -> int:
    log = (lambda *a: print(*a, file=sys.stderr)) if context.is_main else (lambda *a: None)
    started = time.perf_counter()
    errors: list[dict[str, str]] = []
    attention_state, choices, extra = None, [], {}
    try:
        gt_dataset = load_coco_gt(args.ann)
        spec = SubsetSpec(
            first=args.first, random=args.random, seed=args.seed, image_ids_file=args.image_ids,
            category_names=args.categories, min_objects=args.min_objects,
        )
        subset = select_subset(gt_dataset, spec, args.ann)
        if args.export_masks and (args.detections or args.no_attention):
            raise EvaluationError("--export-masks needs --model with attention (no --detections, no --no-attention)")
        if args.detections:
            results, source, warnings = results_for_subset(
                args.detections, gt_dataset, subset, args.ann, args.match_file_names)
        else:
            if not args.images:
                raise EvaluationError("--images DIR is required with --model")
            run = _run_model(args, gt_dataset, subset, context)
            if run is None:  # not rank 0: rank 0 writes the run folder
                return 0
            results, attention_state, choices, errors, warnings, extra = (
                run.results, run.attention_state, run.choices, run.errors, run.warnings, run.extra)
            source = {"model": str(args.model)}
    except (GroundTruthError, EvaluationError, MethodNotApplicable) as error:
        print(f"detr-attn eval: error: {error}", file=sys.stderr)
        return 2
    if not context.is_main:
        return 0
    for warning in warnings:
        log(f"warning: {warning}")
    extra.setdefault("timing", {})["total_s"] = round(time.perf_counter() - started, 3)
    metrics = write_evaluation(gt_dataset, subset, results, args.out, args.ann, source, attention_state, choices,
                               warnings, extra, errors, per_category=args.per_category, bootstrap=args.bootstrap)
    log(metrics["pycocotools_summary"])
    if metrics["attention"]:
        log("attention (pointing game / energy / mask AP 0.2:0.95):")
        for choice, row in metrics["attention"].items():
            log(f"  {choice:<18} {format_metric(row['pointing_game'])}  {format_metric(row['energy_pointing_game'])}  "
                f"{format_metric(row['mask_ap'])}")
    log(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'metrics.md'}")
    if args.export_masks:
        write_json_atomic(args.export_masks, scored_mask_results(attention_state, list(metrics["attention"])),
                          indent=None)
        log(f"wrote the scored explanation masks to {args.export_masks}")
    return 0


def _layer_choices(text: str | None, model: Any) -> list[Any]:
    """--layers as given, or the defaults without rollout where the family refuses it."""
    if text is not None:
        return _parse_choice_list(text)
    return [layer for layer in DEFAULT_LAYERS if layer != ROLLOUT_LAYERS or AttentionRollout.name in applicable_methods(model)]


def _run_model(args: argparse.Namespace, gt_dataset: dict[str, Any], subset: Subset,
               context: DistContext) -> ModelEvaluationRun | None:
    """Load the model, map its classes, run every rank's share; the merged run on rank 0."""
    # the Predictor's engine moves (a copy of) the model to the device; the CPU copy stays here
    try:
        prompt = prompt_from_args(args)
        if prompt is None and is_prompted_model(args.model):  # open vocabulary: the subset's category names
            names = {int(c["id"]): str(c["name"]) for c in gt_dataset["categories"]}
            prompt = tuple(names[i] for i in subset.category_ids)
        # a prompt beyond the text encoder's limit runs in chunks that fit (the zero-shot protocol)
        model = load_model(args.model, device="cpu", prompt=None if prompt is None else prompt[:1])
        chunks = [None] if prompt is None else model.prompt_chunks(prompt)
        models = [model] if prompt is None else [model.with_prompt(chunk) for chunk in chunks]
    except ValueError as error:  # a bad prompt, or a prompt for a closed-set model
        raise EvaluationError(f"--model {args.model}: {error}") from error
    if len(models) > 1 and not args.no_attention:
        raise EvaluationError(f"--model {args.model}: the category names need {len(models)} prompts (the text encoder's "
                              "limit); the attention metrics of several prompts are not merged yet: add --no-attention")
    class_map = load_class_map(args.class_map) if args.class_map else None
    # the classes of all prompts together map to the categories; each prompt takes its share
    label_to_category, mapping_warnings = map_classes(
        [name for each in models for name in each.config.class_names], gt_dataset["categories"],
        subset.category_ids, class_map, args.class_map or "--class-map", args.allow_unmapped)
    offsets = [sum(len(each.config.class_names) for each in models[:k]) for k in range(len(models))]
    mappings = [{label: label_to_category[offset + label] for label in range(len(each.config.class_names))
                 if offset + label in label_to_category} for each, offset in zip(models, offsets)]
    try:
        explain = parse_methods(args.explain) if args.explain else None
        drise = drise_options(args)
        floors = parse_floors(args.floors)
        if BEST_BOX_ONLY in floors and not args.best_box_only:
            raise ValueError(f"--floors {args.floors}: the {BEST_BOX_ONLY} floor needs --best-box-only NAME "
                             "(the box-only map that scored best on the selection split: its metrics.md names it)")
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    options = ModelRunOptions(
        device=args.device, precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
        score_threshold=args.score_threshold, attention=not args.no_attention,
        attention_threshold=args.attention_threshold, layers=_layer_choices(args.layers, model),
        heads=_parse_choice_list(args.heads), explain=explain, attn_grad_layers=_parse_choice_list(args.attn_grad_layers),
        drise=drise, drise_precision=args.drise_precision, in_box_power=args.in_box_power,
        gaussian_sigma=args.gaussian_sigma,
        floors=floors, best_box_only=args.best_box_only, class_agnostic_maps=args.class_agnostic_maps,
        deletion_insertion=args.deletion_insertion, di_steps=args.di_steps, di_substrate=args.di_substrate,
        di_max_detections=args.di_max_detections, di_batch_size=args.di_batch_size, progress=not args.quiet and context.is_main,
    )
    runs = [run_model_on_ranks(each, gt_dataset, subset, Path(args.images), mapping, options, context)
            for each, mapping in zip(models, mappings)]
    run = runs[0] if len(runs) == 1 or runs[0] is None else merge_prompt_runs(runs, chunks)
    context.barrier()
    if run is not None:
        run.warnings = mapping_warnings + run.warnings
    return run
