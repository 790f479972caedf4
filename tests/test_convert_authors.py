"""Authors' checkpoint format (facebookresearch/detr): round trip and loading a foreign state dict."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.models import convert
from detection.models.registry import build_model, load_config
from detection.models.checkpoint_io import CheckpointError


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 96, 128, generator=gen)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:] = True
    return images, mask


def _outputs_equal(a, b) -> None:
    with torch.no_grad():
        images, mask = _inputs()
        out_a = a(images, mask, cross_attention=True)
        out_b = b(images, mask, cross_attention=True)
    assert torch.equal(out_a["pred_logits"], out_b["pred_logits"])
    assert torch.equal(out_a["pred_boxes"], out_b["pred_boxes"])
    assert torch.equal(out_a["attention"].decoder_cross, out_b["attention"].decoder_cross)


def test_round_trip_through_authors_format(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("detr-tiny").eval()
    path = convert.save_authors_checkpoint(model, tmp_path / "detr-tiny.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model"}
    assert "backbone.0.body.layer1.0.conv1.weight" in raw["model"]
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in raw["model"]
    assert not any(k.startswith("backbone.body.") for k in raw["model"])
    loaded = convert.load_authors_checkpoint(path, model.config).eval()
    _outputs_equal(model, loaded)
    # without a config, sizes are read from the weights (tiny has 4 heads: must be given)
    inferred = convert.infer_authors_config(raw["model"], "detr-tiny.pth")
    assert (inferred.backbone, inferred.hidden_dim, inferred.num_queries) == ("resnet18", 64, 10)
    assert (inferred.enc_layers, inferred.dec_layers, inferred.dim_feedforward, inferred.num_classes) == (2, 2, 128, 3)


def _authors_state_dict(config) -> dict[str, torch.Tensor]:
    """A state dict with the authors' module structure, built WITHOUT our model.

    Their backbone is torchvision's ResNet with FrozenBatchNorm2d under `backbone.0.body`;
    their transformer layers use the names of torch.nn.Transformer{Encoder,Decoder}Layer
    (self_attn / multihead_attn as nn.MultiheadAttention, linear1/2, norm1..3).
    """
    torch.manual_seed(1)
    resnet = getattr(torchvision.models, config.backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    state = {f"backbone.0.body.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    d, ffn = config.hidden_dim, config.dim_feedforward
    enc = nn.TransformerEncoderLayer(d, config.nheads, ffn)
    dec = nn.TransformerDecoderLayer(d, config.nheads, ffn)
    for i in range(config.enc_layers):
        state.update({f"transformer.encoder.layers.{i}.{k}": v.clone() for k, v in enc.state_dict().items()})
    for i in range(config.dec_layers):
        state.update({f"transformer.decoder.layers.{i}.{k}": v.clone() for k, v in dec.state_dict().items()})
    state["transformer.decoder.norm.weight"] = torch.ones(d)
    state["transformer.decoder.norm.bias"] = torch.zeros(d)
    state["class_embed.weight"] = torch.randn(config.num_classes + 1, d)
    state["class_embed.bias"] = torch.randn(config.num_classes + 1)
    for i, (n_in, n_out) in enumerate([(d, d), (d, d), (d, 4)]):
        state[f"bbox_embed.layers.{i}.weight"] = torch.randn(n_out, n_in)
        state[f"bbox_embed.layers.{i}.bias"] = torch.randn(n_out)
    state["query_embed.weight"] = torch.randn(config.num_queries, d)
    state["input_proj.weight"] = torch.randn(d, resnet.fc.in_features, 1, 1)
    state["input_proj.bias"] = torch.randn(d)
    return state


def test_foreign_authors_state_dict_loads_without_missing_keys(tmp_path) -> None:
    config = load_config("detr-tiny")
    state = _authors_state_dict(config)
    path = tmp_path / "authors.pth"
    torch.save({"model": state, "epoch": 3}, path)
    model = convert.load_authors_checkpoint(path, config)  # strict: raises on any mismatch
    ours = model.state_dict()
    native = convert.authors_to_native(state)
    assert set(native) == set(ours)
    assert all(torch.equal(ours[k], native[k]) for k in native)
    assert torch.equal(ours["backbone.body.layer4.1.bn2.running_var"],
                       state["backbone.0.body.layer4.1.bn2.running_var"])


def test_wrapper_prefixes_are_stripped(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("detr-tiny").eval()
    state = {f"module._orig_mod.{k}": v for k, v in convert.native_to_authors(model.state_dict()).items()}
    path = tmp_path / "ddp.pth"
    torch.save({"model": state}, path)
    _outputs_equal(model, convert.load_authors_checkpoint(path, model.config).eval())


def test_mismatched_authors_checkpoint_names_the_keys(tmp_path) -> None:
    config = load_config("detr-tiny")
    state = _authors_state_dict(config)
    del state["transformer.decoder.norm.weight"]
    state["transformer.decoder.norm2.weight"] = torch.ones(config.hidden_dim)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"broken\.pth.*missing keys.*transformer\.decoder\.norm\.weight"
                                              r".*unexpected keys.*transformer\.decoder\.norm2\.weight"):
        convert.load_authors_checkpoint(path, config)
    wrong = load_config("detr-tiny").replace(num_queries=7)
    torch.save({"model": _authors_state_dict(config)}, path)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*query_embed\.weight"):
        convert.load_authors_checkpoint(path, wrong)


@pytest.mark.parametrize("name", ["detr-r50", "detr-r101"])
def test_published_configs_have_the_authors_key_set(name: str) -> None:
    """Every key of the authors' R50/R101 DETR exists in ours with the same shape, and no more."""
    config = load_config(name)
    model = build_model(config)
    ours = convert.native_to_authors(model.state_dict())
    meta = torch.device("meta")
    with meta:
        theirs = _authors_state_dict(config)
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
