"""Deprecated home of the evaluation names (one release): the library is `detection.evaluation`,
the command line `detection.cli.eval`; `evaluate` is now `write_evaluation`."""
from __future__ import annotations

import warnings

from detection.deprecation import forward_moved_names
from detection.runtime.distributed import init_distributed

_MOVED = {
    "EvaluationError": "results", "validate_results": "results", "load_results": "results",
    "image_ids_from_file_names": "results", "restrict_results": "results",
    "BBOX_STAT_NAMES": "bbox", "BboxEvaluation": "bbox", "evaluate_bbox": "bbox", "per_category_table": "bbox",
    "ClassMappingError": "classes", "normalise_name": "classes", "load_class_map": "classes",
    "map_classes": "classes",
    "DEFAULT_LAYERS": "model_run", "DEFAULT_HEADS": "model_run", "ModelRunOptions": "model_run",
    "choice_name": "model_run", "detection_score_fn": "model_run", "run_model": "model_run",
    "write_pr_curves": "writer", "metrics_markdown": "writer",
}
__getattr__ = forward_moved_names(__name__, {
    **{name: f"detection.evaluation.{module}:{name}" for name, module in _MOVED.items()},
    "evaluate": "detection.evaluation.writer:write_evaluation",
    "coco_from_dataset": "detection.data.ground_truth:coco_from_dataset",
    "add_arguments": "detection.cli.eval:add_arguments",
    "run": "detection.cli.eval:run",
})


def distributed_context() -> tuple[int, int, int]:
    """Deprecated: use `detection.runtime.distributed.init_distributed()` (a DistContext)."""
    warnings.warn("detection.engine.evaluate.distributed_context is deprecated; use "
                  "detection.runtime.distributed.init_distributed", DeprecationWarning, stacklevel=2)
    context = init_distributed()
    return context.rank, context.world_size, context.local_rank
