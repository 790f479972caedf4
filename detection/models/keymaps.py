"""Key maps between our DETR and foreign checkpoints (DETR authors', Hugging Face), and configs
inferred from foreign checkpoints: pure functions over state dicts and config dicts, no file IO.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from detection.models.checkpoint_io import strip_wrapper_prefixes
from detection.models.configs import load_config
from detection.models.detr import DetrConfig

# * authors (facebookresearch/detr): file `{"model": state_dict}`; our names equal theirs except
#   the backbone prefix `backbone.0.body.` (ours: `backbone.body.`).
# * HF Hub layout (what `save_pretrained` writes): `model.backbone.conv_encoder.model.*`, separate
#   q/k/v projections, `fc1/fc2`, `*_layer_norm`, `encoder_attn`, ...; transformers 5 renames some
#   keys in memory (`backbone.model`, `o_proj`, `mlp.fc1`); both layouts are accepted.
AUTHORS_BACKBONE_PREFIX = "backbone.0.body."
NATIVE_BACKBONE_PREFIX = "backbone.body."
HF_BACKBONE_PREFIX = "model.backbone.conv_encoder.model."

# ---------------------------------------------------------------------------------------------
# authors <-> native


def authors_to_native(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' key names -> native key names (wrapper prefixes stripped first)."""
    out = {}
    for key, value in strip_wrapper_prefixes(state_dict).items():
        if key.startswith(AUTHORS_BACKBONE_PREFIX):
            key = NATIVE_BACKBONE_PREFIX + key[len(AUTHORS_BACKBONE_PREFIX):]
        out[key] = value
    return out


def native_to_authors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native key names -> authors' key names."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(NATIVE_BACKBONE_PREFIX):
            key = AUTHORS_BACKBONE_PREFIX + key[len(NATIVE_BACKBONE_PREFIX):]
        out[key] = value
    return out


# transformers 5 in-memory names -> Hub names (save_pretrained applies the same reversal).
_HF_MEMORY_TO_HUB = [
    (re.compile(r"^model\.backbone\.model\."), HF_BACKBONE_PREFIX),
    (re.compile(r"\.o_proj\."), ".out_proj."),
    (re.compile(r"\.mlp\.fc([12])\."), r".fc\1."),
]

_HF_ENCODER_LAYER = {
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "fc1": "linear1",
    "fc2": "linear2",
    "final_layer_norm": "norm2",
}
_HF_DECODER_LAYER = {
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "encoder_attn.out_proj": "multihead_attn.out_proj",
    "encoder_attn_layer_norm": "norm2",
    "fc1": "linear1",
    "fc2": "linear2",
    "final_layer_norm": "norm3",
}
_HF_TOP = {
    "model.input_projection": "input_proj",
    "model.query_position_embeddings": "query_embed",
    "model.decoder.layernorm": "transformer.decoder.norm",
    "class_labels_classifier": "class_embed",
}
_HF_LAYER_RE = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_QKV_RE = re.compile(r"^(self_attn|encoder_attn)\.([qkv])_proj$")


