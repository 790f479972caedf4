"""DETR model core: attention paths, attention record geometry, normalisation, backbones."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.models.backbone import ResNetBackbone, freeze_batch_norm
from detection.models.detr import DETR, DetrConfig, image_sizes_from_mask
from detection.models.position import SinePositionEncoding
from detection.models.registry import build_model, load_config
from detection.models.transformer import MultiheadAttention


def _padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, 96x128 and 64x80, padded into one (2, 3, 96, 128) batch."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 96, 128, generator=gen)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:] = True
    mask[1, :, 80:] = True
    images[1][:, mask[1]] = 0
    return images, mask


@pytest.fixture(scope="module")
def tiny_model() -> DETR:
    torch.manual_seed(0)
    return build_model("detr-tiny").eval()


@pytest.mark.parametrize("config_name", ["detr-tiny", "detr-vit-tiny"])
def test_fused_and_explicit_paths_agree(config_name: str) -> None:
    torch.manual_seed(1)
    model = build_model(config_name).eval()
    images, mask = _padded_batch()
    with torch.no_grad():
        fused = model(images, mask)
        explicit = model(images, mask, cross_attention=True, encoder_attention=True, decoder_self_attention=True)
    assert fused["attention"] is None
    assert (fused["pred_logits"] - explicit["pred_logits"]).abs().max() <= 1e-5
    assert (fused["pred_boxes"] - explicit["pred_boxes"]).abs().max() <= 1e-5
    assert len(fused["aux_outputs"]) == model.config.dec_layers - 1
    for a, b in zip(fused["aux_outputs"], explicit["aux_outputs"]):
        assert (a["pred_logits"] - b["pred_logits"]).abs().max() <= 1e-5
        assert (a["pred_boxes"] - b["pred_boxes"]).abs().max() <= 1e-5


def test_attention_record_geometry(tiny_model: DETR) -> None:
    images, mask = _padded_batch()
    with torch.no_grad():
        out = tiny_model(images, mask, cross_attention=True, encoder_attention=True, decoder_self_attention=True)
    record = out["attention"]
    cfg = tiny_model.config
    h, w = 3, 4  # 96/32, 128/32
    assert record.decoder_cross.shape == (cfg.dec_layers, 2, cfg.nheads, cfg.num_queries, h, w)
    assert record.decoder_cross.dtype == torch.float32
    assert record.feature_stride == 32
    assert record.input_size == (96, 128)
    assert record.image_sizes.tolist() == [[96, 128], [64, 80]]
    # nearest downsampling of the pixel mask, as DETR: image 1 covers rows 0-1, cols 0-2
    expected_mask = F.interpolate(mask[None].float(), size=(h, w)).bool()[0]
    assert torch.equal(record.feature_padding_mask, expected_mask)
    assert record.feature_padding_mask[1].logical_not().sum() == 2 * 3
    # every query's weights form a distribution over the real cells; padded cells are exactly 0
    sums = record.decoder_cross.sum(dim=(-2, -1))
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    padded = record.decoder_cross[:, 1][..., record.feature_padding_mask[1]]
    assert padded.numel() > 0 and padded.abs().max() == 0
    assert record.encoder_self.shape == (cfg.enc_layers, 2, cfg.nheads, h * w, h * w)
    enc_padded_keys = record.encoder_self[:, 1][..., record.feature_padding_mask[1].flatten()]
    assert enc_padded_keys.abs().max() == 0
    assert record.decoder_self.shape == (cfg.dec_layers, 2, cfg.nheads, cfg.num_queries, cfg.num_queries)
    # per-head maps are kept, not averaged: heads differ
    assert (record.decoder_cross[:, :, 0] - record.decoder_cross[:, :, 1]).abs().max() > 1e-4
    one = record.select_image(1)
    assert torch.equal(one.decoder_cross[:, 0], record.decoder_cross[:, 1])


def test_multihead_attention_matches_torch() -> None:
    """Same parameters as nn.MultiheadAttention -> same output and per-head weights."""
    torch.manual_seed(2)
    ours = MultiheadAttention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    q, k = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    v = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    ref_out, ref_w = ref(q, k, v, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    out_fused, none = ours(q, k, v, key_padding_mask=pad)
    out_explicit, weights = ours(q, k, v, key_padding_mask=pad, need_weights=True)
    assert none is None
    assert weights.shape == (2, 4, 5, 7)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_explicit, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_fused, ref_out, atol=1e-5, rtol=0)


def test_padding_content_is_ignored(tiny_model: DETR) -> None:
    """Padding is zeroed after normalisation: whatever the padded pixels hold, same output."""
    images, mask = _padded_batch()
    noisy = images.clone()
    noisy[1][:, mask[1]] = torch.rand(3, int(mask[1].sum()))
    with torch.no_grad():
        a = tiny_model(images, mask)
        b = tiny_model(noisy, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_normalisation_inside_model(tiny_model: DETR) -> None:
    """The backbone sees (x - mean) / std with padding 0 (the authors'/HF input)."""
    images, mask = _padded_batch()
    seen = {}

    def capture(module, args):
        seen["x"] = args[0]

    handle = tiny_model.backbone.register_forward_pre_hook(capture)
    with torch.no_grad():
        tiny_model(images, mask)
    handle.remove()
    mean = torch.tensor(tiny_model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_model.config.image_std).view(1, 3, 1, 1)
    expected = ((images - mean) / std) * (~mask[:, None])
    torch.testing.assert_close(seen["x"], expected)
    assert "image_mean" not in tiny_model.state_dict()  # non-persistent buffer


def test_image_sizes_from_mask() -> None:
    _, mask = _padded_batch()
    assert image_sizes_from_mask(mask).tolist() == [[96, 128], [64, 80]]


def test_sine_position_values() -> None:
    """Hand-computed values: position = cumulative count of real cells / extent * 2pi."""
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[0, 3:, :] = True  # 3 real rows
    mask[0, :, 4:] = True  # 4 real cols
    pos = SinePositionEncoding(num_pos_feats=8)(mask)
    assert pos.shape == (1, 16, 4, 6)
    eps = 1e-6
    y = 2 / (3 + eps) * 2 * math.pi  # row 1 -> count 2 of 3 real rows
    x = 3 / (4 + eps) * 2 * math.pi  # col 2 -> count 3 of 4 real cols
    # channel 2k uses sin, 2k+1 cos, with period temperature ** (2k / num_pos_feats)
    assert pos[0, 0, 1, 2].item() == pytest.approx(math.sin(y), abs=1e-6)
    assert pos[0, 1, 1, 2].item() == pytest.approx(math.cos(y), abs=1e-6)
    assert pos[0, 2, 1, 2].item() == pytest.approx(math.sin(y / 10000 ** (2 / 8)), abs=1e-6)
    assert pos[0, 8, 1, 2].item() == pytest.approx(math.sin(x), abs=1e-6)
    assert pos[0, 11, 1, 2].item() == pytest.approx(math.cos(x / 10000 ** (2 / 8)), abs=1e-6)


def test_sine_position_matches_transformers() -> None:
    hf = pytest.importorskip("transformers.models.detr.modeling_detr")
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:] = True
    mask[1, :, 5:] = True
    ours = SinePositionEncoding(num_pos_feats=32)(mask)
    ref = hf.DetrSinePositionEmbedding(32, normalize=True)(
        shape=torch.Size([2, 64, 5, 7]), device="cpu", dtype=torch.float32, mask=~mask)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_frozen_batch_norm_replaces_every_bn() -> None:
    torch.manual_seed(3)
    backbone = ResNetBackbone("resnet18")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    frozen = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(m.eps == 1e-5 for m in frozen)
    # statistics copied: same output as the BN network in eval mode
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.normal_()
    x = torch.randn(1, 3, 8, 8)
    expected = net.eval()(x)
    frozen_net = freeze_batch_norm(net).train()  # training mode must not use batch statistics
    torch.testing.assert_close(frozen_net(x), expected, atol=1e-6, rtol=0)


