"""Small random Hugging Face deformable detectors (no downloads) for the sampled-capture tests.

Each builder returns an eval-mode *ForObjectDetection model of one family with d_model 32,
2 decoder layers and a tiny backbone; every float tensor gets noise ("lively" weights, as in
tests/test_convert_hf.py) so that queries differ and scores spread.
"""
from __future__ import annotations

import torch
import transformers
from transformers import ResNetConfig

from hf_dense_models import liven, perturb

FAMILIES = (
    "deformable_detr", "deformable_detr_box_refine", "deformable_detr_two_stage",
    "rt_detr", "rt_detr_v2", "rt_detr_v2_discrete", "d_fine", "rf_detr",
    "deimv2", "deimv2_dinov3", "deimv2_lite", "lw_detr",
)
LABELS = {0: "circle", 1: "square", 2: "triangle"}


def _lively(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return perturb(model, seed, scale=0.05).eval()


def _resnet(out_features=("stage2", "stage3", "stage4"), config_class=ResNetConfig, **extra):
    return config_class(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                        out_features=list(out_features), **extra)


def deformable_detr(with_box_refine: bool = False, two_stage: bool = False):
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=_resnet(), use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_feature_levels=4, encoder_n_points=2,
        decoder_n_points=2, with_box_refine=with_box_refine, two_stage=two_stage, two_stage_num_proposals=10,
        id2label=LABELS,
    )
    torch.manual_seed(0)
    return _lively(transformers.DeformableDetrForObjectDetection(config), 1)


def _rt_common(**extra):
    return dict(
        encoder_hidden_dim=32, encoder_in_channels=[16, 16, 16], feat_strides=[8, 16, 32], encoder_layers=1,
        encoder_ffn_dim=32, encoder_attention_heads=2, d_model=32, num_queries=10, decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=32, decoder_layers=2, decoder_attention_heads=2, decoder_n_points=2, num_denoising=0,
        anchor_image_size=None, id2label=LABELS, attn_implementation="eager", **extra,
    )


def rt_detr(num_feature_levels: int = 3):
    from transformers.models.rt_detr.configuration_rt_detr_resnet import RTDetrResNetConfig

    backbone = _resnet(config_class=RTDetrResNetConfig, layer_type="basic")
    config = transformers.RTDetrConfig(backbone_config=backbone, num_feature_levels=num_feature_levels, **_rt_common())
    torch.manual_seed(0)
    return _lively(transformers.RTDetrForObjectDetection(config), 2)


def rt_detr_v2(decoder_method: str = "default"):
    from transformers.models.rt_detr.configuration_rt_detr_resnet import RTDetrResNetConfig

    backbone = _resnet(config_class=RTDetrResNetConfig, layer_type="basic")
    config = transformers.RTDetrV2Config(backbone_config=backbone, decoder_method=decoder_method, **_rt_common())
    torch.manual_seed(0)
    return _lively(transformers.RTDetrV2ForObjectDetection(config), 3)


def _hgnet(out_features=("stage2", "stage3", "stage4")):
    return transformers.HGNetV2Config(
        embedding_size=8, depths=[1, 1, 1, 1], hidden_sizes=[16, 16, 16, 16], stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 16, 16], stage_mid_channels=[8, 8, 8, 8], stage_out_channels=[16, 16, 16, 16],
        stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1], out_features=list(out_features),
    )


def d_fine(decoder_n_points=(3, 1, 2), decoder_method: str = "discrete"):
    common = _rt_common(decoder_method=decoder_method)
    common["decoder_n_points"] = list(decoder_n_points)
    config = transformers.DFineConfig(backbone_config=_hgnet(), depth_mult=0.34, hidden_expansion=0.5, **common)
    torch.manual_seed(0)
    return _lively(transformers.DFineForObjectDetection(config), 4)


