"""DETR implements the Detector contract, and the contract describes what DETR does."""
from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from detection.data.preprocess import image_to_input, pad_batch
from detection.engine import fast
from detection.engine.fast import InferenceModel
from detection.models.contract import Detector, DetectorConfig, PostprocessRule, PreprocessSpec
from detection.models.registry import build_model
from detection.postprocess import postprocess


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("detr-tiny").eval()


def _batch(tiny, sizes=((70, 90), (96, 64))):
    rng = np.random.default_rng(0)
    images = [image_to_input(rng.integers(0, 256, (*size, 3), dtype=np.uint8), tiny.preprocess_spec)
              for size in sizes]
    return pad_batch(images, tiny.preprocess_spec.size_divisibility)


def test_detr_satisfies_the_detector_protocol(tiny) -> None:
    assert isinstance(tiny, Detector)
    assert isinstance(tiny.config, DetectorConfig)
    assert not isinstance(nn.Linear(2, 2), Detector)
    assert isinstance(tiny.preprocess_spec, PreprocessSpec)
    assert isinstance(tiny.postprocess_rule, PostprocessRule)
    flags = inspect.signature(tiny.forward).parameters
    for name in ("cross_attention", "encoder_attention", "decoder_self_attention"):
        assert flags[name].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("size", [(480, 640), (31, 47), (200, 120), (128, 128)])
def test_preprocess_spec_is_detrs_resize_bit_for_bit(tiny, size) -> None:
    spec = tiny.preprocess_spec
    assert spec == PreprocessSpec(resize="shortest_edge", min_size=tiny.config.min_size,
                                  max_size=tiny.config.max_size, interpolation="bilinear",
                                  antialias=False, mean=None, std=None, size_divisibility=1)
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    assert torch.equal(image_to_input(image, spec),
                       image_to_input(image, tiny.config.min_size, tiny.config.max_size))


def test_spec_follows_config_changes() -> None:
    model = build_model("detr-tiny")
    model.config = model.config.replace(min_size=160, max_size=200)
    assert (model.preprocess_spec.min_size, model.preprocess_spec.max_size) == (160, 200)


def test_mean_none_because_detr_normalises_inside(tiny) -> None:
    """The [0, 1] input is normalised by the model's own buffers, from its config."""
    assert tiny.preprocess_spec.mean is None and tiny.preprocess_spec.std is None
    assert tiny.image_mean.flatten().tolist() == pytest.approx(list(tiny.config.image_mean))
    assert "image_mean" not in tiny.state_dict()  # non-persistent: part of the config


def test_postprocess_rule_describes_detr_logits(tiny) -> None:
    images, mask = _batch(tiny)
    with torch.no_grad():
        outputs = tiny(images, mask)
    rule = tiny.postprocess_rule
    assert rule.kind == "softmax_no_object"
    assert outputs["pred_logits"].shape[-1] == rule.logit_classes(tiny.config.num_classes)
    sizes = [(70, 90), (96, 64)]
    by_rule = postprocess(outputs, sizes, tiny.config.class_names, 0.0, rule)
    default = postprocess(outputs, sizes, tiny.config.class_names, 0.0)
    for a, b in zip(by_rule, default):
        assert len(a) == tiny.config.num_queries
        for name in ("boxes", "scores", "labels", "query_index"):
            assert torch.equal(a.get(name), b.get(name))


def test_the_removed_attention_keyword_is_refused(tiny) -> None:
    images, mask = _batch(tiny)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plain = tiny(images, mask)
        with pytest.raises(TypeError, match="attention"):
            tiny(images, mask, attention=True)
    assert plain["attention"] is None


def test_prepare_for_inference_returns_a_prepared_copy(tiny) -> None:
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    prepared = tiny.prepare_for_inference("cpu", "fp32", fold_bn=True, channels_last=False)
    assert prepared is not tiny and prepared.folded_batch_norms > 0 and not prepared.training
    assert all(not p.requires_grad for p in prepared.parameters())
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())
    with pytest.raises(ValueError, match="precision"):
        tiny.prepare_for_inference("cpu", "int8")


class _ConstantDetector(nn.Module):
    """A non-DETR detector: InferenceModel must work through the contract alone."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"class_names": ["a"], "category_ids": [1]})()
        self.scale = nn.Parameter(torch.ones(()))
        self.prepared_with = None

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.fixed(8, 8)

    @property
    def postprocess_rule(self) -> PostprocessRule:
        return PostprocessRule.sigmoid_topk(top_k=5)

    supports_padding = True
    family_name, attention_kind, gradient_capture = "constant", "dense", None

    def precision_allowed(self, precision, device):
        return True

    def forward(self, images, padding_mask=None, *, cross_attention=False, encoder_attention=False,
                decoder_self_attention=False):
        b = images.shape[0]
        return {"pred_logits": self.scale * torch.ones(b, 2, 1), "pred_boxes": torch.full((b, 2, 4), 0.5),
                "aux_outputs": [], "attention": None}

    def prepare_for_inference(self, device, precision, fold_bn=True, channels_last=True, compile=False):
        self.prepared_with = (str(device), precision, fold_bn, channels_last, compile)
        return self


def test_inference_model_uses_only_the_contract() -> None:
    detector = _ConstantDetector()
    assert isinstance(detector, Detector)
    engine = InferenceModel(detector, "cpu", "fp32", fold_bn=False, channels_last=True)
    assert detector.prepared_with == ("cpu", "fp32", False, True, False)
    assert engine.folded_batch_norms == 0 and engine.config is detector.config
    outputs = engine(torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool))
    assert outputs["pred_logits"].dtype == torch.float32
    source = inspect.getsource(fast)
    for part in ("backbone", "class_embed", "bbox_embed", "detection.models.detr"):
        assert part not in source

