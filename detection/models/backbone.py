"""Image backbones through timm: ResNet (frozen batch norm, optional DC5 dilation) and ViT.

Each backbone maps normalised images (B, 3, H, W) + padding mask (B, H, W) (True = pad) to one
feature map (B, C, h, w) + the feature-level padding mask (B, h, w) and reports its
`feature_stride` (input pixels per feature cell) and `num_channels`.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

# DETR (models/backbone.py) uses its own FrozenBatchNorm2d with eps=1e-5; torchvision's class
# computes the same affine transform, so state dicts (weight, bias, running_mean, running_var)
# map 1:1.
FROZEN_BN_EPS = 1e-5


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d in `module` (recursively, in place) by FrozenBatchNorm2d.

    The statistics and affine parameters are copied, so a pretrained network keeps its output.
    Returns the module (or the replacement, if `module` itself is a BatchNorm2d).
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=FROZEN_BN_EPS)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def downsample_padding_mask(padding_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool -> (B, h, w) bool by nearest interpolation, exactly as DETR does."""
    return F.interpolate(padding_mask[None].float(), size=size).bool()[0]


class ResNetBackbone(nn.Module):
    """timm ResNet, last stage only, batch norm frozen.

    `dilation=True` (DC5) dilates the last stage instead of striding it: output stride 16.
    timm's `output_stride=16` gives the first block of layer4 dilation 1 and stride 1 and the
    following blocks dilation 2, the same as torchvision's
    `replace_stride_with_dilation=[False, False, True]` used by the DETR authors and HF.

    Parameter names under `body.` are torchvision's (conv1, bn1, layer1..layer4), so the
    authors' `backbone.0.body.*` keys map by prefix only.
    """

    def __init__(self, name: str, dilation: bool = False, pretrained: bool = False,
                 frozen_batch_norm: bool = True, timm_kwargs: dict | None = None) -> None:
        super().__init__()
        kwargs = dict(timm_kwargs or {})
        if dilation:
            kwargs["output_stride"] = 16
        body = timm.create_model(name, pretrained=pretrained, features_only=True,
                                 out_indices=(4,), **kwargs)
        if frozen_batch_norm:
            body = freeze_batch_norm(body)
        self.body = body
        self.num_channels = int(body.feature_info.channels()[-1])
        self.feature_stride = int(body.feature_info.reduction()[-1])

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), padding_mask (B, H, W) -> features (B, C, h, w), mask (B, h, w)."""
        features = self.body(images)[-1]
        return features, downsample_padding_mask(padding_mask, features.shape[-2:])


class ViTBackbone(nn.Module):
    """timm Vision Transformer; the patch tokens (prefix tokens dropped) reshaped to (h, w).

    `dynamic_img_size=True` resamples the position embedding to each input's patch grid and
    `dynamic_img_pad=True` zero-pads the input at the bottom/right to a multiple of the patch
    size, so any input size works; h = ceil(H / patch), w = ceil(W / patch).
    Patch tokens that lie entirely on padding are masked out of the ViT's self-attention, and
    the feature padding mask is exact: a cell is padding iff its patch holds no real pixel.
    """

    def __init__(self, name: str, pretrained: bool = False, timm_kwargs: dict | None = None) -> None:
        super().__init__()
        self.body = timm.create_model(name, pretrained=pretrained, num_classes=0,
                                      dynamic_img_size=True, dynamic_img_pad=True,
                                      **(timm_kwargs or {}))
        patch = self.body.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"ViT backbone {name!r} has non-square patches {patch}")
        self.num_channels = int(self.body.embed_dim)
        self.feature_stride = int(patch[0])
        self.num_prefix_tokens = int(self.body.num_prefix_tokens)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        stride = self.feature_stride
        return -(-height // stride), -(-width // stride)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), padding_mask (B, H, W) -> features (B, C, h, w), mask (B, h, w)."""
        batch = images.shape[0]
        h, w = self.grid_size(images.shape[-2], images.shape[-1])
        # A patch is padding iff its top-left pixel is (images sit at the top-left), i.e. it
        # holds no real pixel: exact for the stride geometry, unlike DETR's nearest resize.
        feature_mask = padding_mask[:, ::self.feature_stride, ::self.feature_stride]
        attn_mask = None
        if bool(feature_mask.any()):
            # SDPA bool semantics: True = may be attended to. Prefix tokens always may.
            keep = torch.cat([
                feature_mask.new_ones((batch, self.num_prefix_tokens)),
                ~feature_mask.flatten(1),
            ], dim=1)
            attn_mask = keep[:, None, None, :]
        tokens = self.body.forward_features(images, attn_mask=attn_mask)
        patches = tokens[:, self.num_prefix_tokens:]
        features = patches.transpose(1, 2).reshape(batch, self.num_channels, h, w)
        return features, feature_mask


