"""eval of an open-vocabulary detector whose category names do not fit one prompt: the zero-shot
protocol runs one prompt per chunk of names and merges the detections (`merge_prompt_runs`)."""
from __future__ import annotations

from typing import Sequence

from detection.evaluation.model_run import ModelEvaluationRun


def merge_prompt_runs(runs: Sequence[ModelEvaluationRun], chunks: Sequence[Sequence[str]]) -> ModelEvaluationRun:
    """The runs of the prompt chunks as one run: every chunk's detections (each chunk's classes map
    to their own categories, so nothing is counted twice), in the one order of
    `run_model_on_ranks` (image, -score, category); the first run's errors (every chunk reads the
    same images); warnings once each; settings and timing of the first run plus each chunk's
    inference time and the chunks themselves. Boxes only: attention metrics are not merged."""
    if not runs or len(runs) != len(chunks):
        raise ValueError(f"{len(runs)} runs for {len(chunks)} prompt chunks")
    if any(run.attention_state is not None for run in runs) and len(runs) > 1:
        raise ValueError("attention metrics of several prompt chunks are not merged: evaluate with --no-attention")
    results = [result for run in runs for result in run.results]
    results.sort(key=lambda r: (r["image_id"], -r["score"], r["category_id"]))
    warnings = list(dict.fromkeys(warning for run in runs for warning in run.warnings))
    extra = dict(runs[0].extra)
    extra["settings"] = {**extra.get("settings", {}), "prompt_chunks": [list(chunk) for chunk in chunks]}
    extra["timing"] = {**extra.get("timing", {}),
                       "inference_s_per_chunk": [run.extra.get("timing", {}).get("inference_s_per_rank")
                                                 for run in runs]}
    return ModelEvaluationRun(results, runs[0].attention_state if len(runs) == 1 else None, runs[0].choices,
                              list(runs[0].errors), warnings, extra)