def hf_to_native(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF DetrForObjectDetection state dict (Hub or transformers-5 in-memory layout) -> native.

    q/k/v projections are concatenated (q, k, v order) into in_proj_weight / in_proj_bias.
    Frozen batch norm's `num_batches_tracked` counters (no effect on the output) are dropped.
    Any key that has no native counterpart raises ValueError naming it.
    """
    hub: dict[str, torch.Tensor] = {}
    for key, value in strip_wrapper_prefixes(state_dict).items():
        for pattern, repl in _HF_MEMORY_TO_HUB:
            key = pattern.sub(repl, key)
        hub[key] = value

    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in hub.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(HF_BACKBONE_PREFIX):
            out[NATIVE_BACKBONE_PREFIX + key[len(HF_BACKBONE_PREFIX):]] = value
            continue
        if key.startswith("bbox_predictor.layers."):
            out["bbox_embed." + key[len("bbox_predictor."):]] = value
            continue
        stem, _, leaf = key.rpartition(".")
        if stem in _HF_TOP:
            out[f"{_HF_TOP[stem]}.{leaf}"] = value
            continue
        match = _HF_LAYER_RE.match(key)
        if match:
            part, index, module, leaf = match.groups()
            table = _HF_ENCODER_LAYER if part == "encoder" else _HF_DECODER_LAYER
            prefix = f"transformer.{part}.layers.{index}."
            qkv_match = _HF_QKV_RE.match(module)
            if qkv_match:
                attn = "self_attn" if qkv_match.group(1) == "self_attn" else "multihead_attn"
                qkv.setdefault((prefix + attn, leaf, part, index), {})[qkv_match.group(2)] = value
                continue
            if module in table:
                out[f"{prefix}{table[module]}.{leaf}"] = value
                continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"HF keys with no native counterpart ({len(unknown)}): {sorted(unknown)[:20]}")
    for (attn_prefix, leaf, _, _), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{attn_prefix}: incomplete q/k/v projections, have {sorted(parts)}")
        out[f"{attn_prefix}.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def hf_config_to_detr_config(hf_config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None,
                             name: str = "hf-detr", origin: str = "config.json") -> DetrConfig:
    """HF DetrConfig (config.json dict) [+ preprocessor_config.json dict] -> our DetrConfig.

    Reads: id2label, backbone (timm name; old `backbone` + `use_timm_backbone` or transformers-5
    `backbone_config` of type timm_backbone), dilation (or output_stride 16), d_model, heads,
    layers, FFN size, num_queries, dropout; mean/std and shortest/longest edge from the
    preprocessor config when given. Unsupported variants raise ValueError naming `origin`.
    """
    def fail(reason: str) -> ValueError:
        return ValueError(f"{origin}: {reason}")

    if hf_config.get("model_type", "detr") != "detr":
        raise fail(f"model_type {hf_config.get('model_type')!r} is not 'detr'")
    backbone_config = hf_config.get("backbone_config") or {}
    if backbone_config:
        if backbone_config.get("model_type") != "timm_backbone":
            raise fail(f"backbone_config of type {backbone_config.get('model_type')!r} is not supported; "
                       "only timm ResNet backbones (use_timm_backbone=True, as the published DETRs)")
        backbone = backbone_config.get("backbone")
        dilation = bool(hf_config.get("dilation")) or backbone_config.get("output_stride") == 16
    else:
        if hf_config.get("use_timm_backbone", True) is False:
            raise fail("use_timm_backbone=False (HF ResNet backbone) is not supported")
        backbone = hf_config.get("backbone") or "resnet50"
        dilation = bool(hf_config.get("dilation"))
    if not backbone or "resnet" not in backbone:
        raise fail(f"backbone {backbone!r} is not a timm ResNet")
    if hf_config.get("position_embedding_type", "sine") != "sine":
        raise fail(f"position_embedding_type {hf_config.get('position_embedding_type')!r} is not supported")
    if hf_config.get("activation_function", "relu") != "relu":
        raise fail(f"activation_function {hf_config.get('activation_function')!r} is not supported")
    heads = {hf_config.get("encoder_attention_heads", 8), hf_config.get("decoder_attention_heads", 8)}
    ffn = {hf_config.get("encoder_ffn_dim", 2048), hf_config.get("decoder_ffn_dim", 2048)}
    if len(heads) != 1 or len(ffn) != 1:
        raise fail("different encoder/decoder head counts or FFN sizes are not supported")
    id2label = hf_config.get("id2label") or {}
    if not id2label:
        raise fail("no id2label: cannot name the classes")
    indices = sorted(int(k) for k in id2label)
    if indices != list(range(len(indices))):
        raise fail(f"id2label keys are not 0..{len(indices) - 1}")
    class_names = [str(id2label.get(str(i), id2label.get(i))) for i in indices]
    kwargs: dict[str, Any] = dict(
        name=name, backbone=backbone, dilation=dilation, num_classes=len(class_names),
        num_queries=int(hf_config.get("num_queries", 100)), hidden_dim=int(hf_config.get("d_model", 256)),
        nheads=int(heads.pop()), enc_layers=int(hf_config.get("encoder_layers", 6)),
        dec_layers=int(hf_config.get("decoder_layers", 6)), dim_feedforward=int(ffn.pop()),
        dropout=float(hf_config.get("dropout", 0.1)), pre_norm=False,
        aux_loss=True,  # we always return per-layer outputs; HF computes them only for the loss
        class_names=class_names, category_ids=list(range(len(class_names))),
    )
    if preprocessor:
        if preprocessor.get("image_mean"):
            kwargs["image_mean"] = tuple(preprocessor["image_mean"])
        if preprocessor.get("image_std"):
            kwargs["image_std"] = tuple(preprocessor["image_std"])
        size = preprocessor.get("size") or {}
        if isinstance(size, Mapping) and size.get("shortest_edge"):
            kwargs["min_size"] = int(size["shortest_edge"])
            if size.get("longest_edge"):
                kwargs["max_size"] = int(size["longest_edge"])
    return DetrConfig(**kwargs)


def infer_authors_config(state_dict: Mapping[str, torch.Tensor], file_name: str = "") -> DetrConfig:
    """A DetrConfig for an authors' checkpoint when none is given: sizes read from the weights.

    The number of heads is not recoverable from weights (8, as every published DETR), and
    DC5 is not either: it is taken from 'dc5' in the file name. Pass a config to be explicit.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"{file_name}: not a DETR checkpoint in the authors' format (no {key!r})")
        return tuple(state_dict[key].shape)

    num_classes = shape("class_embed.weight")[0] - 1
    num_queries, hidden = shape("query_embed.weight")
    blocks3 = {int(k.split(".")[4]) for k in state_dict if k.startswith(AUTHORS_BACKBONE_PREFIX + "layer3.")}
    bottleneck = AUTHORS_BACKBONE_PREFIX + "layer1.0.conv3.weight" in state_dict
    depth = {(True, 6): "resnet50", (True, 23): "resnet101", (True, 36): "resnet152",
             (False, 2): "resnet18", (False, 6): "resnet34"}.get((bottleneck, len(blocks3)))
    if depth is None:
        raise ValueError(f"{file_name}: unrecognised ResNet backbone ({len(blocks3)} layer3 blocks)")
    enc = len({k.split(".")[3] for k in state_dict if k.startswith("transformer.encoder.layers.")})
    dec = len({k.split(".")[3] for k in state_dict if k.startswith("transformer.decoder.layers.")})
    ffn = shape("transformer.decoder.layers.0.linear1.weight")[0]
    pre_norm = "transformer.encoder.norm.weight" in state_dict
    dilation = "dc5" in file_name.lower()
    base = {}
    if num_classes == 91:
        coco = load_config("detr-r50")
        base = {"class_names": coco.class_names, "category_ids": coco.category_ids}
    return DetrConfig(name=Path(file_name).stem or "detr", backbone=depth, dilation=dilation,
                      num_classes=num_classes, num_queries=num_queries, hidden_dim=hidden,
                      nheads=8, enc_layers=enc, dec_layers=dec, dim_feedforward=ffn, pre_norm=pre_norm,
                      **base)
