"""Gradients reusing the inference pass (issue #23 item 6): the native DETR's gradient methods take
the backbone-stage output of the inference pass (`AttentionRecord.transformer_inputs`), record a
graph over the transformer and heads only, never run the backbone again and never copy the model;
their maps equal those of the images path (whose values test_gradient_maps checks against
autograd, finite differences and Chefer et al.'s rules)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from detection.attention.gradients import attn_grad_maps, relevance_maps
from detection.attention.methods import Targets
from detection.data.preprocess import image_to_input, pad_batch
from detection.engine.explain import build_methods
from detection.engine.fast import PreparedModels
from detection.engine.predictor import Predictor, PredictorSettings
from detection.models.registry import build_model

QUERIES = [0, 3, 7]
LABELS = [1, 2, 0]
# the same relative tolerance as the maps' reference (fp32); measured: see test messages
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("detr-tiny").eval()


@pytest.fixture(scope="module")
def batch():
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True
    mask[1, :, 96:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


class _Counter:
    """Counts forward calls of a module (a forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_forward_is_encode_then_decode_exactly(model, batch):
    images, mask = batch
    with torch.no_grad():
        whole = model(images, mask, cross_attention=True, keep_features=True)
        parts = model.decode_features(model.encode_features(images, mask), cross_attention=True)
    assert torch.equal(whole["pred_logits"], parts["pred_logits"])
    assert torch.equal(whole["attention"].decoder_cross, parts["attention"].decoder_cross)
    with pytest.raises(ValueError, match="record"):
        model(images, mask, keep_features=True)


@pytest.mark.parametrize("image_index", [0, 1])
def test_features_path_equals_images_path_without_a_backbone_forward(model, batch, image_index):
    images, mask = batch
    with torch.inference_mode():  # as InferenceModel runs: inference tensors in the record
        record = model(images, mask, cross_attention=True, keep_features=True)["attention"]
    features = record.select_image(image_index).transformer_inputs
    single = (images[image_index:image_index + 1], mask[image_index:image_index + 1])
    expected = {"attn-grad": attn_grad_maps(model, *single, 0, QUERIES, LABELS, layers="mean"),
                "relevance": relevance_maps(model, *single, 0, QUERIES, LABELS)}
    counter = _Counter(model.backbone)
    try:
        got = {"attn-grad": attn_grad_maps(model, None, None, 0, QUERIES, LABELS, layers="mean", features=features),
               "relevance": relevance_maps(model, None, None, 0, QUERIES, LABELS, features=features)}
    finally:
        counter.handle.remove()
    assert counter.calls == 0
    assert not any(p.grad is not None for p in model.parameters())
    for name, maps in expected.items():
        # image 1 is padded in the batch: its valid cells are the same, its grid the batch's
        assert got[name].shape == maps.shape
        assert _relative(got[name], maps) <= TOLERANCE, (name, image_index, _relative(got[name], maps))
        print(f"{name} image {image_index}: max |features - images path| / peak = {_relative(got[name], maps):.2e}")


def test_features_are_the_native_detrs(model, batch):
    images, mask = batch
    with torch.no_grad():
        record = model(images, mask, cross_attention=True, keep_features=True)["attention"]
    with pytest.raises(ValueError, match="image_index"):
        attn_grad_maps(model, None, None, 2, QUERIES, LABELS, features=record.transformer_inputs)
    with pytest.raises(ValueError, match="images"):
        attn_grad_maps(model, None, None, 0, QUERIES, LABELS)


def test_run_reuses_the_predictors_copy_and_pass(model, batch, monkeypatch):
    """build_methods + Predictor as predict / eval wire them: the gradient methods differentiate
    the predictor's prepared float32 copy (no copy of their own), take the record's features, and
    run the backbone once per image in all (the predictor's pass); maps equal the images path."""
    images, _ = batch
    rgb = (images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    copies = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copies.append(type(obj)) or real_deepcopy(obj, *a))
    prepared = PreparedModels(model)
    runner = build_methods(model, ["attn-grad", "relevance"], "cpu", prepared=prepared)
    assert runner.needs_features
    predictor = Predictor(model, PredictorSettings(score_threshold=0.0, keep_images=True,
                                                   keep_features=runner.needs_features), prepared)
    engine_model = prepared.get("cpu", "fp32").model
    assert all(method.model is engine_model for method in runner.methods)
    counter = _Counter(engine_model.backbone)
    try:
        detections, record = predictor.predict_arrays([rgb])
        targets = Targets.from_detections(detections[0], range(3))
        cells = runner.image_cell_maps(rgb, tuple(rgb.shape[:2]), record.select_image(0), targets)
    finally:
        counter.handle.remove()
    assert counter.calls == 1  # the inference pass only
    # one copy of the model in all: the prepared one, shared by the predictor and both methods
    assert [kind for kind in copies if issubclass(kind, torch.nn.Module)] == [type(model)]
    assert record.transformer_inputs is not None
    model_input, pad = pad_batch([image_to_input(rgb, model.preprocess_spec)], model.preprocess_spec.size_divisibility)
    queries, labels = targets.query_index, targets.labels
    reference = {"attn-grad/last": attn_grad_maps(model, model_input, pad, 0, queries, labels),
                 "relevance": relevance_maps(model, model_input, pad, 0, queries, labels)}
    for name, expected in reference.items():
        error = _relative(cells[name].values, expected)
        assert error <= TOLERANCE, (name, error)
        print(f"{name}: max |run - images path| / peak = {error:.2e}")


def test_rules_batched_over_detections_equal_one_at_a_time():
    """relevance applies Chefer et al.'s rules to every detection's Ā at once (batched products):
    the same values as the rules applied per detection."""
    from detection.attention.aggregate import decoder_rollout, self_relevance

    generator = torch.Generator().manual_seed(3)
    encoder = torch.rand(4, 2, 6, 6, generator=generator)  # (N detections, L_enc, K, K)
    cross = torch.rand(4, 3, 5, 6, generator=generator)  # (N, L_dec, Q, K)
    decoder_self = torch.rand(4, 3, 5, 5, generator=generator)
    batched = decoder_rollout(cross, decoder_self, self_relevance(encoder))
    for n in range(4):
        single = decoder_rollout(cross[n], decoder_self[n], self_relevance(encoder[n]))
        assert torch.allclose(batched[n], single, rtol=1e-6, atol=0)
    assert torch.allclose(decoder_rollout(cross)[1], decoder_rollout(cross[1]), rtol=1e-6, atol=0)


def test_a_bf16_pass_s_features_are_not_reused(model, batch):
    """The gradient maps stay the float32 maps after a bf16 inference pass: its features are
    neither kept by the predictor nor taken by the methods (the backbone runs again in fp32)."""
    images, _ = batch
    rgb = (images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    prepared = PreparedModels(model)
    runner = build_methods(model, ["attn-grad"], "cpu", prepared=prepared)
    predictor = Predictor(model, PredictorSettings(precision="bf16", score_threshold=0.0, keep_images=True,
                                                   cross_attention=True, keep_features=True), prepared)
    detections, record = predictor.predict_arrays([rgb])
    assert record.transformer_inputs is None
    with torch.no_grad():
        low = model(images[:1], None, cross_attention=True, keep_features=True)["attention"]
    inputs = low.transformer_inputs
    low = dataclasses.replace(low, transformer_inputs=dataclasses.replace(inputs, features=inputs.features.bfloat16()))
    targets = Targets.from_detections(detections[0], range(2))
    engine_model = prepared.get("cpu", "fp32").model
    counter = _Counter(engine_model.backbone)
    try:
        cells = runner.image_cell_maps(rgb, tuple(rgb.shape[:2]), low, targets)
    finally:
        counter.handle.remove()
    assert counter.calls == 1  # the backbone ran again, in float32
    model_input, pad = pad_batch([image_to_input(rgb, model.preprocess_spec)], model.preprocess_spec.size_divisibility)
    expected = attn_grad_maps(model, model_input, pad, 0, targets.query_index, targets.labels)
    assert _relative(cells["attn-grad/last"].values, expected) <= TOLERANCE


def test_demo_model_maps_through_the_run_equal_todays():
    """The shipped demo model, as predict / eval run it (fp32): the gradient maps from the reused
    features on the prepared copy equal the images path on the model itself within 1e-5 of the peak."""
    from detection.data.images import load_image
    from detection.models.registry import load_model

    demo = load_model("demo").eval()
    rgb = load_image("demo/images/shapes_1.png").rgb
    prepared = PreparedModels(demo)
    runner = build_methods(demo, ["attn-grad", "relevance"], "cpu", prepared=prepared)
    predictor = Predictor(demo, PredictorSettings(score_threshold=0.0, keep_images=True, keep_features=True), prepared)
    detections, record = predictor.predict_arrays([rgb])
    targets = Targets.from_detections(detections[0], torch.argsort(detections[0].scores, descending=True)[:5].tolist())
    cells = runner.image_cell_maps(rgb, tuple(rgb.shape[:2]), record.select_image(0), targets)
    spec = demo.preprocess_spec
    model_input, pad = pad_batch([image_to_input(rgb, spec)], spec.size_divisibility)
    reference = {"attn-grad/last": attn_grad_maps(demo, model_input, pad, 0, targets.query_index, targets.labels),
                 "relevance": relevance_maps(demo, model_input, pad, 0, targets.query_index, targets.labels)}
    for name, expected in reference.items():
        error = _relative(cells[name].values, expected)
        assert error <= TOLERANCE, (name, error)
        print(f"demo {name}: max |run - images path| / peak = {error:.2e}")
