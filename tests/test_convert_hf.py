"""Equivalence with Hugging Face transformers' DetrForObjectDetection (random weights, no download).

The HF model is saved with save_pretrained (the Hub layout users download), converted with our
converter, and both models run on the same padded batch of two differently sized images.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_dense_models import perturb  # noqa: E402

from detection.models import convert  # noqa: E402
from detection.models.registry import load_model  # noqa: E402


def _hf_model(dilation: bool = False):
    config = transformers.DetrConfig(
        use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, dilation=dilation,
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10,
        id2label={0: "circle", 1: "square", 2: "triangle"}, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(config).eval()
    perturb(model, seed=1, scale=0.05)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Images 96x128 and 128x80 padded into one (2, 3, 128, 128) batch, [0, 1] RGB."""
    gen = torch.Generator().manual_seed(2)
    images = torch.zeros(2, 3, 128, 128)
    mask = torch.ones(2, 128, 128, dtype=torch.bool)
    images[0, :, :96, :128] = torch.rand(3, 96, 128, generator=gen)
    mask[0, :96, :128] = False
    images[1, :, :128, :80] = torch.rand(3, 128, 80, generator=gen)
    mask[1, :128, :80] = False
    return images, mask


@pytest.mark.parametrize("dilation", [False, True], ids=["c5", "dc5"])
def test_matches_hf_detr(tmp_path, dilation: bool) -> None:
    hf = _hf_model(dilation)
    hf.save_pretrained(tmp_path / "hf")
    native_dir = convert.convert_to_native(tmp_path / "hf", tmp_path / "native")
    ours = load_model(native_dir)
    assert ours.config.dilation is dilation and ours.feature_stride == (16 if dilation else 32)
    assert ours.config.class_names == ["circle", "square", "triangle"]

    images, mask = _batch()
    mean = torch.tensor(ours.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ours.config.image_std).view(1, 3, 1, 1)
    # HF's processor normalises, then zero-pads; its pixel_mask is 1 on REAL pixels.
    pixel_values = ((images - mean) / std) * (~mask[:, None])
    with torch.no_grad():
        ref = hf(pixel_values=pixel_values, pixel_mask=(~mask).long(), output_attentions=True)
        out = ours(images, mask, cross_attention=True)
        fused = ours(images, mask)
    assert (out["pred_logits"] - ref.logits).abs().max() <= 1e-4
    assert (out["pred_boxes"] - ref.pred_boxes).abs().max() <= 1e-4
    assert (fused["pred_logits"] - ref.logits).abs().max() <= 1e-4
    assert (fused["pred_boxes"] - ref.pred_boxes).abs().max() <= 1e-4

    record = out["attention"]
    h, w = record.feature_size
    assert len(ref.cross_attentions) == 2
    for layer, ref_attn in enumerate(ref.cross_attentions):
        # HF: (B, heads, Q, h*w) per layer, not averaged over heads
        assert ref_attn.shape == (2, 2, 10, h * w)
        ours_attn = record.decoder_cross[layer].flatten(-2)
        assert (ours_attn - ref_attn).abs().max() <= 1e-5
    # the padded image really has padded feature cells, and both agree they get 0 weight
    assert record.feature_padding_mask[0].any() and record.feature_padding_mask[1].any()


def test_hf_in_memory_layout_is_accepted() -> None:
    """transformers 5 renames keys in memory (backbone.model, o_proj, mlp.fc1): same result."""
    hf = _hf_model()
    from_memory = convert.hf_to_native(hf.state_dict())
    # build the Hub layout by hand from the in-memory names
    hub = {}
    for key, value in hf.state_dict().items():
        key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")
        hub[key] = value
    from_hub = convert.hf_to_native(hub)
    assert from_memory.keys() == from_hub.keys()
    assert all(torch.equal(from_memory[k], from_hub[k]) for k in from_hub)
    assert "transformer.decoder.layers.1.multihead_attn.in_proj_weight" in from_hub


def test_hf_unknown_key_is_reported() -> None:
    with pytest.raises(ValueError, match="model.backbone.position_embedding.row_embeddings.weight"):
        convert.hf_to_native({"model.backbone.position_embedding.row_embeddings.weight": torch.zeros(2)})


def test_hf_config_mapping() -> None:
    hf_config = {
        "model_type": "detr", "use_timm_backbone": True, "backbone": "resnet101", "dilation": True,
        "d_model": 256, "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_layers": 6,
        "decoder_layers": 6, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "num_queries": 100,
        "id2label": {str(i): ("N/A" if i == 0 else f"c{i}") for i in range(91)},
    }
    pre = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
           "size": {"shortest_edge": 640, "longest_edge": 1000}}
    cfg = convert.hf_config_to_detr_config(hf_config, pre)
    assert (cfg.backbone, cfg.dilation, cfg.num_classes, cfg.num_queries) == ("resnet101", True, 91, 100)
    assert cfg.class_names[0] == "N/A" and cfg.class_names[90] == "c90" and cfg.category_ids[90] == 90
    assert (cfg.min_size, cfg.max_size, cfg.image_mean) == (640, 1000, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="learned"):
        convert.hf_config_to_detr_config({**hf_config, "position_embedding_type": "learned"})
    with pytest.raises(ValueError, match="use_timm_backbone"):
        convert.hf_config_to_detr_config({**hf_config, "use_timm_backbone": False})
