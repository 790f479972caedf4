"""`detr-attn predict`: options, messages and exit statuses around `engine.predict_run.run_predict`.

Exit status: 0 every input processed; 1 some inputs could not be processed (listed in
OUT/errors.jsonl; all others were); 2 usage error, nothing written (bad option, model not
loadable, no inputs, OUT is a file, another live run is writing OUT, OUT holds a run with other
settings); 3 the run stopped before the end: SIGTERM / SIGINT (the images in flight were
finished), disk full, or a crash. Rerun the same command to resume after a 3.
"""
from __future__ import annotations

import argparse
import errno
import sys
import traceback

from detection.cli.vocabulary import MODEL_HELP, add_quiet, add_workers, examples
from detection.attention.aggregate import ROLLOUT_LAYERS
from detection.data.images import DEFAULT_MAX_PIXELS
from detection.attention.methods import METHODS, parse_methods
from detection.cli.drise_options import add_drise_arguments, drise_options
from detection.cli.prompt_options import add_prompt_arguments, prompt_from_args
from detection.cli.ray_options import add_ray_arguments, ray_settings_from_args
from detection.runfolder.grids import DEFAULT_GRID_BUDGET
from detection.engine.predict_methods import ExplainOptions
from detection.engine.image_files import OutputOptions
from detection.render.cell_overlays import DEFAULT_OVERLAY_SIZE
from detection.engine.ray_run import run_predict_ray
from detection.engine.predict_run import PredictInterrupted, PredictSettings, PredictUsageError, run_predict
from detection.runfolder.layout import LOCK_FILE
from detection.runtime.distributed import init_distributed


EXAMPLES = examples(
    'detr-attn predict photos/ --model demo --out runs/photos --overlays --save-attention',
    'detr-attn predict photos/ --model detr-r50 --out runs/r50 --explain raw,attn-grad --overlays',
    'detr-attn predict clip.mp4 --model hf:PekingU/rtdetr_r50vd --video-stride 10 --out runs/clip',
    'detr-attn predict photos/ --model hf:google/owlvit-base-patch32 --prompt "cat. remote control." --out runs/owl',
)

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 3

EPILOG = f"""\
one run per folder: while a run writes OUT it holds OUT/{LOCK_FILE} (its pid and host); a second run
into OUT is refused (exit 2). A lock left by a process that is no longer running is taken over.

stopping: SIGTERM or Ctrl-C (SIGINT) finishes the images in flight, journals them and exits 3;
a second Ctrl-C stops at once. Rerun the same command to resume: the finished folder equals
that of an uninterrupted run.

disk full: the file that did not fit is named, no partial file is left, exit 3; free space and
rerun the same command to resume.

exit status: 0 all inputs processed; 1 some inputs failed (OUT/errors.jsonl); 2 usage error,
nothing written; 3 stopped (signal, disk full, crash): rerun to resume."""


