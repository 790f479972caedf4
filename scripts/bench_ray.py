#!/usr/bin/env python
"""`predict --engine ray` against the single-host engine on the same machine and cores.

Makes a folder of --images demo images (the shipped four, copied round-robin), then runs
`detr-attn predict FOLDER --model demo --explain attn-grad` in a child process per engine:

  * single-host at its defaults (--batch-size 4, --workers 2, torch's own thread count);
  * single-host at its defaults with OMP_NUM_THREADS = the Ray actor's CPUs (the same model threads);
  * --engine ray with an embedded local Ray (all cores) at predict's defaults (min(4, cores) model
    actors sharing the cores, decoding in the actors), or as --ray-actors / --cpus-per-actor /
    --ray-decode say (tasks: decoding in one-CPU tasks, handed over through the object store).

Printed per engine: s/img of the whole command (process start, imports, model loading and the
probe included) and of the run (run.json's wall time); for Ray also Ray's start-up and each actor's
model loading apart (run.json timing; Ray's run time includes the actors' model loading, not Ray's
start-up), and the ratio ray / single-host (defaults) and ray / single-host (same threads). Target (issue 22): at most
1.25x on one machine. Not a timed test: figures for docs/ray.md, with the CPU printed.

    .venv/bin/python scripts/bench_ray.py --images 5000
    .venv/bin/python scripts/bench_ray.py --images 5000 --ray-only --ray-decode tasks --ray-actors 1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from bench import cpu_name  # noqa: E402  (scripts/bench.py)
from detection.engine.ray_run import RaySettings, resolve_ray_settings  # noqa: E402


def make_folder(folder: Path, count: int) -> None:
    demo = sorted((ROOT / "demo" / "images").glob("*.png"))
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        shutil.copy(demo[index % len(demo)], folder / f"im{index:05d}.png")


def run(folder: Path, out: Path, extra: list[str], threads: int | None = None) -> tuple[float, dict]:
    command = [sys.executable, "-m", "detection.cli", "predict", str(folder), "--model", "demo", "--out", str(out),
               "--explain", "attn-grad", "--quiet", "--overwrite", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads((out / "run.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--cpus-per-actor", type=float, help="default: predict's (the cores shared between the actors)")
    parser.add_argument("--ray-actors", type=int, help="default: predict's (min(4, cores) on the embedded Ray)")
    parser.add_argument("--ray-decode", choices=["auto", "tasks", "actor"], default="auto")
    parser.add_argument("--ray-only", action="store_true", help="skip the two single-host runs (no ratios)")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); load average at start {load[0]:.2f}; "
          f"{args.images} demo images, --explain attn-grad")
    resolved = resolve_ray_settings(RaySettings(actors=args.ray_actors, cpus_per_actor=args.cpus_per_actor,
                                                decode=args.ray_decode), embedded=True)
    threads = max(1, int(resolved.cpus_per_actor))
    ray_args = ["--engine", "ray", "--ray-decode", args.ray_decode]
    ray_args += ["--ray-actors", str(args.ray_actors)] if args.ray_actors else []
    ray_args += ["--cpus-per-actor", str(args.cpus_per_actor)] if args.cpus_per_actor else []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_folder(folder, args.images)
        if not args.ray_only:
            host_total, host_info = run(folder, Path(tmp) / "host", [])
            one_total, one_info = run(folder, Path(tmp) / "one", [], threads=threads)
        ray_total, ray_info = run(folder, Path(tmp) / "ray", ray_args)
    n = args.images
    ray_run = ray_info["timing"]["wall_seconds"]
    used = ray_info["settings"]["ray"]
    print(f"ray ({' '.join(ray_args[2:])}: {used['actors']} actors of {used['cpus_per_actor']:g} CPUs, "
          f"decoding in the {'actors' if used['decode'] == 'actor' else 'tasks'}): "
          f"{ray_total / n:.3f} s/img whole command ({ray_total:.1f} s), "
          f"{ray_run / n:.3f} s/img run ({ray_run:.1f} s); Ray start-up {ray_info['timing']['ray_start_seconds']:.1f} s, "
          f"actor model loading {ray_info['timing']['model_load_seconds_per_actor']} s")
    if not args.ray_only:
        host_run, one_run = host_info["timing"]["wall_seconds"], one_info["timing"]["wall_seconds"]
        print(f"single-host: {host_total / n:.3f} s/img whole command ({host_total:.1f} s), "
              f"{host_run / n:.3f} s/img run ({host_run:.1f} s)")
        print(f"single-host, OMP_NUM_THREADS={threads} (an actor's threads): "
              f"{one_total / n:.3f} s/img whole command ({one_total:.1f} s), {one_run / n:.3f} s/img run ({one_run:.1f} s)")
        print(f"ratio ray / single-host: {ray_total / host_total:.2f}x whole command, {ray_run / host_run:.2f}x run; "
              f"ray / single-host same threads: {ray_total / one_total:.2f}x whole command, "
              f"{ray_run / one_run:.2f}x run")
    print(f"load average at end {os.getloadavg()[0]:.2f} (the machine is shared)")

if __name__ == "__main__":
    main()