def build_backbone(name: str, dilation: bool = False, pretrained: bool = False,
                   timm_kwargs: dict | None = None) -> nn.Module:
    """A ResNet (`resnet*`) or ViT (`vit_*`) backbone by timm model name.

    `timm_kwargs` go to `timm.create_model` unchanged (architecture arguments such as a
    ResNet's `channels=(32, 64, 128, 256)` or a ViT's `embed_dim`); an argument timm does not
    know raises timm's TypeError.
    """
    if name.startswith("vit_"):
        if dilation:
            raise ValueError(f"dilation (DC5) is only defined for ResNet backbones, not {name!r}")
        return ViTBackbone(name, pretrained=pretrained, timm_kwargs=timm_kwargs)
    if "resnet" in name:
        return ResNetBackbone(name, dilation=dilation, pretrained=pretrained, timm_kwargs=timm_kwargs)
    raise ValueError(f"unsupported backbone {name!r}: expected a timm resnet* or vit_* model name")


# -- which parts of a backbone train --------------------------------------------------------
# The DETR authors (models/backbone.py) and torchvision's detection models train only ResNet
# layers 2-4 when the backbone trains: the stride-4 stem and layer1 stay frozen, as does batch
# norm. `trainable_layers` counts units from the top (torchvision's convention):
#   ResNet, 5 units: layer4, layer3, layer2, layer1, stem (conv1 + bn1); 3 = the authors' rule.
#   ViT, depth + 1 units: the last block (with the final norm after the blocks), the block
#   below it, ..., the first block, then the embeddings (patch and position embedding, prefix
#   tokens); the default trains them all (ViT detectors fine-tune the whole ViT).
RESNET_DEFAULT_TRAINABLE_LAYERS = 3
_VIT_TOP = ("norm", "fc_norm", "head_drop", "head", "attn_pool")  # timm ViT modules after blocks


def backbone_units(backbone: nn.Module) -> list[list[str]]:
    """The backbone's freezable units, top (deepest) first; each a list of module names
    relative to `backbone` (e.g. ["body.layer4"], or ["body.conv1", "body.bn1"] for the stem)."""
    if isinstance(backbone, ResNetBackbone):
        return [["body.layer4"], ["body.layer3"], ["body.layer2"], ["body.layer1"], ["body.conv1", "body.bn1"]]
    if isinstance(backbone, ViTBackbone):
        children = [name for name, _ in backbone.body.named_children()]
        depth = len(backbone.body.blocks)
        top = [f"body.blocks.{depth - 1}"] + [f"body.{n}" for n in children if n in _VIT_TOP]
        blocks = [[f"body.blocks.{i}"] for i in range(depth - 2, -1, -1)]
        embeddings = [f"body.{n}" for n in children if n != "blocks" and n not in _VIT_TOP]
        embeddings += [f"body.{n}" for n, _ in backbone.body.named_parameters(recurse=False)]  # tokens
        return [top, *blocks, embeddings]
    raise TypeError(f"no freezing rule for backbone {type(backbone).__name__}")


def resolve_trainable_layers(backbone: nn.Module, trainable_layers: int | str | None) -> int:
    """`trainable_layers` as a unit count: None -> the family default (ResNet 3, ViT all),
    "all" -> every unit; an integer outside 0..len(units) raises ValueError."""
    units = len(backbone_units(backbone))
    if trainable_layers is None:
        trainable_layers = RESNET_DEFAULT_TRAINABLE_LAYERS if isinstance(backbone, ResNetBackbone) else "all"
    if trainable_layers == "all":
        return units
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) \
            or not 0 <= trainable_layers <= units:
        raise ValueError(f"backbone.trainable_layers must be an integer 0..{units} or 'all' for "
                         f"{type(backbone).__name__}, got {trainable_layers!r}")
    return trainable_layers


def trainable_modules(backbone: nn.Module, trainable_layers: int | str | None) -> list[str]:
    """Names (relative to `backbone`) of the modules that train under `trainable_layers`."""
    count = resolve_trainable_layers(backbone, trainable_layers)
    return [name for unit in backbone_units(backbone)[:count] for name in unit]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_backbone_layers(backbone: nn.Module, trainable_layers: int | str | None) -> list[str]:
    """requires_grad False on every backbone parameter outside the trainable units (in place);
    returns the trainable module names. With every unit trainable nothing is frozen."""
    everything = resolve_trainable_layers(backbone, trainable_layers) == len(backbone_units(backbone))
    trainable = trainable_modules(backbone, trainable_layers)
    for name, parameter in backbone.named_parameters():
        if not everything and not _under(name, trainable):
            parameter.requires_grad_(False)
    return trainable
