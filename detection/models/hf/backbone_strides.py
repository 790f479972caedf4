"""Feature strides of the parts of an HF deformable detector that do not say them: an HF (non-timm)
backbone's outputs, from its config, and an extra level's projection, from its first convolution."""
from __future__ import annotations

from torch import nn


def first_conv_stride(module: nn.Module) -> int:
    """The stride of the first convolution inside `module` (ValueError when it has none)."""
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            return int(child.stride[0])
    raise ValueError(f"no convolution found in the extra-level projection {type(module).__name__}")


def hf_backbone_strides(backbone: nn.Module) -> list[int]:
    """Strides of an HF (non-timm) backbone's outputs, from its config (ResNet-like stem + stages, Swin)."""
    config = backbone.config
    if config.model_type == "swin":  # Grounding DINO's: stage k at patch_size * 2^(k-1)
        patch = int(config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0])
        return [patch * 2 ** (int(name.removeprefix("stage")) - 1) for name in backbone.out_features]
    if config.model_type not in ("resnet", "rt_detr_resnet"):
        raise ValueError(
            f"cannot derive feature strides of a {config.model_type!r} backbone; supported: timm backbones, "
            "HF ResNet"
        )
    stride, strides = 4, {}  # stem: stride-2 convolution + stride-2 max pool
    for index in range(len(config.depths)):
        if index > 0 or getattr(config, "downsample_in_first_stage", False):
            stride *= 2
        strides[f"stage{index + 1}"] = stride
    return [strides[name] for name in backbone.out_features]
