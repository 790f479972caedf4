#!/usr/bin/env python
"""The predict job at photo scale: a folder of 12-MP JPEGs, with and without exports.

Makes (once, in --cache) a seeded folder of photo-like JPEGs (--images of --size: a synthetic
shapes scene upscaled, soft colour blobs, sensor-like noise), then runs `detr-attn predict` on it in a
child process per job -- so the peak RSS of the job's main process is its own (getrusage in the
child; its decoding workers are reported apart) -- for each model:

  * demo: the shipped demo model (score threshold 0.7, as the CLI default);
  * detr-r50: a DETR-R50 with random weights (scripts/bench.py's `build_pair`), its score
    threshold set for --r50-detections detections per image on average (near-equal random
    scores: a job with exports may keep one more or less, its numeric path differs slightly);

each without exports and with `--overlays --save-attention` (default overlay size). Printed per
job: s/img (run.json's wall time, the run itself: model loading and process start excluded),
the export overhead (with / without), MB written per image, npz KB per detection (attention/<key>.npz,
and the viewer's grids apart), peak RSS of the main process and of the largest decoding worker, and
the main process's CPU seconds per image (user + system, all its threads; model loading included,
imports not; decoding workers not). With --repeats N each job runs N times, interleaved, and its
fastest run is reported.
Targets (issue 14): exports <= 1.5x the job without; npz <= 100 KB per detection; main-process
peak RSS <= 1.5 GB.

    .venv/bin/python scripts/bench_job.py            # or: scripts/bench.py --job
    .venv/bin/python scripts/bench_job.py --models demo --images 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

EXPORTS = ["--overlays", "--save-attention"]
# Runs in the child: the job through the CLI, then its own peak RSS (VmHWM of /proc/self/status: the
# main process alone; getrusage's ru_maxrss would also count what the parent held when it forked)
# and the ru_maxrss of its largest waited-for child (a decoding worker), both in KiB.
CHILD = """
import json, resource, sys
import torch, detection.engine.predict_run  # imported before the CPU clock starts
from detection.cli import main
def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
started = cpu_seconds()
status = main(sys.argv[2:])
cpu = cpu_seconds() - started
with open("/proc/self/status") as handle:
    own = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as handle:
    json.dump({"status": status, "maxrss_kib": own, "worker_maxrss_kib": workers, "cpu_seconds": cpu}, handle)
sys.exit(status)
"""


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like (height, width, 3) uint8 RGB image: a synthetic shapes scene (the demo model's
    domain; `detection.data.synthetic`) drawn at 1/8 scale and upscaled smoothly, under soft colour
    blobs and sensor-like noise (so it compresses like a photo, not like flat drawing)."""
    import cv2

    from detection.data.synthetic import SynthConfig, render_image

    rng = np.random.default_rng(seed)
    config = SynthConfig(image_size=max(height, width) // 8, size_jitter=0.0, min_objects=3, max_objects=6,
                         difficulty=0.3)
    scene, _ = render_image(config, rng)
    image = cv2.resize(scene.astype(np.float32) / 255.0, (width, height), interpolation=cv2.INTER_CUBIC)
    small_h, small_w = height // 8, width // 8  # blobs drawn at 1/8 and upscaled: fast, smooth
    blobs = np.zeros((small_h, small_w, 3), np.float32)
    yy, xx = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    for _ in range(12):
        cy, cx = rng.random() * small_h, rng.random() * small_w
        radius = (0.03 + 0.12 * rng.random()) * small_w
        weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        blobs += weight[..., None] * (rng.random(3).astype(np.float32) - 0.5)
    image = image + cv2.resize(blobs, (width, height), interpolation=cv2.INTER_LINEAR) * 0.15
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 0.03
    return np.clip((image + noise) * 255.0, 0, 255).astype(np.uint8)


def make_folder(cache: Path, count: int, height: int, width: int, seed: int) -> Path:
    """The seeded JPEG folder (quality 90), written once: reused when all files exist."""
    import cv2

    folder = cache / f"shapes_{count}x{width}x{height}_seed{seed}"
    names = [folder / f"photo_{i:02d}.jpg" for i in range(count)]
    if all(p.is_file() for p in names):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(names):
        rgb = photo(height, width, seed + i)
        ok, data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError(f"cannot encode {path}")
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data.tobytes())
        tmp.replace(path)
    return folder


