"""The explanation-method table of the README (issue #13), on the demo model's held-out synthetic set.

    PYTHONPATH=. .venv/bin/python scripts/explain_table.py [--data data/demo] [--model demo] [--out runs]
        [--drise-first 50 --drise-masks 500 --drise-grid 8] [--reuse]

Runs two `detr-attn eval`s (one-off, not CI; the data set comes from the `detr-attn synth`
commands in weights/demo/TRAINING.md): every image with raw, rollout, attn-grad and relevance
(OUT/explain_full), and the first --drise-first images with every method including D-RISE
(OUT/explain_drise<K>: D-RISE costs N forward passes per image). --reuse reads existing
metrics.json files instead. Prints one markdown table per run and the issue's two targets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.cli import main as cli_main  # noqa: E402
from detection.evaluation.writer import format_metric  # noqa: E402

METHOD_OF = {"attn-grad": "attn-grad", "relevance": "relevance", "drise": "drise", "rollout": "rollout"}


def run_eval(args: argparse.Namespace, out: Path, extra: list[str]) -> dict[str, Any]:
    metrics = out / "metrics.json"
    if not (args.reuse and metrics.exists()):
        code = cli_main(["eval", "--model", args.model, "--ann", str(args.data / "annotations" / "instances_val.json"),
                         "--images", str(args.data / "val"), "--out", str(out), "--precision", "fp32",
                         "--no-progress", *extra])
        if code != 0:
            raise SystemExit(f"eval into {out} failed with exit status {code}")
    return json.loads(metrics.read_text())


def method_of(choice: str) -> str:
    head = choice.split("/")[0]
    return METHOD_OF.get(head, "raw" if choice != "gaussian-baseline" else "")


def table(metrics: dict[str, Any], title: str) -> str:
    timing = metrics.get("timing", {})
    per_method = timing.get("explain_s_per_explained_image", {})
    attention = metrics["attention"]
    first = next(iter(attention.values()))
    lines = [f"{title}: {first['num_matched']} of {first['num_detections']} explained detections matched; "
             f"inference pass {timing.get('inference_s_per_image', float('nan')):.3f} s/img", "",
             "| map | pointing game | energy pointing game | mask AP (0.2:0.95) | mask AP (0.5:0.95) | method s/img |",
             "|---|---|---|---|---|---|"]
    for choice, row in attention.items():
        seconds = per_method.get(method_of(choice))
        lines.append(f"| {choice} | {format_metric(row['pointing_game'])} | {format_metric(row['energy_pointing_game'])} | "
                     f"{format_metric(row['mask_ap'])} | {format_metric(row['mask_ap_standard'])} | "
                     f"{'' if seconds is None else f'{seconds:.3f}'} |")
    return "\n".join(lines)


def verdicts(metrics: dict[str, Any], title: str) -> list[str]:
    attention = metrics["attention"]
    baseline = attention["gaussian-baseline"]
    out = []
    if "relevance" in attention and "last/mean" in attention:
        relevance, raw = attention["relevance"]["mask_ap"], attention["last/mean"]["mask_ap"]
        out.append(f"{title}: relevance >= raw last/mean on Otsu mask AP (0.2:0.95): "
                   f"{'met' if relevance >= raw else 'NOT met'} ({relevance:.3f} vs {raw:.3f})")
    beating = [f"{choice} ({key} {row[key]:.3f} > {baseline[key]:.3f})"
               for choice, row in attention.items() if choice != "gaussian-baseline"
               for key in ("energy_pointing_game", "mask_ap") if row[key] is not None and row[key] > baseline[key]]
    out.append(f"{title}: a method beats the Gaussian baseline on energy pointing game or mask AP: "
               + ("met: " + ", ".join(beating) if beating else
                  f"NOT met (baseline energy {baseline['energy_pointing_game']:.3f}, mask AP {baseline['mask_ap']:.3f})"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--drise-first", type=int, default=50)
    parser.add_argument("--drise-masks", type=int, default=500)
    parser.add_argument("--drise-grid", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="read existing metrics.json files instead of running eval")
    args = parser.parse_args(argv)
    full = run_eval(args, args.out / "explain_full", ["--explain", "raw,rollout,attn-grad,relevance"])
    subset = run_eval(args, args.out / f"explain_drise{args.drise_first}",
                      ["--first", str(args.drise_first), "--explain", "raw,rollout,attn-grad,relevance,drise",
                       "--drise-masks", str(args.drise_masks), "--drise-grid", str(args.drise_grid)])
    subset_title = (f"first {args.drise_first} images, D-RISE N = {args.drise_masks}, grid {args.drise_grid}, p 0.5, seed 0")
    print(table(full, "all images"))
    print()
    print(table(subset, subset_title))
    print()
    for line in verdicts(full, "all images") + verdicts(subset, f"first {args.drise_first} images"):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
