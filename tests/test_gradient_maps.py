"""Gradient-weighted attention maps (issue #13): values against autograd, finite differences and
an independent transcription of Chefer et al.'s rules; batching and padding invariance."""
from __future__ import annotations

import copy

import pytest
import torch

from detection.attention.gradients import attn_grad_maps, relevance_maps
from detection.models.registry import build_model

# image 0: 96 x 128 (3 x 4 cells); image 1: 64 x 96 (2 x 3 cells) padded to 96 x 128
QUERIES = [0, 3, 7]
LABELS = [1, 2, 0]


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


def _recording(module, store):
    """Wrap an attention module so its weights keep .grad after backward (test-side capture)."""
    original = module.forward

    def forward(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        if weights is not None:
            weights.retain_grad()
            store.append(weights)
        return out, weights
    module.forward = forward
    return original


def _single_target_gradients(model, images, mask, image, query, label):
    """Per layer (A, ∇A) of encoder self, decoder self, decoder cross for ONE target, via backward."""
    transformer = model.transformer
    groups = {"encoder": [l.self_attn for l in transformer.encoder.layers],
              "decoder_self": [l.self_attn for l in transformer.decoder.layers],
              "cross": [l.multihead_attn for l in transformer.decoder.layers]}
    stores = {name: [[] for _ in modules] for name, modules in groups.items()}
    originals = []
    for name, modules in groups.items():
        for module, store in zip(modules, stores[name]):
            originals.append((module, _recording(module, store)))
    try:
        out = model(images, mask, cross_attention=True, encoder_attention=True, decoder_self_attention=True)
        out["pred_logits"][image, query, label].backward()
    finally:
        for module, original in originals:
            module.forward = original
    model.zero_grad(set_to_none=True)
    return {name: [(s[0][image].detach(), s[0].grad[image]) for s in store] for name, store in stores.items()}


def _bar(attention, gradient):
    return (gradient * attention).clamp(min=0).mean(dim=0)


def _valid(shape_hw, valid_hw):
    h, w = shape_hw
    return [y * w + x for y in range(valid_hw[0]) for x in range(valid_hw[1])]


def test_attn_grad_batched_equals_single_target_backward(model, batch):
    images, mask = batch
    maps = attn_grad_maps(model, images, mask, 1, QUERIES, LABELS)
    assert maps.shape == (3, 2, 3) and maps.dtype == torch.float32
    assert (maps >= 0).all() and maps.sum() > 0
    flat = _valid((3, 4), (2, 3))
    for n, (query, label) in enumerate(zip(QUERIES, LABELS)):
        alone = attn_grad_maps(model, images, mask, 1, [query], [label])[0]
        torch.testing.assert_close(alone, maps[n], rtol=1e-5, atol=1e-9)
        attention, gradient = _single_target_gradients(model, images, mask, 1, query, label)["cross"][-1]
        expected = _bar(attention, gradient)[query][flat].reshape(2, 3)
        torch.testing.assert_close(maps[n], expected, rtol=1e-5, atol=1e-9)
    mean = attn_grad_maps(model, images, mask, 1, QUERIES, LABELS, layers="mean")
    first = attn_grad_maps(model, images, mask, 1, QUERIES, LABELS, layers=0)
    torch.testing.assert_close(mean, (first + maps) / 2, rtol=1e-5, atol=1e-9)


def test_gradient_matches_finite_differences(model, batch):
    images, mask = batch
    double = copy.deepcopy(model).double()
    images, mask = images[1:, :, :64, :64].double(), mask[1:, :64, :64]  # 2 x 2 cells
    query, label, layer = 3, 2, -1
    module = double.transformer.decoder.layers[layer].multihead_attn
    original = module.forward

    def logit(head, cell, delta):
        def forward(query_x, key, value, key_padding_mask=None, need_weights=False):
            q, k, v = module._heads(query_x, 0), module._heads(key, 1), module._heads(value, 2)
            scores = torch.matmul(q, k.transpose(-2, -1)) * module.head_dim ** -0.5
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            weights = scores.softmax(dim=-1).clone()
            weights[0, head, query, cell] += delta
            out = torch.matmul(weights, v).transpose(1, 2).flatten(2)
            return module.out_proj(out), weights
        module.forward = forward
        try:
            with torch.no_grad():
                return double(images, mask, cross_attention=True)["pred_logits"][0, query, label].item()
        finally:
            module.forward = original

    with torch.no_grad():
        attention = double(images, mask, cross_attention=True)["attention"].decoder_cross[layer, 0]
    maps = attn_grad_maps(double, images, mask, 0, [query], [label])[0]  # (2, 2)
    assert (maps > 0).sum() >= 2, "the checked entries should include non-zero ones"
    eps = 1e-6
    for cell in range(4):
        gradients = torch.tensor([(logit(h, cell, eps) - logit(h, cell, -eps)) / (2 * eps) for h in range(4)])
        expected = (gradients * attention[:, query].flatten(1)[:, cell]).clamp(min=0).mean()
        assert maps.flatten()[cell].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)


