"""Small Hugging Face dense-attention detectors with lively random weights (no download).

Builders for YOLOS, Conditional DETR, DAB-DETR and Table Transformer (d_model 32-64, 2 layers,
10 queries, a tiny HF ResNet backbone config, no pretrained weights); used by tests/test_capture_dense.py and
scripts/hf_bf16_check.py. `liven` adds noise to every float tensor so that queries differ and
scores spread.
"""
from __future__ import annotations

import math

import torch

FAMILIES = ("yolos", "conditional_detr", "dab-detr", "table-transformer")  # config.model_type
NUM_QUERIES = 10
CLASS_NAMES = {0: "circle", 1: "square", 2: "triangle"}


def perturb(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Random init leaves frozen BN at identity and biases at 0: BN variances drawn in [0.5, 1.5]
    and N(0, scale^2) noise on every other float tensor, so that a wrong mapping of any tensor
    shows up in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
    return model


def liven(model: torch.nn.Module, seed: int = 1, gain: float = 1.0, query_key_gain: float = 2.0) -> torch.nn.Module:
    """Add noise to every float tensor so that queries differ and scores spread.

    Linear / conv weights get N(0, (gain / sqrt(fan_in))^2) noise, attention query / key
    projections `query_key_gain` times that (peaked attention, as trained models have; with
    default-initialised projections every query averages the whole memory and all queries look
    alike); other matrices (embeddings) N(0, 1), vectors N(0, 0.1^2); BN variances in [0.5, 1.5].
    """
    gen = torch.Generator().manual_seed(seed)
    matrices = {f"{name}.weight" for name, module in model.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=gen) if tensor.is_floating_point() else None
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif noise is None:
                continue
            elif name in matrices:
                query_key = any(part in name for part in ("q_", "k_", "query", "key"))
                tensor.add_(noise * (query_key_gain if query_key else gain) / math.sqrt(tensor[0].numel()))
            else:
                tensor.add_(noise * (1.0 if tensor.ndim >= 2 else 0.1))
    return model


# Published sizes, for benchmarks (random weights): YOLOS-small (hustvl/yolos-small) and the HF
# config defaults of the others (ResNet-50 from timm, d_model 256, 6 + 6 layers, 8 heads).
_FULL_SIZE = {
    "yolos": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                  image_size=[800, 1333], patch_size=16, num_detection_tokens=100, use_mid_position_embeddings=False),
    "conditional_detr": dict(use_pretrained_backbone=False),
    "dab-detr": dict(use_pretrained_backbone=False),
    "table-transformer": dict(use_pretrained_backbone=False),
}


def _config(family: str, attn_implementation: str | None, full_size: bool = False, **overrides):
    import transformers

    common = dict(id2label=CLASS_NAMES, label2id={v: k for k, v in CLASS_NAMES.items()})
    if attn_implementation is not None:
        common["attn_implementation"] = attn_implementation
    if full_size:
        config_class = getattr(transformers, _CLASSES[family].replace("ForObjectDetection", "Config"))
        return config_class(**{**common, **_FULL_SIZE[family], **overrides})
    if family == "yolos":
        args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=[64, 96], patch_size=8, num_detection_tokens=NUM_QUERIES,
                    use_mid_position_embeddings=True)
        return transformers.YolosConfig(**{**common, **args, **overrides})
    # a tiny HF ResNet (stride 32, 4 stages of one basic block): seconds faster than resnet18 on 2 cores
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                         layer_type="basic", out_features=["stage4"])
    detr_like = dict(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                     encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=NUM_QUERIES)
    if family == "conditional_detr":
        return transformers.ConditionalDetrConfig(**{**common, **detr_like, "d_model": 64, **overrides})
    if family == "table-transformer":
        return transformers.TableTransformerConfig(**{**common, **detr_like, "d_model": 64, **overrides})
    if family == "dab-detr":
        return transformers.DabDetrConfig(**{**common, **detr_like, "hidden_size": 64, **overrides})
    raise ValueError(f"unknown family {family!r}")


_CLASSES = {
    "yolos": "YolosForObjectDetection",
    "conditional_detr": "ConditionalDetrForObjectDetection",
    "dab-detr": "DabDetrForObjectDetection",
    "table-transformer": "TableTransformerForObjectDetection",
}


def build(family: str, attn_implementation: str | None = None, seed: int = 0, full_size: bool = False,
          **overrides) -> torch.nn.Module:
    """A small `family` *ForObjectDetection in eval mode with lively random weights.

    The same seed gives the same weights for every attn_implementation (eager / sdpa).
    full_size: the published architecture's size instead (for benchmarks; slow on CPU).
    """
    import transformers

    torch.manual_seed(seed)
    config = _config(family, attn_implementation, full_size, **overrides)
    model = getattr(transformers, _CLASSES[family])(config)
    return liven(model.eval(), seed=seed + 1)


def batch(sizes=((96, 128), (128, 80)), seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised images padded bottom/right into one batch: (pixel_values, padding_mask True=pad)."""
    gen = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    pixels = torch.zeros(len(sizes), 3, height, width)
    padding = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for index, (h, w) in enumerate(sizes):
        pixels[index, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        padding[index, :h, :w] = False
    return pixels, padding


def image_sizes(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) int64 (h, w) of each image's unpadded top-left block."""
    valid = ~padding_mask
    return torch.stack([valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)], dim=1).long()