def _head_choice(text: str):
    if text in ("mean", "max"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--heads must be mean, max or a head index, got {text!r}") from None


def _layer_choice(text: str):
    if text in ("last", "mean", ROLLOUT_LAYERS):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be last, mean, rollout or a layer index, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES + "\n\n" + EPILOG
    parser.add_argument("inputs", nargs="*", metavar="IMAGES",
                        help="image files, folders (recursive), glob patterns, @list.txt files, videos")
    parser.add_argument("--list", action="append", default=[], metavar="FILE",
                        help="text file with one path (or folder / glob) per line; repeatable")
    parser.add_argument("--model", default="demo", help=MODEL_HELP)
    add_prompt_arguments(parser)
    parser.add_argument("--out", required=True,
                        help="output run folder (created; rerun to resume; one live run per folder)")
    parser.add_argument("--score-threshold", type=float, default=0.7)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto = bf16 where the hardware supports it natively, else fp32")
    parser.add_argument("--batch-size", type=int, default=4)
    add_workers(parser, 2)
    parser.add_argument("--batching", choices=["exact", "padded"], default="exact",
                        help="exact: only equal input shapes share a batch (results equal to one image at a "
                             "time); padded: group by aspect ratio and pad (faster on varied sizes)")
    parser.add_argument("--overlays", action="store_true", help="write overlays/<key>.raw.png (all detections) and overlays/<key>/det_<k>.<method>.png (one per detection and method)")
    parser.add_argument("--overlay-style", choices=["heatmap", "points"], default="heatmap",
                        help="per-detection overlays: the attention map (heatmap) or, for deformable families, "
                             "the detection's sampling points as dots sized by weight, coloured by level "
                             "(points; implies --overlays)")
    parser.add_argument("--overlay-size", type=_overlay_size, default=DEFAULT_OVERLAY_SIZE, metavar="N|original",
                        help=f"long side of the overlays in pixels (default {DEFAULT_OVERLAY_SIZE}; only ever scales "
                             "down; 'original' keeps the image's size)")
    parser.add_argument("--save-attention", action="store_true",
                        help="write attention/<stem>.npz (per-detection cell maps with their geometry; "
                             "load_maps_npz resamples them) and attention/grids/<stem>.npz (per-detection "
                             "per-layer x per-head grids and the image, for `detr-attn report --viewer`)")
    parser.add_argument("--save-encoder-attention", action="store_true",
                        help="attention/grids/<stem>.npz also keeps the last encoder layer's head-mean self-attention "
                             "(h*w x h*w float16; dense models only); implies --save-attention")
    parser.add_argument("--attention-budget", type=float, default=DEFAULT_GRID_BUDGET / 2**20, metavar="MB",
                        help="most MiB of float16 grids per image (default %(default)g): every layer x head "
                             "when it fits, else last layer's heads + per-layer head means, else per-layer "
                             "head means, else those of the highest-scoring detections that fit")
    parser.add_argument("--heads", type=_head_choice, default="mean", help="mean, max or a head index")
    parser.add_argument("--layers", type=_layer_choice, default="last", help="last, mean, rollout or a layer index")
    parser.add_argument("--normalize", choices=["minmax", "percentile", "none"], default="minmax")
    parser.add_argument("--explain", metavar="METHODS",
                        help=f"comma list of explanation methods: {', '.join(METHODS)} (default: raw, today's maps "
                             "with --layers/--heads). Each method but raw writes attention/<method>/<key>.npz "
                             "(D-RISE on a grid of long side <= 256 cells) and, with --overlays, "
                             "overlays/<key>/<method>/det_<k>.png; raw's files are written as without --explain. "
                             "attn-grad uses --layers (last for rollout), rollout --heads. A method that does not "
                             "apply to the model's family is refused (exit 2)")
    add_drise_arguments(parser, "--precision")
    parser.add_argument("--format", dest="image_format", choices=["png", "jpg"], default="png")
    parser.add_argument("--video-stride", type=int, default=1, help="keep every k-th video frame")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels (decompression bombs); 0 = no limit")
    parser.add_argument("--no-fold-bn", action="store_true", help="keep batch norm layers (debugging)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the CNN body")
    parser.add_argument("--writer-threads", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a previous run in --out (only files predict writes)")
    add_quiet(parser)
    add_ray_arguments(parser)


def _overlay_size(text: str) -> int | None:
    """--overlay-size: a positive pixel count, or "original" (None)."""
    if text == "original":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels or 'original', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels or 'original', got {text!r}")
    return value


def settings_from_args(args: argparse.Namespace) -> PredictSettings:
    """The run's settings from parsed options; ValueError names a bad option."""
    if args.batch_size < 1 or args.workers < 0 or args.video_stride < 1 or args.writer_threads < 1:
        raise ValueError("--batch-size, --video-stride, --writer-threads must be >= 1 and --workers >= 0")
    if not 0.0 <= args.score_threshold < 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1), got {args.score_threshold}")
    if args.attention_budget <= 0:
        raise ValueError(f"--attention-budget must be > 0 MiB, got {args.attention_budget}")
    if not args.inputs and not args.list:
        raise ValueError("no inputs: give image files, folders, globs, @list.txt or --list FILE")
    explain = None
    if args.explain is not None:
        explain = ExplainOptions(methods=tuple(parse_methods(args.explain)), drise=drise_options(args),
                                 drise_precision=args.drise_precision or args.precision)
    return PredictSettings(
        inputs=list(args.inputs), out=args.out, model=args.model, list_files=tuple(args.list),
        score_threshold=args.score_threshold, device=args.device, precision=args.precision,
        batch_size=args.batch_size, workers=args.workers, batching=args.batching,
        outputs=OutputOptions(overlays=args.overlays or args.overlay_style == "points",
                              overlay_style=args.overlay_style, save_attention=args.save_attention or args.save_encoder_attention,
                              image_format=args.image_format, heads=args.heads, layers=args.layers,
                              normalize=None if args.normalize == "none" else args.normalize,
                              save_encoder_attention=args.save_encoder_attention,
                              grid_budget=int(args.attention_budget * 2**20),
                              overlay_size=args.overlay_size),
        video_stride=args.video_stride, max_pixels=args.max_pixels or None,
        fold_bn=not args.no_fold_bn, channels_last=not args.no_channels_last, compile=args.compile,
        writer_threads=args.writer_threads, overwrite=args.overwrite, progress=not args.quiet, explain=explain,
        prompt=prompt_from_args(args))


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        ray_settings = ray_settings_from_args(args)
    except ValueError as err:
        print(f"detr-attn predict: {err}", file=sys.stderr)
        return EXIT_USAGE
    context = None
    try:
        if ray_settings is not None:
            summary = run_predict_ray(settings, ray_settings)
        else:
            context = init_distributed(backend="gloo")
            summary = run_predict(settings, context=context)
    except PredictUsageError as err:
        print(f"detr-attn predict: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (PredictInterrupted, KeyboardInterrupt):
        print("detr-attn predict: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_CRASH
    except Exception as err:  # noqa: BLE001 - report, keep the documented exit status
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:  # no traceback: nothing to debug
            where = f" writing {err.filename}" if err.filename else ""
            print(f"detr-attn predict: no space left on device{where}; free space, then rerun the same command "
                  "to resume", file=sys.stderr)
            return EXIT_CRASH
        traceback.print_exc()
        print("detr-attn predict: the run crashed; rerun the same command to resume", file=sys.stderr)
        return EXIT_CRASH
    finally:
        if context is not None:
            context.close()
    if not summary.is_main:
        return EXIT_OK
    print(f"detr-attn predict: {summary.text()}", file=sys.stderr)
    return EXIT_SOME_FAILED if summary.errors else EXIT_OK
