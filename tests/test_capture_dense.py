"""DenseCapture on small Hugging Face YOLOS / Conditional DETR / DAB-DETR / Table Transformer models.

Per family: the captured weights times the values reproduce the attention output the module
computed (before its output projection); they equal HF's own eager `output_attentions`; capturing
changes no output; a capture that finds nothing raises naming the family and the transformers
version; and the record's geometry puts a planted cell's weight on that cell's image region.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from detection.attention.maps import detection_maps  # noqa: E402
from detection.models.hf.capture_dense import DenseCapture  # noqa: E402
from tests import hf_dense_models as hf_models  # noqa: E402

FAMILIES = hf_models.FAMILIES
HEADS = 2


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def models(family):
    """(model in its default attention implementation, the same weights under eager)."""
    return hf_models.build(family), hf_models.build(family, attn_implementation="eager")


def _inputs(family: str, sizes=((96, 128), (128, 80))):
    pixels, padding = hf_models.batch(sizes)
    kwargs = {"pixel_values": pixels}
    if family != "yolos":  # YOLOS takes no pixel mask
        kwargs["pixel_mask"] = (~padding).long()
    return kwargs, padding


def _run(model, family, *, encoder=True, decoder_self=True, sizes=((96, 128), (128, 80))):
    kwargs, padding = _inputs(family, sizes)
    with torch.no_grad(), DenseCapture(model, encoder=encoder, decoder_self=decoder_self) as capture:
        outputs = model(**kwargs, **capture.forward_kwargs())
    record = capture.record(outputs, input_size=tuple(padding.shape[-2:]), image_sizes=hf_models.image_sizes(padding),
                            padding_mask=None if family == "yolos" else padding)
    return outputs, record, capture


# -- (a) attention . values reproduces the module's attention output ---------------------------
def _projections(model, family: str, role: str):
    """(module whose output is the values (or whose input is, for DAB-DETR), output projection) of layer 1."""
    if family == "yolos":
        attention = model.vit.encoder.layer[1].attention
        return attention.attention.value, attention.output.dense
    encoder_layer, decoder_layer = model.model.encoder.layers[1], model.model.decoder.layers[1]
    if family == "dab-detr":
        module = decoder_layer.cross_attn.cross_attn if role == "cross" else decoder_layer.self_attn.self_attn
        if role == "encoder":
            return encoder_layer.self_attn.v_proj, encoder_layer.self_attn.out_proj
        return module, module.output_proj
    module = {"cross": decoder_layer.encoder_attn, "decoder_self": decoder_layer.self_attn,
              "encoder": encoder_layer.self_attn}[role]
    return module.v_proj, getattr(module, "o_proj", None) or module.out_proj


@pytest.mark.parametrize("role", ["cross", "encoder", "decoder_self"])
def test_weights_times_values_reproduce_attention_output(family, models, role) -> None:
    if family == "yolos" and role != "cross":
        pytest.skip("YOLOS: one attention per layer; the det-token rows (below) hold all three blocks")
    model, _ = models
    value_source, output_projection = _projections(model, family, role)
    seen = {}
    if family == "dab-detr" and role != "encoder":  # values are computed outside DabDetrAttention
        handle_v = value_source.register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("values", k["value_states"]), with_kwargs=True)
    else:
        handle_v = value_source.register_forward_hook(lambda m, a, out: seen.__setitem__("values", out))
    handle_o = output_projection.register_forward_pre_hook(lambda m, a: seen.__setitem__("context", a[0]))
    try:
        _, record, capture = _run(model, family)
    finally:
        handle_v.remove()
        handle_o.remove()
    values, context = seen["values"], seen["context"]  # (B, K, C), (B, R, C)
    batch, keys, channels = values.shape
    values = values.view(batch, keys, HEADS, channels // HEADS).transpose(1, 2)  # (B, heads, K, c)
    if family == "yolos":  # the full det-token rows, [CLS] and det columns included
        weights = capture.token_rows[1]
        context = context[:, -weights.shape[2]:]
    else:
        weights = {"cross": record.decoder_cross[1].flatten(-2), "encoder": record.encoder_self[1],
                   "decoder_self": record.decoder_self[1]}[role]
    reproduced = torch.matmul(weights, values.float()).transpose(1, 2).reshape(batch, -1, channels)
    assert reproduced.shape == context.shape
    assert (reproduced - context).abs().max() <= 1e-5
    assert context.abs().max() > 1e-2  # a real signal, not zeros matching zeros


# -- (b) equal to HF's eager output_attentions ------------------------------------------------------
def test_equals_hf_eager_output_attentions(family, models) -> None:
    model, eager = models
    kwargs, _ = _inputs(family)
    _, record, capture = _run(model, family)
    with torch.no_grad():
        reference = eager(**kwargs, output_attentions=True)
    if model.config._attn_implementation != "eager":  # captured under SDPA; under eager the same
        _, record_eager, _ = _run(eager, family)
        assert (record_eager.decoder_cross - record.decoder_cross).abs().max() <= 1e-5
        assert (record_eager.encoder_self - record.encoder_self).abs().max() <= 1e-5
    layers = record.decoder_cross.shape[0]
    assert layers == 2
    for layer in range(layers):
        if family == "yolos":
            full = reference.attentions[layer]  # (B, heads, N, N): [CLS] + patches + det tokens
            tokens, queries = full.shape[-1], hf_models.NUM_QUERIES
            patches = slice(1, tokens - queries)
            expected = {"cross": full[:, :, -queries:, patches], "encoder": full[:, :, patches, patches],
                        "decoder_self": full[:, :, -queries:, -queries:]}
            assert (capture.token_rows[layer] - full[:, :, -queries:]).abs().max() <= 1e-5
        else:
            expected = {"cross": reference.cross_attentions[layer], "encoder": reference.encoder_attentions[layer],
                        "decoder_self": reference.decoder_attentions[layer]}
        assert (record.decoder_cross[layer].flatten(-2) - expected["cross"]).abs().max() <= 1e-5
        assert (record.encoder_self[layer] - expected["encoder"]).abs().max() <= 1e-5
        assert (record.decoder_self[layer] - expected["decoder_self"]).abs().max() <= 1e-5
    if family == "yolos":  # raw weights: what the map lacks of 1 is the mass on [CLS] and det columns
        rows = torch.stack([capture.token_rows[layer] for layer in range(layers)])
        outside = rows[..., 0] + rows[..., -hf_models.NUM_QUERIES:].sum(-1)
        assert torch.allclose(record.decoder_cross.sum(dim=(-2, -1)), 1 - outside, atol=1e-6)
        assert float(outside.max()) > 1e-3
    else:  # padded cells get exactly zero, rows are distributions over the valid cells
        padded = record.feature_padding_mask.flatten(1)  # (B, h*w)
        cross = record.decoder_cross.flatten(-2)
        assert padded.any(dim=1).all()
        assert float(cross[padded[None, :, None, None, :].expand_as(cross)].abs().max()) == 0.0
        assert torch.allclose(cross.sum(-1), torch.ones(()), atol=1e-5)


# -- (c) capture changes nothing; hooks are removed -------------------------------------------------
def test_capture_changes_no_output_and_cleans_up(family, models) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, _ = models
    kwargs, _ = _inputs(family)
    registered = set(ALL_ATTENTION_FUNCTIONS)
    with torch.no_grad():
        plain = model(**kwargs)
    captured, _, capture = _run(model, family)
    assert torch.equal(plain.logits, captured.logits)
    assert torch.equal(plain.pred_boxes, captured.pred_boxes)
    # hooks, configs and the interface entry are gone, also after an exception inside the block
    with pytest.raises(ZeroDivisionError), DenseCapture(model, encoder=True, decoder_self=True):
        raise ZeroDivisionError
    for module in capture._targets:
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert getattr(module, "config", model.config) is model.config
    assert set(ALL_ATTENTION_FUNCTIONS) == registered
    with torch.no_grad():
        again = model(**kwargs)
    assert torch.equal(plain.logits, again.logits)


def test_one_capture_per_model_at_a_time(models) -> None:
    model, _ = models
    kwargs, _ = _inputs(model.config.model_type)
    with torch.no_grad():
        plain = model(**kwargs)
    with DenseCapture(model) as outer:
        with pytest.raises(RuntimeError, match="already inside a DenseCapture"), DenseCapture(model):
            pass
        with torch.no_grad():
            captured = model(**kwargs)  # the outer capture still works
    assert torch.equal(plain.logits, captured.logits) and len(outer._roles["cross"]) == 2
    with DenseCapture(model):  # and the model is free again
        pass


def test_only_requested_blocks(family, models) -> None:
    _, record, _ = _run(models[0], family, encoder=False, decoder_self=False)
    assert record.encoder_self is None and record.decoder_self is None
    assert tuple(record.decoder_cross.shape[:4]) == (2, 2, HEADS, hf_models.NUM_QUERIES)


# -- (d) nothing captured -> RuntimeError naming family and version ---------------------------------
def test_nothing_captured_raises(family, models, monkeypatch) -> None:
    model, _ = models
    kwargs, padding = _inputs(family)
    with torch.no_grad(), DenseCapture(model) as capture:
        # simulate HF internals that no longer route attention the way the capture expects
        for module in capture._targets:
            if family in ("yolos", "conditional_detr"):
                monkeypatch.setattr(module, "config", model.config)
            else:
                original = module.forward
                monkeypatch.setattr(module, "forward", lambda *a, _f=original, **k: (_f(*a, **k)[0], None))
        outputs = model(**kwargs)
        monkeypatch.undo()  # before the capture restores the modules
    message = f"'{family}'.*transformers {transformers.__version__}"
    with pytest.raises(RuntimeError, match=message):
        capture.record(outputs, input_size=tuple(padding.shape[-2:]), image_sizes=hf_models.image_sizes(padding),
                       padding_mask=padding)


def test_renamed_modules_raise(family, models, monkeypatch) -> None:
    model, _ = models
    if family == "yolos":
        monkeypatch.delattr(model.vit.encoder.layer[0], "attention")
    else:
        layer = model.model.decoder.layers[0]
        monkeypatch.delattr(layer, "cross_attn" if family == "dab-detr" else "encoder_attn")
    with pytest.raises(RuntimeError, match=f"'{family}'.*transformers {transformers.__version__}"):
        DenseCapture(model)


def test_other_model_type_is_refused() -> None:
    class Fake(torch.nn.Module):
        config = type("Config", (), {"model_type": "deformable_detr"})()

    with pytest.raises(ValueError, match="deformable_detr"):
        DenseCapture(Fake())


# -- (e) map geometry through detection_maps ----------------------------------------------------------
def test_planted_cell_lights_its_region(family, models) -> None:
    _, record, _ = _run(models[0], family, encoder=False, decoder_self=False)
    stride = record.feature_stride
    assert stride == (8 if family == "yolos" else 32)
    # image 0 is 96x128 and image 1 128x80 inside the 128x128 batch: padding cells are cropped
    valid = [(96 // stride, 128 // stride), (128 // stride, -(-80 // stride))]
    for image, (rows, cols) in enumerate(valid):
        assert torch.equal((~record.feature_padding_mask[image]).sum(), torch.tensor(rows * cols))
        y, x = rows - 1, cols - 1  # the last valid cell
        record.decoder_cross.zero_()
        record.decoder_cross[:, image, :, 3, y, x] = 1.0
        height, width = hf_models.image_sizes(hf_models.batch()[1])[image].tolist()
        original = (2 * height, 2 * width)  # the original image was twice the input size
        maps = detection_maps(record, image, [3], original, normalize=None, interpolation="nearest")
        assert maps.shape == (1, *original)
        expected = np.zeros(original, dtype=np.float32)
        expected[2 * y * stride:2 * (y + 1) * stride, 2 * x * stride:2 * (x + 1) * stride] = 1.0
        np.testing.assert_array_equal(maps[0], expected)


def test_yolos_patch_grid_drops_the_remainder() -> None:
    """YOLOS: grid = (H // p, W // p); sizes clipped to it; patches without image pixels padded."""
    model = hf_models.build("yolos")
    _, record, _ = _run(model, "yolos", sizes=((100, 120), (64, 90)), encoder=False, decoder_self=False)
    assert record.feature_size == (12, 15) and record.feature_stride == 8
    assert record.image_sizes.tolist() == [[96, 120], [64, 90]]
    assert (~record.feature_padding_mask).sum(dim=(1, 2)).tolist() == [12 * 15, 8 * 12]
    maps = detection_maps(record, 0, [0, 1], (100, 120))
    assert maps.shape == (2, 100, 120) and np.isfinite(maps).all()


def test_yolos_rows_do_not_hold_the_full_weights() -> None:
    """Under eager the captured detection rows are copies: a view would keep every layer's full
    (B, heads, N, N) softmax alive (GBs at 800x1333, and it slowed the forward by a third)."""
    model = hf_models.build("yolos", attn_implementation="eager")
    _, record, capture = _run(model, "yolos", encoder=False, decoder_self=False)
    for rows in capture.token_rows.values():
        assert rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()