def test_dc5_matches_torchvision_dilation() -> None:
    """timm output_stride=16 == torchvision replace_stride_with_dilation=[F, F, T] (authors/HF)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(4)
    ours = ResNetBackbone("resnet50", dilation=True).eval()
    assert ours.feature_stride == 16
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True],
                                      norm_layer=FrozenBatchNorm2d).eval()
    state = {k: v for k, v in ours.body.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    x = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        feats, feat_mask = ours(x, mask)
        body = nn.Sequential(*list(ref.children())[:-2])
        expected = body(x)
    assert feats.shape == (1, 2048, 4, 6) and feat_mask.shape == (1, 4, 6)
    torch.testing.assert_close(feats, expected, atol=1e-4, rtol=1e-4)


def test_published_configs_have_authors_hyperparameters() -> None:
    for name, backbone, dilation in [("detr-r50", "resnet50", False), ("detr-r50-dc5", "resnet50", True),
                                     ("detr-r101", "resnet101", False), ("detr-r101-dc5", "resnet101", True)]:
        cfg = load_config(name)
        assert (cfg.backbone, cfg.dilation) == (backbone, dilation)
        assert (cfg.num_classes, cfg.num_queries, cfg.hidden_dim, cfg.nheads) == (91, 100, 256, 8)
        assert (cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.pre_norm) == (6, 6, 2048, False)
        assert cfg.class_names[1] == "person" and cfg.class_names[90] == "toothbrush"
        assert [i for i, n in enumerate(cfg.class_names) if n == "N/A"] == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
        assert cfg.category_ids == list(range(91))
        assert (cfg.min_size, cfg.max_size) == (800, 1333)


def test_config_rejects_bad_input(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_classes: 2\nclass_names: [a, b]\nhidden_sizes: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*hidden_sizes"):
        load_config(bad)
    with pytest.raises(ValueError, match="class_names"):
        DetrConfig(num_classes=3, class_names=["a"])
    with pytest.raises(ValueError, match="no model config"):
        load_config("no-such-config")


def test_bf16_autocast_keeps_float32_attention(tiny_model: DETR) -> None:
    images, mask = _padded_batch()
    with torch.no_grad():
        reference = tiny_model(images, mask, cross_attention=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny_model(images, mask, cross_attention=True)
    record = low["attention"]
    assert record.decoder_cross.dtype == torch.float32
    sums = record.decoder_cross.sum(dim=(-2, -1))
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    # bf16 has ~3 significant digits: loose agreement only
    assert (record.decoder_cross - reference["attention"].decoder_cross).abs().max() < 0.02
    assert (low["pred_boxes"].float() - reference["pred_boxes"]).abs().max() < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_model: DETR) -> None:
    images, mask = _padded_batch()
    with torch.no_grad():
        cpu = tiny_model(images, mask, cross_attention=True)
        gpu_model = tiny_model.to("cuda")
        try:
            fused = gpu_model(images.cuda(), mask.cuda())
            explicit = gpu_model(images.cuda(), mask.cuda(), cross_attention=True)
        finally:
            tiny_model.to("cpu")
    torch.testing.assert_close(fused["pred_logits"].cpu(), explicit["pred_logits"].cpu(), atol=1e-4, rtol=0)
    torch.testing.assert_close(explicit["pred_logits"].cpu(), cpu["pred_logits"], atol=1e-3, rtol=0)
    torch.testing.assert_close(explicit["attention"].decoder_cross.cpu(), cpu["attention"].decoder_cross,
                               atol=1e-4, rtol=0)
