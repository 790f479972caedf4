"""`detr-attn eval --explain` (issue #13): one metrics.json `attention` entry per method and choice,
today's entries unchanged, the scored masks are the methods' own maps, refusals are usage errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from detection.attention.drise_saliency import DriseOptions
from detection.attention.gradients import relevance_maps
from detection.attention.maps import cells_to_image
from detection.attention.metrics import encode_mask, explanation_mask
from detection.cli import main
from detection.data.ground_truth import load_coco_gt
from detection.data.images import load_image
from detection.data.preprocess import image_to_input, pad_batch
from detection.engine.predictor import Predictor, PredictorSettings
from detection.evaluation.classes import map_classes
from detection.engine.explain import method_names
from detection.evaluation.model_run import ModelRunOptions, run_model
from detection.evaluation.subsets import SubsetSpec, select_subset
from detection.models.registry import load_model
from test_evaluate_model import confident_model_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return confident_model_setup(tmp_path_factory.mktemp("evalexplain"))


def _eval(root, ann, out, *extra) -> tuple[int, dict]:
    code = main(["eval", "--no-progress", "--model", str(root / "model"), "--ann", str(ann), "--images",
                 str(root / "images"), "--out", str(out), "--attention-threshold", "0.3", "--first", "3", *extra])
    return code, (json.loads((out / "metrics.json").read_text()) if code == 0 else {})


def test_explain_gives_one_entry_per_method_and_choice_beside_todays(setup, tmp_path):
    root, ann = setup
    code, legacy = _eval(root, ann, tmp_path / "legacy")
    assert code == 0
    code, metrics = _eval(root, ann, tmp_path / "all", "--explain", "raw,rollout,attn-grad,relevance,drise",
                          "--drise-masks", "8", "--drise-grid", "4")
    assert code == 0
    assert list(metrics["attention"]) == ["last/mean", "last/max", "mean/mean", "mean/max", "rollout/mean",
                                          "rollout/max", "attn-grad/last", "relevance", "drise", "gaussian-baseline"]
    # today's entries (no --explain) are the same choices with the same values
    assert list(legacy["attention"]) == ["last/mean", "last/max", "mean/mean", "mean/max", "rollout/mean",
                                         "rollout/max", "gaussian-baseline"]
    for choice, row in legacy["attention"].items():
        assert metrics["attention"][choice] == row
    assert "explain" not in legacy["settings"]
    assert metrics["settings"]["explain"] == ["raw", "rollout", "attn-grad", "relevance", "drise"]
    assert metrics["settings"]["drise"]["num_masks"] == 8 and metrics["settings"]["drise"]["precision"] == "fp32"
    timing = metrics["timing"]
    assert set(timing["explain_s_per_explained_image"]) == {"raw", "rollout", "attn-grad", "relevance", "drise"}
    assert timing["explained_images"] > 0 and timing["inference_s_per_image"] > 0
    for choice in ("attn-grad/last", "relevance", "drise"):
        row = metrics["attention"][choice]
        assert row["num_matched"] > 0 and 0.0 <= row["pointing_game"] <= 1.0 and -1.0 <= row["mask_ap"] <= 1.0
    markdown = (tmp_path / "all" / "metrics.md").read_text()
    assert "| relevance |" in markdown and "| drise |" in markdown


def test_scored_relevance_masks_are_the_relevance_maps_of_the_detections(setup):
    root, ann = setup
    gt = load_coco_gt(ann)
    subset = select_subset(gt, SubsetSpec(first=1))
    model = load_model(root / "model")
    mapping, _ = map_classes(model.config.class_names, gt["categories"], subset.category_ids)
    options = ModelRunOptions(attention_threshold=0.3, explain=["relevance"], progress=False)
    _, state, _, _ = run_model(model, gt, subset, root / "images", mapping, options)
    assert list(state["pointing"]) == ["relevance", "gaussian-baseline"]
    # the same detections, explained directly with the library function
    info = gt["images"][0]
    rgb = load_image(root / "images" / info["file_name"]).rgb
    det = next(Predictor(model, PredictorSettings(score_threshold=0.0)).run([str(root / "images" / info["file_name"])])).detections
    keep = [k for k in range(len(det)) if det.scores[k] >= 0.3 and int(det.labels[k]) in mapping]
    images, mask = pad_batch([image_to_input(rgb, model.preprocess_spec)])
    cells = relevance_maps(model.eval(), images, mask, 0, det.query_index[keep], det.labels[keep])
    maps = cells_to_image(cells, model.feature_stride, tuple(images.shape[-2:]), rgb.shape[:2])
    scored = [m["segmentation"] for m in state["masks"]["relevance"]]
    assert len(scored) == len(keep) > 0
    assert scored == [encode_mask(explanation_mask(m)) for m in maps]
    assert state["explained_images"] == 1 and state["explain_seconds"]["relevance"] > 0


def test_method_names_keep_the_pre_13_default():
    assert method_names(None, ["last", "mean", "rollout"]) == ["raw", "rollout"]
    assert method_names(None, ["last"]) == ["raw"]
    assert method_names(["drise", "raw"], ["last", "rollout"]) == ["drise", "raw"]
    with pytest.raises(ValueError, match="gradcam"):
        method_names(["gradcam"], ["last"])
    assert DriseOptions().num_masks == 1000


def test_unknown_method_is_a_usage_error(setup, tmp_path, capsys):
    root, ann = setup
    code, _ = _eval(root, ann, tmp_path / "bad", "--explain", "raw,gradcam")
    assert code == 2
    assert "gradcam" in capsys.readouterr().err
