"""DETR assembled from explicit parts: backbone -> input projection -> transformer -> heads.

`DetrConfig` is the one description of a model (it travels with the weights in model.json);
`DETR(config)` builds the network; it implements the Detector contract (models/contract.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from detection.models.backbone import build_backbone
from detection.models.contract import PostprocessRule, PreprocessSpec
from detection.models.detr_inference import prepare_detr_for_inference
from detection.models.outputs import AttentionRecord
from detection.models.position import SinePositionEncoding
from detection.models.transformer import Transformer
from detection.models.transformer_inputs import TransformerInputs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DetrConfig:
    """Everything needed to rebuild a DETR model (not its weights).

    Label index i (0 <= i < num_classes) has name class_names[i] and dataset category id
    category_ids[i]; the classifier has num_classes + 1 outputs, the last is "no object".
    """

    name: str = "detr"
    backbone: str = "resnet50"          # timm model name (resnet* or vit_*)
    backbone_pretrained: bool = False   # load timm's ImageNet weights when building (network)
    dilation: bool = False              # DC5: dilate the last ResNet stage (stride 16)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model args
    num_classes: int = 91
    num_queries: int = 100
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    aux_loss: bool = True
    position_embedding: str = "sine"
    position_temperature: float = 10000.0
    position_normalize: bool = True
    position_scale: float = 2 * math.pi
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    min_size: int = 800
    max_size: int = 1333

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = [f"class_{i}" for i in range(self.num_classes)]
        if not self.category_ids:
            self.category_ids = list(range(self.num_classes))
        self.class_names = [str(n) for n in self.class_names]
        self.category_ids = [int(c) for c in self.category_ids]
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        problems = []
        if len(self.class_names) != self.num_classes:
            problems.append(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")
        if len(self.category_ids) != self.num_classes:
            problems.append(f"{len(self.category_ids)} category_ids for num_classes={self.num_classes}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            problems.append("image_mean and image_std need 3 values (RGB)")
        if self.hidden_dim % self.nheads:
            problems.append(f"hidden_dim {self.hidden_dim} not divisible by nheads {self.nheads}")
        if self.hidden_dim % 2:
            problems.append("hidden_dim must be even (sine position encoding)")
        if self.position_embedding != "sine":
            problems.append(f"position_embedding {self.position_embedding!r} unsupported (only 'sine')")
        if self.dec_layers < 1 or self.enc_layers < 0:
            problems.append("need dec_layers >= 1 and enc_layers >= 0")
        if problems:
            raise ValueError(f"invalid DetrConfig {self.name!r}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> "DetrConfig":
        """Build from a dict; unknown keys are an error naming `origin` (e.g. the file)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{origin}: unknown DetrConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "DetrConfig":
        return dataclasses.replace(self, **changes)


class MLP(nn.Module):
    """Linear layers with ReLU between them (the box head); names as the authors' `layers.N`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def image_sizes_from_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool (True = pad, images at top-left) -> (B, 2) int64 (height, width)."""
    valid = ~padding_mask
    heights = valid.any(dim=2).sum(dim=1)
    widths = valid.any(dim=1).sum(dim=1)
    return torch.stack((heights, widths), dim=1).to(torch.int64)


