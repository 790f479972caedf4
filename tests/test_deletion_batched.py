"""Batched deletion / insertion (`perturbation_curves`, eval's path) equals the step-by-step path
(`perturbation_curve`, one detection and one map at a time) on a toy scorer and on a model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.attention.perturbation import CurveRequest, perturbation_curve, perturbation_curves
from detection.data.images import load_image
from detection.data.preprocess import image_to_input, pad_batch
from detection.evaluation.model_run import detection_score_fn, detection_scores_fn
from detection.models.registry import load_model
from detection.postprocess import postprocess
from tests.test_evaluate_model import confident_model_setup


def test_batched_curves_equal_step_by_step_on_a_toy_scorer():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    regions = [(slice(0, 6), slice(0, 5)), (slice(4, 12), slice(3, 10))]
    calls = []

    def scores_fn(batch):  # (K, T): the mean brightness of each detection's region
        calls.append(len(batch))
        return np.stack([batch[:, r, c].astype(np.float64).mean(axis=(1, 2, 3)) for r, c in regions], axis=1)

    flat = np.ones((12, 10))
    two_level = np.zeros((12, 10))
    two_level[2:7, 1:6] = 1
    maps = {"noise": rng.random((12, 10)), "flat": flat, "two-level": two_level, "copy": two_level * 3}
    requests = [CurveRequest((name, t, mode), saliency, mode, t)
                for t in range(2) for name, saliency in maps.items() for mode in ("deletion", "insertion")]
    for substrate in ("mean", "blur"):
        calls.clear()
        curves = perturbation_curves(image, requests, scores_fn, steps=5, substrate=substrate, batch_size=7, tie_seed=4)
        batched_images = sum(calls)
        for request in requests:
            one = perturbation_curve(image, request.saliency, lambda b, t=request.target: scores_fn(b)[:, t],
                                     request.mode, steps=5, substrate=substrate, batch_size=3, tie_seed=4)
            np.testing.assert_array_equal(curves[request.key].scores, one.scores)
            assert curves[request.key].auc == one.auc
        # a map and its multiple, both ends of every curve and both targets share their images:
        # at most 2 ends + 4 inner steps x 3 distinct orders x 2 modes, against 16 curves x 6 steps
        assert batched_images <= 2 + 4 * 3 * 2
    with pytest.raises(ValueError, match="mode"):
        perturbation_curves(image, [CurveRequest("x", flat, "sideways", 0)], scores_fn)


@pytest.fixture(scope="module")
def model_setup(tmp_path_factory):
    root, _ = confident_model_setup(tmp_path_factory.mktemp("batched"))
    model = load_model(root / "model")
    loaded = load_image(root / "images" / "000.png")
    images, mask = pad_batch([image_to_input(loaded.rgb, model.config.min_size, model.config.max_size)])
    with torch.no_grad():
        det = postprocess(model(images, mask), [loaded.original_size], model.config.class_names, 0.0)[0]
    return model, loaded.rgb, det


def test_batched_curves_equal_step_by_step_on_a_model(model_setup):
    model, rgb, det = model_setup
    engine = lambda im, m: model(im, m)  # noqa: E731
    boxes, labels = det.boxes[:2].numpy().astype(np.float64), [int(v) for v in det.labels[:2]]
    rng = np.random.default_rng(1)
    height, width = rgb.shape[:2]
    maps = {"noise": rng.random((2, height, width)), "flat": np.ones((2, height, width))}
    requests = [CurveRequest((name, j, mode), maps[name][j], mode, j)
                for j in range(2) for name in maps for mode in ("deletion", "insertion")]
    curves = perturbation_curves(rgb, requests, detection_scores_fn(engine, model, boxes, labels), steps=4,
                                 batch_size=16, tie_seed=2)
    for (name, j, mode), curve in curves.items():
        one = perturbation_curve(rgb, maps[name][j], detection_score_fn(engine, model, boxes[j], labels[j]), mode,
                                 steps=4, batch_size=2, tie_seed=2)
        np.testing.assert_allclose(curve.scores, one.scores, rtol=1e-5, atol=1e-6)
        assert curve.auc == pytest.approx(one.auc, rel=1e-5, abs=1e-6)
