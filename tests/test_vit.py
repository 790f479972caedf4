"""ViT backbone path: features equal timm's own, padding tokens masked, full DETR round trip."""
from __future__ import annotations

import timm
import torch

from detection.models.backbone import ViTBackbone
from detection.models.registry import build_model, load_model, save_model


def test_vit_features_equal_timm() -> None:
    torch.manual_seed(5)
    backbone = ViTBackbone("vit_tiny_patch16_224").eval()
    assert backbone.feature_stride == 16
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                  dynamic_img_size=True)
    reference.load_state_dict(backbone.body.state_dict())
    reference.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats, feat_mask = backbone(x, torch.zeros(2, 64, 96, dtype=torch.bool))
        tokens = reference.forward_features(x)
    patches = tokens[:, reference.num_prefix_tokens:]
    expected = patches.reshape(2, 4, 6, 192).permute(0, 3, 1, 2)
    assert feats.shape == (2, 192, 4, 6) and not feat_mask.any()
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=0)


def test_vit_padding_tokens_are_masked() -> None:
    """Padding tokens cannot influence real tokens: real cells identical for any pad content."""
    torch.manual_seed(6)
    backbone = ViTBackbone("vit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[:, :, 48:] = True
    y = x.clone()
    y[..., 48:] = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        a, fm = backbone(x, mask)
        b, _ = backbone(y, mask)
    assert fm[0].logical_not().sum() == 4 * 3
    torch.testing.assert_close(a[..., ~fm[0]], b[..., ~fm[0]], atol=1e-5, rtol=0)


def test_vit_detr_geometry_and_round_trip(tmp_path) -> None:
    torch.manual_seed(7)
    model = build_model("detr-vit-tiny").eval()
    assert model.feature_stride == 16
    images = torch.rand(2, 3, 72, 100, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 72, 100, dtype=torch.bool)
    mask[1, 40:] = True
    with torch.no_grad():
        out = model(images, mask, cross_attention=True)
    record = out["attention"]
    # ceil(72 / 16) x ceil(100 / 16): timm pads the input to whole patches
    assert record.feature_size == (5, 7) and record.feature_stride == 16
    assert record.decoder_cross.shape == (2, 2, 4, 20, 5, 7)
    loaded = load_model(save_model(model, tmp_path / "vit"))
    with torch.no_grad():
        again = loaded(images, mask, cross_attention=True)
    assert torch.equal(again["pred_logits"], out["pred_logits"])
    assert torch.equal(again["attention"].decoder_cross, record.decoder_cross)


def test_vit_feature_mask_is_exact_patch_geometry() -> None:
    """Cell (y, x) is padding iff patch [16y, 16y+16) x [16x, 16x+16) holds no real pixel."""
    backbone = ViTBackbone("vit_tiny_patch16_224").eval()
    mask = torch.ones(1, 72, 100, dtype=torch.bool)
    mask[0, :60, :33] = False  # real image 60 x 33 -> patches rows 0..3 (60 > 48), cols 0..2 (33 > 32)
    with torch.no_grad():
        _, feature_mask = backbone(torch.zeros(1, 3, 72, 100), mask)
    expected = torch.ones(5, 7, dtype=torch.bool)
    expected[:4, :3] = False
    assert torch.equal(feature_mask[0], expected)
