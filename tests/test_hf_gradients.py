"""Gradient-weighted attention of the wrapped Hugging Face detectors (issue #13): attn-grad against
finite differences (a dense and a deformable family, float64), relevance against a transcription
of Chefer et al.'s rules on Ā taken from HF's own output_attentions, batching, keep_graph, refusals."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_equivalence import hf_folder  # noqa: E402

from detection.attention import gradients  # noqa: E402
from detection.attention.aggregate import self_relevance  # noqa: E402
from detection.attention.gradients import attn_grad, relevance  # noqa: E402
from detection.attention.methods import (METHODS, MethodNotApplicable, applicable_methods,  # noqa: E402
                                         check_methods)
from detection.attention.sampled import sampled_cell_maps  # noqa: E402
from detection.models.outputs import SampledAttention  # noqa: E402
from detection.models.registry import load_model  # noqa: E402

QUERIES = [0, 3, 7]
LABELS = [1, 2, 0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache: dict[str, torch.nn.Module] = {}

    def get(variant: str) -> torch.nn.Module:
        if variant not in cache:
            model = load_model(hf_folder(variant, tmp_path_factory.mktemp(variant))).eval()
            for parameter in model.parameters():
                parameter.requires_grad_(True)
            cache[variant] = model
        return cache[variant]
    return get


def _padded_batch(dtype=torch.float32):
    """Image 0: 64 x 96; image 1: 64 x 64 padded to 64 x 96 (stride 32: 2 x 2 of 2 x 3 cells valid)."""
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4), dtype=dtype)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


def _single_image(dtype=torch.float32):
    return torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5), dtype=dtype), \
        torch.zeros(1, 64, 96, dtype=torch.bool)


# -- attn-grad against finite differences ------------------------------------------------------
def test_dense_attn_grad_matches_finite_differences(models, monkeypatch):
    """Conditional DETR, last decoder layer: scaling one weight A[h, q, k] by (1 + t) changes the
    logit by t·(∂z/∂A ⊙ A)[h, q, k]; central differences give every head's product per valid cell."""
    from transformers.models.conditional_detr import modeling_conditional_detr as modeling

    model = copy.deepcopy(models("conditional_detr")).double()
    images, mask = _padded_batch(torch.float64)
    image, query, label = 1, 3, 2
    target = model.hf_model.model.decoder.layers[-1].encoder_attn
    eager = modeling.eager_attention_forward
    scaled: dict[str, object] = {}

    def perturbed(module, query_states, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module is not target or not scaled:
            return eager(module, query_states, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        scores = torch.matmul(query_states, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = scores.softmax(dim=-1).clone()
        head, cell, factor = scaled["head"], scaled["cell"], scaled["factor"]
        weights[image, head, query, cell] = weights[image, head, query, cell] * factor
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    monkeypatch.setattr(modeling, "eager_attention_forward", perturbed)

    def logit(head: int, cell: int, factor: float) -> float:
        scaled.update(head=head, cell=cell, factor=factor)
        try:
            with torch.no_grad():
                return model(images, mask)["pred_logits"][image, query, label].item()
        finally:
            scaled.clear()

    maps = attn_grad(model, images, mask, image, [query], [label]).values[0].double()  # (2, 2) valid cells
    assert maps.shape == (2, 2) and (maps > 0).sum() >= 2, "the checked entries should include non-zero ones"
    heads, eps = model.hf_model.config.decoder_attention_heads, 1e-4  # central: O(eps²) error
    for row in range(2):
        for col in range(2):
            cell = row * 3 + col  # the record's 2 x 3 grid, row-major
            products = torch.tensor([(logit(h, cell, 1 + eps) - logit(h, cell, 1 - eps)) / (2 * eps)
                                     for h in range(heads)], dtype=torch.float64)
            assert maps[row, col].item() == pytest.approx(products.clamp(min=0).mean().item(), rel=1e-6, abs=1e-10)


def test_sampled_attn_grad_matches_finite_differences(models):
    """Deformable DETR, last decoder layer: each sampling point's weight w scaled by (1 + t) gives
    its product (∂z/∂w)·w; clamped and splatted at the record's points, as raw maps are."""
    model = copy.deepcopy(models("deformable_detr")).double()
    images, mask = _padded_batch(torch.float64)
    image, query, label = 1, 3, 2
    core = model.hf_model.model.decoder.layers[-1].encoder_attn.attn
    scaled: dict[str, object] = {}

    def scale(_module, args, kwargs):
        if not scaled:
            return None
        weights = args[5].clone()
        weights[(image, query, *scaled["point"])] *= scaled["factor"]
        return (*args[:5], weights, *args[6:]), kwargs

    handle = core.register_forward_pre_hook(scale, with_kwargs=True)
    try:
        with torch.no_grad():
            record = model(images, mask, cross_attention=True)["attention"]
        sampled = record.decoder_cross_sampled
        _, _, heads, _, levels, points = sampled.weights.shape

        def logit(point, factor):
            scaled.update(point=point, factor=factor)
            try:
                with torch.no_grad():
                    return model(images, mask)["pred_logits"][image, query, label].item()
            finally:
                scaled.clear()

        eps = 1e-4  # central differences: O(eps²) error, rounding 1e-16 / eps
        products = torch.zeros(heads, levels, points, dtype=torch.float64)
        for point in [(h, lv, p) for h in range(heads) for lv in range(levels) for p in range(points)]:
            products[point] = (logit(point, 1 + eps) - logit(point, 1 - eps)) / (2 * eps)
    finally:
        handle.remove()
    assert (products > 0).any() and (products < 0).any(), "the clamp should matter"
    expected_record = SampledAttention(
        locations=sampled.locations[-1:, image:image + 1, :, query:query + 1],
        weights=products.clamp(min=0)[None, None, :, None], level_sizes=sampled.level_sizes,
        level_strides=sampled.level_strides, points_per_level=sampled.points_per_level, sampler=sampled.sampler)
    expected = sampled_cell_maps(expected_record, 0, torch.tensor([0]), (8, 8), heads="mean", layers="last")[0]
    maps = attn_grad(model, images, mask, image, [query], [label]).values[0]
    assert maps.shape == (8, 8) and maps.sum() > 0  # image 1's valid level-0 cells (64 x 64, stride 8)
    torch.testing.assert_close(maps.double(), expected.double(), rtol=1e-5, atol=1e-9)


# -- relevance against a transcription of the rules -------------------------------------------
def _hf_attentions_and_gradients(model, images, mask, image, query, label):
    """HF's own output_attentions (retain_grad) and their gradients for ONE target's logit."""
    kwargs = {"pixel_values": images}
    if model.family.takes_padding:
        kwargs["pixel_mask"] = (~mask).long()
    with torch.enable_grad():
        outputs = model.hf_model(**kwargs, output_attentions=True)
        groups = ({"tokens": outputs.attentions} if model.family.model_type == "yolos" else
                  {"encoder": outputs.encoder_attentions, "decoder_self": outputs.decoder_attentions,
                   "cross": outputs.cross_attentions})
        for layers in groups.values():
            for attention in layers:
                attention.retain_grad()
        outputs.logits[image, query, label].backward()
    bars = {name: [(a.grad[image] * a[image]).clamp(min=0).mean(dim=0).detach().double() for a in layers]
            for name, layers in groups.items()}
    model.zero_grad(set_to_none=True)
    return bars


def _rownorm_bar(relevance_matrix):
    eye = torch.eye(len(relevance_matrix), dtype=relevance_matrix.dtype)
    out = relevance_matrix - eye
    for i in range(len(out)):
        total = out[i].sum()
        if total != 0:
            out[i] = out[i] / total
    return out + eye


def test_relevance_equals_transcribed_rules_encoder_decoder(models):
    model = models("conditional_detr")
    images, mask = _padded_batch()
    maps = relevance(model, images, mask, 1, QUERIES, LABELS)
    assert maps.values.shape == (3, 2, 2) and maps.stride == 32 and maps.input_size == (64, 64)
    assert (maps.values >= 0).all() and maps.values.sum() > 0
    flat = [0, 1, 3, 4]  # the valid 2 x 2 block of the 2 x 3 grid
    for n, (query, label) in enumerate(zip(QUERIES, LABELS)):
        bars = _hf_attentions_and_gradients(model, images, mask, 1, query, label)
        r_ii = torch.eye(len(flat), dtype=torch.float64)
        for layer in bars["encoder"]:
            r_ii = r_ii + layer[flat][:, flat] @ r_ii
        r_qq = torch.eye(10, dtype=torch.float64)
        r_qi = torch.zeros(10, len(flat), dtype=torch.float64)
        for self_bar, cross_bar in zip(bars["decoder_self"], bars["cross"]):
            r_qq = r_qq + self_bar @ r_qq
            r_qi = r_qi + self_bar @ r_qi
            r_qi = r_qi + _rownorm_bar(r_qq).T @ cross_bar[:, flat] @ _rownorm_bar(r_ii)
        torch.testing.assert_close(maps.values[n].double(), r_qi[query].reshape(2, 2), rtol=1e-5, atol=1e-9)


def test_relevance_equals_transcribed_rules_yolos(models):
    """YOLOS: R = I; R += Ā·R per layer over all tokens; map = R[detection token, patch tokens]."""
    model = models("yolos")
    images, mask = _single_image()
    maps = relevance(model, images, mask, 0, QUERIES, LABELS)
    assert maps.values.shape == (3, 8, 12) and maps.stride == 8 and maps.input_size == (64, 96)
    tokens = 1 + 8 * 12 + 10
    for n, (query, label) in enumerate(zip(QUERIES, LABELS)):
        bars = _hf_attentions_and_gradients(model, images, mask, 0, query, label)["tokens"]
        r = torch.eye(tokens, dtype=torch.float64)
        for layer in bars:
            r = r + layer @ r
        expected = r[tokens - 10 + query, 1:1 + 96].reshape(8, 12)
        torch.testing.assert_close(maps.values[n].double(), expected, rtol=1e-5, atol=1e-9)
        # and the row of the full R of the library's own rule
        full = self_relevance(torch.stack(bars))[tokens - 10 + query, 1:1 + 96].reshape(8, 12)
        torch.testing.assert_close(maps.values[n].double(), full, rtol=1e-5, atol=1e-9)
    # attn-grad of YOLOS: the detection token's row over the patches of the last layer's Ā
    grad = attn_grad(model, images, mask, 0, QUERIES[:1], LABELS[:1]).values[0]
    last = _hf_attentions_and_gradients(model, images, mask, 0, QUERIES[0], LABELS[0])["tokens"][-1]
    torch.testing.assert_close(grad.double(), last[tokens - 10 + QUERIES[0], 1:1 + 96].reshape(8, 12),
                               rtol=1e-5, atol=1e-9)


# -- batching, chunking, keep_graph -------------------------------------------------------------
@pytest.mark.parametrize("variant", ["table-transformer", "rt_detr_v2", "lw_detr"])
def test_batched_equals_one_detection_at_a_time(models, monkeypatch, variant):
    model = models(variant)
    images, mask = _padded_batch() if model.family.takes_padding else _single_image()
    image = len(images) - 1
    functions = [lambda *a: attn_grad(*a, layers="mean")]
    if model.family.attention == "dense":
        functions.append(relevance)
    for function in functions:
        together = function(model, images, mask, image, QUERIES, LABELS).values
        assert together.sum() > 0 and (together >= 0).all()
        for n, (query, label) in enumerate(zip(QUERIES, LABELS)):
            alone = function(model, images, mask, image, [query], [label]).values[0]
            torch.testing.assert_close(alone, together[n], rtol=1e-5, atol=1e-8)
        monkeypatch.setattr(gradients, "_GRADIENT_VALUES", 1)  # one target per backward
        chunked = function(model, images, mask, image, QUERIES, LABELS).values
        monkeypatch.undo()
        torch.testing.assert_close(chunked, together, rtol=1e-5, atol=1e-8)
    # one layer is one layer's gradient only; both layers' maps average to the mean (splats are linear)
    first, last, second = (attn_grad(model, images, mask, image, QUERIES, LABELS, layers=choice).values
                           for choice in (0, "last", -1))
    assert torch.equal(last, second) and not torch.allclose(first, last)
    mean = attn_grad(model, images, mask, image, QUERIES, LABELS, layers="mean").values
    torch.testing.assert_close(mean, (first + last) / 2, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("variant", ["yolos", "conditional_detr", "table-transformer", "deformable_detr", "rt_detr_v2",
                                     "d_fine", "deimv2", "deimv2_dinov3", "lw_detr"])
def test_keep_graph_changes_no_output(models, variant):
    model = models(variant)
    images, mask = _padded_batch() if model.family.takes_padding else _single_image()
    dense = model.family.attention == "dense"
    for selves in ((False, True) if dense else (False,)):
        flags = dict(cross_attention=True, encoder_attention=selves, decoder_self_attention=selves)
        with torch.no_grad():
            plain = model(images, mask, **flags)
        kept = model(images, mask, keep_graph=True, **flags)
        assert "attention_graph" not in plain
        for key in ("pred_logits", "pred_boxes"):
            assert torch.equal(plain[key], kept[key].detach())
        before, after, graph = plain["attention"], kept["attention"], kept["attention_graph"]
        if dense:
            assert torch.equal(before.decoder_cross, after.decoder_cross)
            for name in ("encoder_self", "decoder_self"):  # the record holds only what was asked
                if selves:
                    assert torch.equal(getattr(before, name), getattr(after, name))
                else:
                    assert getattr(after, name) is None
            if graph.tokens:  # YOLOS: the record's rows are the detection tokens' rows of the kept weights
                detections = graph.detection_tokens
                cross = torch.stack([t[:, :, -detections:, 1:-detections] for t in graph.tokens])
                assert not graph.cross and not graph.encoder and not graph.decoder_self
            else:  # every role is kept, whatever the record holds
                cross = torch.stack(graph.cross)
                assert len(graph.encoder) == len(graph.decoder_self) == len(graph.cross) == 2
                if selves:
                    torch.testing.assert_close(torch.stack(graph.encoder).detach().float(), after.encoder_self,
                                               rtol=0, atol=0)
            assert all(t.requires_grad for t in graph.tokens + graph.cross + graph.encoder + graph.decoder_self)
            torch.testing.assert_close(cross.detach().float(), after.decoder_cross.flatten(-2), rtol=0, atol=0)
        else:
            sampled = after.decoder_cross_sampled
            assert torch.equal(before.decoder_cross_sampled.weights, sampled.weights)
            assert torch.equal(before.decoder_cross_sampled.locations, sampled.locations)
            assert all(t.requires_grad for t in graph.cross)
            stored = torch.stack([SampledAttention.layer_weights(t, sampled.points_per_level) for t in graph.cross])
            assert torch.equal(stored.detach(), sampled.weights)
    with pytest.raises(ValueError, match="keep_graph"):
        model(images, mask, keep_graph=True)


# -- which methods apply ---------------------------------------------------------------------------
def test_methods_apply_by_family_and_refuse_naming_it(models):
    dense, deformable = models("table-transformer"), models("deformable_detr")
    assert applicable_methods(dense) == list(METHODS)
    assert applicable_methods(deformable) == ["raw", "attn-grad", "drise", "in-box"]
    check_methods(["raw", "attn-grad", "relevance"], dense)
    check_methods(["raw", "attn-grad"], deformable)
    with pytest.raises(MethodNotApplicable) as error:
        check_methods(["attn-grad", "relevance"], deformable)
    message = str(error.value)
    assert "'relevance' does not apply to the Deformable DETR family" in message
    assert message.endswith("methods that apply: raw, attn-grad, drise, in-box")
    images, mask = _padded_batch()
    with pytest.raises(ValueError, match="Deformable DETR"):
        relevance(deformable, images, mask, 0, [0], [0])
    with pytest.raises(ValueError, match=r"labels must be object classes 0\.\.2$"):  # sigmoid: no no-object column
        attn_grad(deformable, images, mask, 0, [0], [3])
    with pytest.raises(ValueError, match=r"0\.\.2 \(no-object excluded\)"):  # softmax: the last column is not a class
        attn_grad(dense, images, mask, 0, [0], [3])


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, explain", [("yolos", "raw,attn-grad,relevance"), ("deformable_detr", "raw,attn-grad")])
def test_eval_explain_on_hf_folders(tmp_path_factory, tmp_path, capsys, variant, explain):
    import json

    from detection.cli import main

    data = tmp_path_factory.getbasetemp() / "hf_gradients_synth"
    if not data.exists():
        assert main(["synth", "--out", str(data), "--train", "0", "--val", "2", "--image-size", "96",
                     "--no-progress"]) == 0
    folder = hf_folder(variant, tmp_path / "model")

    def evaluate(methods: str, out: str) -> int:
        return main(["eval", "--no-progress", "--model", str(folder), "--ann",
                     str(data / "annotations" / "instances_val.json"), "--images", str(data / "val"), "--out",
                     str(tmp_path / out), "--allow-unmapped", "--attention-threshold", "0.2", "--device", "cpu",
                     "--explain", methods])

    assert evaluate(explain, "eval") == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = {"last/mean", "last/max", "mean/mean", "mean/max", "attn-grad/last", "gaussian-baseline"}
    assert set(metrics["attention"]) == expected | ({"relevance"} if "relevance" in explain else set())
    assert metrics["attention"]["attn-grad/last"]["num_detections"] > 0
    if "relevance" not in explain:  # a deformable family: refused, naming the family and what applies
        capsys.readouterr()
        assert evaluate("raw,relevance", "refused") != 0
        err = capsys.readouterr().err
        assert "Deformable DETR" in err and "raw, attn-grad, drise, in-box" in err