def deimv2(backbone: str = "hgnet_v2"):
    """DEIMv2 with each backbone transformers offers for it: HGNetV2 (hybrid encoder with AIFI, or
    the "lite" encoder of the Atto / Femto / Pico sizes: two levels, no AIFI) or a DINOv3 ViT
    (patch 16) fused with its spatial tuning adapter."""
    common = _rt_common()
    if backbone == "dinov3":
        vit = transformers.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                           intermediate_size=64, patch_size=16, num_register_tokens=1,
                                           out_features=["stage1", "stage2", "stage3"])
        config = transformers.Deimv2Config(backbone_config=vit, depth_mult=0.34, hidden_expansion=0.5,
                                           spatial_tuning_adapter_inplanes=8, encoder_has_trailing_conv=False,
                                           **common)
    elif backbone == "lite":
        common.update(encoder_in_channels=[16, 16], feat_strides=[16, 32], decoder_in_channels=[32, 32],
                      num_feature_levels=2, decoder_n_points=[3, 1])
        config = transformers.Deimv2Config(backbone_config=_hgnet(("stage3", "stage4")), encoder_type="lite",
                                           depth_mult=0.34, hidden_expansion=0.5, **common)
    else:
        config = transformers.Deimv2Config(backbone_config=_hgnet(), depth_mult=0.34, hidden_expansion=0.5, **common)
    torch.manual_seed(0)
    return _lively(transformers.Deimv2ForObjectDetection(config), 6)


def lw_detr():
    """LW-DETR: a windowed ViT (patch 8, 2 x 2 windows) and two projector levels (scale 2.0 and
    0.5: strides 4 and 16)."""
    from transformers.models.lw_detr.configuration_lw_detr import LwDetrViTConfig

    backbone = LwDetrViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                               image_size=64, pretrain_image_size=64, patch_size=8, out_indices=[1, 2],
                               num_windows=4, window_block_indices=[0])
    config = transformers.LwDetrConfig(
        backbone_config=backbone, projector_scale_factors=[2.0, 0.5], c2f_num_blocks=1, d_model=32,
        decoder_ffn_dim=32, decoder_layers=2, decoder_self_attention_heads=2, decoder_cross_attention_heads=2,
        decoder_n_points=2, num_queries=10, group_detr=1, id2label=LABELS, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LwDetrForObjectDetection(config)
    with torch.no_grad():  # its prior (-log 99) keeps every random score near 0.01: spread them
        model.class_embed.bias.zero_()
    return _lively(model, 9)  # seed 9: both equivalence images keep detections above the gap threshold


def rf_detr():
    from transformers.models.rf_detr.configuration_rf_detr import RfDetrDinov2Config

    backbone = RfDetrDinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                  image_size=64, patch_size=8, out_indices=[1, 2], num_windows=1)
    config = transformers.RfDetrConfig(
        backbone_config=backbone, d_model=32, decoder_ffn_dim=32, decoder_layers=2, decoder_self_attention_heads=2,
        decoder_cross_attention_heads=2, decoder_n_points=2, num_queries=10, group_detr=1, id2label=LABELS,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return _lively(transformers.RfDetrForObjectDetection(config), 5)


def build(family: str):
    """A small lively model of one of `FAMILIES`."""
    builders = {
        "deformable_detr": lambda: deformable_detr(),
        "deformable_detr_box_refine": lambda: deformable_detr(with_box_refine=True),
        "deformable_detr_two_stage": lambda: deformable_detr(with_box_refine=True, two_stage=True),
        "rt_detr": lambda: rt_detr(),
        "rt_detr_v2": lambda: rt_detr_v2(),
        "rt_detr_v2_discrete": lambda: rt_detr_v2("discrete"),
        "d_fine": lambda: d_fine(),
        "rf_detr": lambda: rf_detr(),
        "deimv2": lambda: deimv2(),
        "deimv2_dinov3": lambda: deimv2("dinov3"),
        "deimv2_lite": lambda: deimv2("lite"),
        "lw_detr": lambda: lw_detr(),
    }
    return builders[family]()


def build_lively(family: str):
    """`build(family)` with `hf_dense_models.liven` on top (seed 5): `build`'s weights are only
    slightly perturbed, so scores would tie for the equivalence tests and the bf16 check."""
    return liven(build(family), seed=5)


def batch(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Images 64x96 and 48x64 padded into one (2, 3, 64, 96) batch: (pixel_values, padding_mask True=pad)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(2, 3, 64, 96)
    padding = torch.ones(2, 64, 96, dtype=torch.bool)
    images[0] = torch.randn(3, 64, 96, generator=generator)
    padding[0] = False
    images[1, :, :48, :64] = torch.randn(3, 48, 64, generator=generator)
    padding[1, :48, :64] = False
    return images, padding