def random_r50(folder: Path, images: Path, per_image: int) -> float:
    """Save a random DETR-R50 (bench.py's `build_pair`, our half) in `folder`; return the score
    threshold that gives the folder `per_image` detections per image on average."""
    import torch

    from bench import build_pair
    from detection.engine.predictor import Predictor, PredictorSettings
    from detection.data.sources import expand_sources
    from detection.models.native import save_model

    _, model = build_pair(seed=0)
    save_model(model, folder, source="random weights (scripts/bench_job.py)")
    with torch.no_grad():
        results = list(Predictor(model, PredictorSettings(precision="auto", score_threshold=0.0, num_workers=0))  # as the CLI runs it
                       .run(expand_sources([str(images)])))
    scores = np.sort(np.concatenate([r.detections.scores.numpy() for r in results]))[::-1]
    wanted = per_image * len(results)
    return float((scores[wanted - 1] + scores[wanted]) / 2)


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def run_job(images: Path, out: Path, model: str, threshold: float, extra: list[str], code: Path = ROOT) -> dict:
    """One predict job in a child process: figures from run.json, the files, the child's rusage."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        stats_path = Path(handle.name)
    command = [sys.executable, "-c", CHILD, str(stats_path), "predict", str(images), "--model", model,
               "--out", str(out), "--score-threshold", f"{threshold:.9g}", "--device", "cpu", "--quiet",
               "--overwrite", *extra]
    env = dict(os.environ, PYTHONPATH=str(code) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=str(code))  # cwd: `python -c` puts it first on sys.path
    process_seconds = time.perf_counter() - started
    stats = json.loads(stats_path.read_text())
    stats_path.unlink()
    run = json.loads((out / "run.json").read_text())
    counts = run["counts"]
    npz = sum(p.stat().st_size for p in (out / "attention").glob("*.npz")) if (out / "attention").is_dir() else 0
    return {
        "images": counts["images"], "detections": counts["detections"], "errors": counts["errors"],
        "wall_seconds": run["timing"]["wall_seconds"], "process_seconds": round(process_seconds, 2),
        "model_seconds": run["timing"]["model_seconds_rank0"],
        "bytes_total": folder_bytes(out, "**/*"), "bytes_npz": npz,
        "bytes_grids": folder_bytes(out / "attention" / "grids", "*.npz"),
        "bytes_overlays": folder_bytes(out / "overlays", "**/*"),
        "peak_rss_mb": stats["maxrss_kib"] / 1024, "worker_peak_rss_mb": stats["worker_maxrss_kib"] / 1024,
        "main_cpu_seconds": stats["cpu_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=2, default=(3000, 4000), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "detr-attn-bench-job")
    parser.add_argument("--models", nargs="+", default=["demo", "detr-r50"], choices=["demo", "detr-r50"])
    parser.add_argument("--r50-detections", type=int, default=10)
    parser.add_argument("--extra", default="", help="more predict options for every job (one string)")
    parser.add_argument("--jpg", action="store_true", help="also run the exports job with --format jpg")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="checkout whose `detection` the jobs run (e.g. an older one, to compare)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the jobs this many times, interleaved, and keep each job's fastest run "
                             "(on a loaded machine, less noise in the ratio)")
    args = parser.parse_args(argv)

    from bench import cpu_name

    images = make_folder(args.cache, args.images, args.size[0], args.size[1], args.seed)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); load average at start "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{args.images} JPEGs {args.size[1]}x{args.size[0]} in {images}; code: {args.code}")
    extra = args.extra.split()
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_job_") as scratch:
        scratch_dir = Path(scratch)
        for name in args.models:
            if name == "demo":
                model, threshold = "demo", 0.7
            else:
                model = str(scratch_dir / "detr-r50-random")
                threshold = random_r50(Path(model), images, args.r50_detections)
            jobs = [("plain", []), ("exports", EXPORTS)] + ([("exports-jpg", EXPORTS + ["--format", "jpg"])]
                                                            if args.jpg else [])
            for _ in range(max(1, args.repeats)):
                for label, options in jobs:
                    row = run_job(images, scratch_dir / f"{name}_{label}", model, threshold, options + extra, args.code)
                    best = figures.get(f"{name}/{label}")
                    if best is None or row["wall_seconds"] < best["wall_seconds"]:
                        figures[f"{name}/{label}"] = row
    print(f"load average at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    header = (f"{'job':<18}{'dets':>6}{'s/img':>8}{'overhead':>10}{'MB/img':>9}{'npz KB/det':>12}"
              f"{'grids KB/det':>14}{'overlay MB/img':>16}{'peak RSS MB':>13}{'worker MB':>11}{'main CPU s/img':>16}")
    print(header)
    for key, row in figures.items():
        name, label = key.split("/")
        per_image = row["wall_seconds"] / max(1, row["images"])
        plain = figures.get(f"{name}/plain")
        overhead = row["wall_seconds"] / plain["wall_seconds"] if plain else float("nan")
        dets = max(1, row["detections"])
        print(f"{key:<18}{row['detections']:>6}{per_image:>8.2f}{overhead:>9.2f}x"
              f"{row['bytes_total'] / row['images'] / 1e6:>9.2f}{row['bytes_npz'] / dets / 1e3:>12.1f}"
              f"{row['bytes_grids'] / dets / 1e3:>14.1f}{row['bytes_overlays'] / row['images'] / 1e6:>16.2f}"
              f"{row['peak_rss_mb']:>13.0f}{row['worker_peak_rss_mb']:>11.0f}"
              f"{row['main_cpu_seconds'] / max(1, row['images']):>16.2f}")
        row.update({"s_per_image": per_image, "overhead": overhead})
    print("targets: exports <= 1.5x without; npz <= 100 KB per detection; main-process peak RSS <= 1536 MB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