def _rownorm_bar(relevance):
    eye = torch.eye(len(relevance), dtype=relevance.dtype)
    out = relevance - eye
    for i in range(len(out)):
        total = out[i].sum()
        if total != 0:
            out[i] = out[i] / total
    return out + eye


def test_relevance_equals_transcribed_rules(model, batch):
    images, mask = batch
    maps = relevance_maps(model, images, mask, 1, QUERIES, LABELS)
    assert maps.shape == (3, 2, 3) and (maps >= 0).all() and maps.sum() > 0
    flat = _valid((3, 4), (2, 3))
    for n, (query, label) in enumerate(zip(QUERIES, LABELS)):
        pairs = _single_target_gradients(model, images, mask, 1, query, label)
        bars = {name: [_bar(a, g).double() for a, g in layers] for name, layers in pairs.items()}
        cells, queries = len(flat), 10
        r_ii = torch.eye(cells, dtype=torch.float64)
        for layer in bars["encoder"]:
            r_ii = r_ii + layer[flat][:, flat] @ r_ii
        r_qq = torch.eye(queries, dtype=torch.float64)
        r_qi = torch.zeros(queries, cells, dtype=torch.float64)
        for self_bar, cross_bar in zip(bars["decoder_self"], bars["cross"]):
            r_qq = r_qq + self_bar @ r_qq
            r_qi = r_qi + self_bar @ r_qi
            r_qi = r_qi + _rownorm_bar(r_qq).T @ cross_bar[:, flat] @ _rownorm_bar(r_ii)
        torch.testing.assert_close(maps[n].double(), r_qi[query].reshape(2, 3), rtol=1e-5, atol=1e-9)


def test_padding_cells_excluded(model, batch):
    images, mask = batch
    alone = images[1:, :, :64, :96]
    for method in (attn_grad_maps, relevance_maps):
        padded = method(model, images, mask, 1, QUERIES, LABELS)
        single = method(model, alone, None, 0, QUERIES, LABELS)
        assert (padded >= 0).all()
        torch.testing.assert_close(padded, single, rtol=0, atol=1e-5)


def test_rejects_no_object_class_and_training_mode(model, batch):
    images, mask = batch
    with pytest.raises(ValueError, match="no-object"):
        attn_grad_maps(model, images, mask, 0, [0], [3])
    with pytest.raises(ValueError, match="rollout"):
        attn_grad_maps(model, images, mask, 0, [0], [0], layers="rollout")
    trained = copy.deepcopy(model).train()
    with pytest.raises(ValueError, match="eval"):
        attn_grad_maps(trained, images, mask, 0, [0], [0])


# Stated tolerance of the gradient maps through the inference fast path (prepare_for_inference),
# relative to the fp32 maps' peak; measured on the shipped demo model (5 detections of
# demo/images/shapes_1.png): fp32 fast path (BN folded, channels_last) 2.4e-6 / 1.4e-6
# (attn-grad / relevance); bf16 fast path under autocast 0.042 / 0.0099.
FAST_FP32_TOLERANCE = 1e-4
FAST_BF16_TOLERANCE = 0.1


def test_fast_path_gives_the_fp32_maps_within_the_stated_tolerance():
    from detection.data.images import load_image
    from detection.data.preprocess import image_to_input, pad_batch
    from detection.models.registry import load_model
    from detection.runtime.device import autocast

    demo = load_model("demo").eval()
    loaded = load_image("demo/images/shapes_1.png")
    images, mask = pad_batch([image_to_input(loaded.rgb, demo.preprocess_spec)], demo.preprocess_spec.size_divisibility)
    with torch.no_grad():
        probabilities = demo(images, mask)["pred_logits"][0].softmax(-1)[:, :-1]
    scores, labels = probabilities.max(-1)
    queries = scores.argsort(descending=True)[:5]
    labels = labels[queries]
    reference = {"attn-grad": attn_grad_maps(demo, images, mask, 0, queries, labels),
                 "relevance": relevance_maps(demo, images, mask, 0, queries, labels)}
    for precision, tolerance in (("fp32", FAST_FP32_TOLERANCE), ("bf16", FAST_BF16_TOLERANCE)):
        fast = demo.prepare_for_inference("cpu", precision)
        assert fast.folded_batch_norms > 0 and not any(p.requires_grad for p in fast.parameters())
        with autocast(torch.device("cpu"), precision):
            maps = {"attn-grad": attn_grad_maps(fast, images, mask, 0, queries, labels),
                    "relevance": relevance_maps(fast, images, mask, 0, queries, labels)}
        assert not any(p.requires_grad for p in fast.parameters())  # restored after the forward
        for name, expected in reference.items():
            error = float((maps[name].float() - expected).abs().max() / expected.max())
            assert error <= tolerance, (precision, name, error)


def test_method_maps_is_the_one_maps_type_of_the_methods():
    from detection.attention.cell_maps import MethodMaps
    from detection.attention.methods import base

    assert base.MethodMaps is MethodMaps
