"""Old evaluation names keep working for one release, with a DeprecationWarning."""
from __future__ import annotations

import json

import pytest

from detection.data.ground_truth import load_coco_gt
from detection.evaluation import bbox, classes, model_run, results, subsets, writer


def _ground_truth(tmp_path):
    gt = {"images": [{"id": 1, "width": 100, "height": 80, "file_name": "a.png"}],
          "categories": [{"id": 3, "name": "square"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 30], "area": 1200,
                           "iscrowd": 0}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return gt, path


@pytest.mark.parametrize("old, new", [
    ("map_classes", classes.map_classes), ("evaluate_bbox", bbox.evaluate_bbox),
    ("EvaluationError", results.EvaluationError), ("run_model", model_run.run_model),
    ("ModelRunOptions", model_run.ModelRunOptions), ("BBOX_STAT_NAMES", bbox.BBOX_STAT_NAMES),
    ("metrics_markdown", writer.metrics_markdown), ("evaluate", writer.write_evaluation),
])
def test_engine_evaluate_names_warn_and_forward(old, new):
    from detection.engine import evaluate as old_module

    with pytest.warns(DeprecationWarning, match=f"engine.evaluate.{old} is deprecated"):
        assert getattr(old_module, old) is new


def test_old_evaluate_still_writes_the_run_folder(tmp_path):
    from detection.engine import evaluate as old_module

    gt, ann = _ground_truth(tmp_path)
    subset = subsets.select_subset(gt, subsets.SubsetSpec(), ann)
    detections = [{"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 40.0, 30.0], "score": 0.9}]
    with pytest.warns(DeprecationWarning, match="use detection.evaluation.writer.write_evaluation"):
        evaluate = old_module.evaluate
    metrics = evaluate(gt, subset, detections, tmp_path / "old", ann, {"detections": "x"})
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    new = writer.write_evaluation(gt, subset, detections, tmp_path / "new", ann, {"detections": "x"})
    assert {k: v for k, v in metrics.items() if k != "results_file"} == \
           {k: v for k, v in new.items() if k != "results_file"}


def test_engine_subsets_names_warn_and_forward(tmp_path):
    from detection.engine import subsets as old_module

    gt, ann = _ground_truth(tmp_path)
    with pytest.warns(DeprecationWarning, match="use detection.data.ground_truth.load_coco_gt"):
        assert old_module.load_coco_gt(ann) == load_coco_gt(ann) == gt
    with pytest.warns(DeprecationWarning):
        assert old_module.select_subset is subsets.select_subset


def test_distributed_context_warns_and_reads_a_single_process():
    from detection.engine.evaluate import distributed_context

    with pytest.warns(DeprecationWarning, match="init_distributed"):
        assert distributed_context() == (0, 1, 0)


def test_unknown_names_still_raise_attribute_error():
    from detection.engine import evaluate as old_module

    with pytest.raises(AttributeError, match="no_such_name"):
        old_module.no_such_name
