"""`detr-attn weights list|download|convert|verify`: options, messages and exit statuses around
`models.published` (published checkpoints) and `models.convert` (conversions). Exit status: 0 or 1."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detection.cli.vocabulary import add_quiet, examples
from detection.models.convert import convert_to_native, detect_format, load_foreign
from detection.models.checkpoint_io import CheckpointError, sha256_file
from detection.models.native import read_model_meta
from detection.models.published import (DownloadError, cache_dir, check_hash, download_checkpoint, load_manifest,
                                        published_native_dir)
from detection.models.hf.hub import fetch_hub_folder, is_hub_name
from detection.models.registry import ensure_published_native, load_model


EXAMPLES = examples(
    'detr-attn weights list',
    'detr-attn weights download detr-r50',
    'detr-attn weights convert detr-r50-e632da11.pth --out models/r50',
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    listing = sub.add_parser("list", help="list the published checkpoints of weights/manifest.yaml")
    listing.add_argument("--cache-dir", default=None, help="cache folder to report on")
    download = sub.add_parser("download", help="download, verify and convert a published checkpoint")
    download.add_argument("name", help="checkpoint name (see `list`), or hf:ORG/NAME[@REVISION] for a "
                                       "Hugging Face Hub detector (into huggingface_hub's cache)")
    download.add_argument("--cache-dir", default=None, help="cache folder (default $DETECTION_CACHE "
                                                            "or ~/.cache/detection)")
    add_quiet(download)
    convert = sub.add_parser("convert", help="authors' .pth or HF folder -> native model folder")
    convert.add_argument("src", help="authors' checkpoint file or HF folder (config.json + weights)")
    convert.add_argument("--out", required=True, help="native model folder to write")
    convert.add_argument("--config", default=None,
                         help="model config name or YAML for an authors' checkpoint (e.g. detr-r50-dc5); "
                              "default: sizes read from the weights, DC5 from 'dc5' in the file name")
    verify = sub.add_parser("verify", help="check a checkpoint file or model folder loads cleanly")
    verify.add_argument("path")
    verify.add_argument("--config", default=None, help="config for an authors' checkpoint")


def run(args: argparse.Namespace) -> int:
    try:
        return {"list": _list, "download": _download, "convert": _convert, "verify": _verify}[args.action](args)
    except (CheckpointError, DownloadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _list(args: argparse.Namespace) -> int:
    entries = load_manifest()
    print(f"{'name':<16}{'COCO AP':>8}  {'config':<16}{'cached':<8}url")
    for entry in entries.values():
        cached = "yes" if (published_native_dir(entry.name, args.cache_dir) / "model.json").is_file() else "no"
        ap = f"{entry.coco_val_ap:.1f}" if entry.coco_val_ap is not None else "-"
        print(f"{entry.name:<16}{ap:>8}  {entry.config:<16}{cached:<8}{entry.url}")
    print(f"cache: {cache_dir(args.cache_dir)}")
    return 0


def _download(args: argparse.Namespace) -> int:
    if is_hub_name(args.name):
        folder, source = fetch_hub_folder(args.name, args.cache_dir)
        model = load_model(folder)
        print(f"{source}: {folder} loads ({type(model).__name__}, {len(model.config.class_names)} classes); "
              f"use --model {args.name} or --model {folder}")
        return 0
    checkpoint = download_checkpoint(args.name, args.cache_dir, progress=not args.quiet)
    print(f"checkpoint: {checkpoint} (hash verified)")
    folder = ensure_published_native(args.name, args.cache_dir, progress=not args.quiet)
    print(f"native model: {folder}  (use --model {folder} or --model {args.name})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    folder = convert_to_native(args.src, args.out, config=args.config)
    config, meta = read_model_meta(folder)
    print(f"wrote {folder}: {config.backbone}{' DC5' if config.dilation else ''}, "
          f"{config.num_classes} classes, {config.num_queries} queries; source sha256 {meta.get('source_sha256')}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    kind = detect_format(path)
    if path.is_file():
        digest = sha256_file(path)
        print(f"{path}: sha256 {digest}")
        for entry in load_manifest().values():
            if entry.file_name == path.name:
                check_hash(path, entry)
                print(f"matches manifest entry {entry.name} ({'sha256' if entry.sha256 else 'sha256 prefix'})")
    model = load_foreign(path, args.config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{path}: {kind} checkpoint loads with every key matched: {model.config.backbone}"
          f"{' DC5' if model.config.dilation else ''}, {params / 1e6:.2f}M parameters, "
          f"{model.config.num_classes} classes")
    return 0