class DETR(nn.Module):
    """DETR detector. Submodule names follow the authors' (`class_embed`, `bbox_embed`,
    `query_embed`, `input_proj`, `transformer`) except `backbone.body` (authors:
    `backbone.0.body`)."""

    family_name = "DETR (native)"
    attention_kind = "dense"
    gradient_capture = "hooks"

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, dilation=config.dilation,
                                       pretrained=config.backbone_pretrained,
                                       timm_kwargs=config.backbone_kwargs)
        self.position_encoding = SinePositionEncoding(
            config.hidden_dim // 2, temperature=config.position_temperature,
            normalize=config.position_normalize,
            scale=config.position_scale if config.position_normalize else None)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, config.hidden_dim, kernel_size=1)
        self.transformer = Transformer(config.hidden_dim, config.nheads, config.enc_layers,
                                       config.dec_layers, config.dim_feedforward, config.dropout,
                                       config.pre_norm)
        self.query_embed = nn.Embedding(config.num_queries, config.hidden_dim)
        self.class_embed = nn.Linear(config.hidden_dim, config.num_classes + 1)
        self.bbox_embed = MLP(config.hidden_dim, config.hidden_dim, 4, 3)
        # Non-persistent: normalisation is part of the config, not of the weights file.
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_stride(self) -> int:
        return int(self.backbone.feature_stride)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """DETR's input: shortest edge -> config.min_size, longest <= config.max_size, OpenCV
        bilinear without antialias, [0, 1] RGB (mean/std None: the model normalises inside
        with its non-persistent image_mean / image_std buffers), no size divisibility."""
        return PreprocessSpec.shortest_edge(self.config.min_size, self.config.max_size)

    @property
    def postprocess_rule(self) -> PostprocessRule:
        """Softmax over num_classes + 1 logits, "no object" last: one detection per query."""
        return PostprocessRule.softmax_no_object()

    @property
    def supports_padding(self) -> bool:
        """DETR masks padding in attention and position encodings: padded batches are allowed."""
        return True

    def precision_allowed(self, precision: str, device: torch.device) -> bool:
        """Every precision runs (bf16 on the CPU keeps the top detections: tests/test_fast.py)."""
        return True

    def prepare_for_inference(self, device: str | torch.device, precision: str, fold_bn: bool = True,
                              channels_last: bool = True, compile: bool = False) -> nn.Module:
        """A prepared copy for inference (see detr_inference.prepare_detr_for_inference)."""
        return prepare_detr_for_inference(self, device, precision, fold_bn=fold_bn,
                                          channels_last=channels_last, compile=compile)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                cross_attention: bool = False, encoder_attention: bool = False,
                decoder_self_attention: bool = False, keep_features: bool = False) -> dict[str, Any]:
        """Detect objects in a padded batch.

        images: (B, 3, H, W) float RGB in [0, 1], each image at the top-left, padded bottom/right.
        padding_mask: (B, H, W) bool, True on padding (None = no padding).
        cross_attention / encoder_attention / decoder_self_attention: return an AttentionRecord
            (any flag runs the explicit attention path; decoder cross-attention is always in it).

        Returns dict:
            pred_logits (B, Q, num_classes + 1) raw logits, the last class is "no object";
            pred_boxes (B, Q, 4) sigmoid cxcywh normalised to each image's UNPADDED size;
            aux_outputs: list of L_dec - 1 dicts {pred_logits, pred_boxes}, decoder layers 0..L-2;
            attention: AttentionRecord or None. decoder_cross (L_dec, B, heads, Q, h, w) float32;
            keep_features (with a record): the record's `transformer_inputs` are this pass's
            `encode_features` output, for the gradient methods to reuse.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if padding_mask is None:
            padding_mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool,
                                       device=images.device)
        if padding_mask.shape != (images.shape[0], *images.shape[-2:]) or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be bool (B, H, W) = {(images.shape[0], *images.shape[-2:])}, "
                             f"got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        return self.decode_features(self.encode_features(images, padding_mask), cross_attention=cross_attention,
                                    encoder_attention=encoder_attention,
                                    decoder_self_attention=decoder_self_attention, keep_features=keep_features)

    def encode_features(self, images: torch.Tensor, padding_mask: torch.Tensor) -> TransformerInputs:
        """The backbone stage of `forward`: images (B, 3, H, W) in [0, 1] and their padding_mask
        (B, H, W) True = pad -> the projected features, feature mask and position encoding."""
        x = (images - self.image_mean) / self.image_std
        # Padding is 0 AFTER normalisation, like the authors' NestedTensor and HF's processor.
        x = x.masked_fill(padding_mask[:, None], 0.0)
        features, feature_mask = self.backbone(x, padding_mask)
        pos = self.position_encoding(feature_mask).to(features.dtype)
        return TransformerInputs(features=self.input_proj(features), feature_padding_mask=feature_mask, position=pos,
                                 input_size=(int(images.shape[-2]), int(images.shape[-1])),
                                 image_sizes=image_sizes_from_mask(padding_mask))

    def decode_features(self, inputs: TransformerInputs, *, cross_attention: bool = False,
                        encoder_attention: bool = False, decoder_self_attention: bool = False,
                        keep_features: bool = False) -> dict[str, Any]:
        """The transformer and heads of `forward` on `encode_features`' output: `forward`'s
        outputs (flags as there). The gradient methods record a graph over this stage only."""
        want_record = cross_attention or encoder_attention or decoder_self_attention
        feature_mask = inputs.feature_padding_mask
        out = self.transformer(inputs.features, feature_mask, self.query_embed.weight, inputs.position,
                               encoder_attention=encoder_attention,
                               decoder_self_attention=decoder_self_attention,
                               decoder_cross_attention=want_record)
        logits = self.class_embed(out.hidden)
        boxes = self.bbox_embed(out.hidden).sigmoid()
        result: dict[str, Any] = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
            "attention": None,
        }
        if keep_features and not want_record:
            raise ValueError("keep_features puts the features in the attention record: ask for one too")
        if want_record:
            h, w = feature_mask.shape[-2:]
            result["attention"] = AttentionRecord(
                decoder_cross=out.decoder_cross.float().unflatten(-1, (h, w)),
                feature_padding_mask=feature_mask,
                feature_stride=self.feature_stride,
                input_size=inputs.input_size,
                image_sizes=inputs.image_sizes,
                encoder_self=None if out.encoder_self is None else out.encoder_self.float(),
                decoder_self=None if out.decoder_self is None else out.decoder_self.float(),
                transformer_inputs=inputs if keep_features else None,
            )
        return result
