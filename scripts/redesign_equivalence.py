"""Check that the redesign (issue #11) changed no output: old code vs this tree, same machine, fp32.

Runs, once with the package as of OLD_REV (extracted with `git archive`) and once with this
working tree, each in its own folder with the same relative output paths:
  * `detr-attn predict` over demo/images plus one corrupt file (so errors.jsonl is not empty),
    with --overlays --save-attention --precision fp32;
  * `detr-attn synth` (a small synthetic set) then `detr-attn eval --precision fp32` on it,
    with --deletion-insertion.
Then compares predictions.jsonl, detections.json, errors.jsonl (bytes), every npz array and
its metadata (exact), every overlay PNG (decoded pixels, exact) and metrics.json (exact, less
its "timing" entries). run.json timing and report files are left out, as the issue says.

    .venv/bin/python scripts/redesign_equivalence.py [--old f3e0ff6] [--work /tmp/redesign_eq]

Exit status 0 when everything is equal; 1 with the list of differences otherwise.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PRE_REDESIGN = "f3e0ff6"  # main before issue #11


def extract_revision(rev: str, target: Path) -> None:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")


def run_cli(source: Path, cwd: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(source))
    command = [sys.executable, "-m", "detection.cli", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # predict exits 1 when some inputs failed (the corrupt file)
        raise SystemExit(f"{' '.join(command)} (in {cwd}) exited {done.returncode}:\n{done.stderr[-3000:]}")


def produce(source: Path, folder: Path, images: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    run_cli(source, folder, "predict", str(images), "--model", "demo", "--out", "predict",
            "--precision", "fp32", "--device", "cpu", "--overlays", "--save-attention", "--workers", "0",
            "--quiet")
    run_cli(source, folder, "synth", "--out", "synth", "--train", "0", "--val", "12", "--seed", "3",
            "--image-size", "160", "--no-progress")
    annotations = next((folder / "synth").rglob("*val*.json"))
    image_dir = annotations.parent.parent / "val"
    run_cli(source, folder, "eval", "--model", "demo", "--ann", str(annotations.relative_to(folder)),
            "--images", str(image_dir.relative_to(folder)), "--out", "eval", "--precision", "fp32",
            "--device", "cpu", "--deletion-insertion", "--di-steps", "4", "--di-max-detections", "2",
            "--no-progress")


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k != "timing"}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def compare(old: Path, new: Path) -> tuple[list[str], int]:
    problems: list[str] = []
    checked = 0
    for name in ("predict/predictions.jsonl", "predict/detections.json", "predict/errors.jsonl",
                 "synth/annotations/instances_val.json"):
        a, b = old / name, new / name
        if not a.exists():
            continue
        checked += 1
        if not b.exists() or a.read_bytes() != b.read_bytes():
            problems.append(f"{name}: bytes differ")
    for a in sorted((old / "predict" / "attention").glob("*.npz")):
        b = new / a.relative_to(old)
        checked += 1
        if not b.exists():
            problems.append(f"{b.relative_to(new)} missing")
            continue
        with np.load(a, allow_pickle=False) as za, np.load(b, allow_pickle=False) as zb:
            if sorted(za.files) != sorted(zb.files):
                problems.append(f"{a.name}: keys {sorted(za.files)} vs {sorted(zb.files)}")
                continue
            for key in za.files:
                if za[key].dtype != zb[key].dtype or not np.array_equal(za[key], zb[key]):
                    problems.append(f"{a.name}[{key}] differs")
    overlays = sorted((old / "predict" / "overlays").rglob("*.png"))
    for a in overlays + sorted((old / "synth").rglob("*.png")):
        b = new / a.relative_to(old)
        checked += 1
        if not b.exists() or not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))):
            problems.append(f"{a.relative_to(old)}: pixels differ or missing")
    for name in ("eval/metrics.json", "eval/detections.json"):
        checked += 1
        ma = _without_timing(json.loads((old / name).read_text()))
        mb = _without_timing(json.loads((new / name).read_text()))
        if ma != mb:
            problems.append(f"{name} differs")
    extra = sorted(str(p.relative_to(new)) for p in (new / "predict").rglob("*")
                   if p.is_file() and not (old / p.relative_to(new)).exists())
    if extra:
        problems.append(f"files only in the new run: {extra[:10]}")
    return problems, checked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default=PRE_REDESIGN, help="git revision of the old code")
    parser.add_argument("--work", default="/tmp/redesign_eq", help="scratch folder (replaced)")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    old_source = work / "old_source"
    extract_revision(args.old, old_source)
    images = work / "images"
    shutil.copytree(REPO / "demo" / "images", images)
    (images / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    produce(old_source, work / "old", images)
    produce(REPO, work / "new", images)
    problems, checked = compare(work / "old", work / "new")
    for problem in problems:
        print("DIFFERENT:", problem)
    print(f"{checked} outputs compared, {len(problems)} differences (old {args.old} vs this tree)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
