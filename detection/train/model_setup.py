"""The model as training needs it: built from a config or from `init` weights with the class
head following the data, which backbone layers train (and their batch norm), train/eval modes."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.data.coco import LabelMap
from detection.models.backbone import backbone_units, freeze_backbone_layers, trainable_modules
from detection.models.detr import DetrConfig
from detection.models.registry import build_model, load_config, load_model, replace_class_head
from detection.train.checkpoint import load_checkpoint
from detection.train.config import PREPROCESSING_FIELDS
from detection.train.model_export import inference_copy

log = logging.getLogger(__name__)


def unfreeze_batch_norm(module: nn.Module, within: list[str] | None = None) -> nn.Module:
    """FrozenBatchNorm2d -> trainable nn.BatchNorm2d with the same statistics (in place).

    `within`: only inside these submodules (names relative to `module`, e.g. "body.layer2" or
    "body.bn1"); None: everywhere. The inverse of `detection.models.backbone.freeze_batch_norm`:
    in eval mode the two compute the same function, so a model trained this way is saved back
    with frozen batch norm.
    """
    if within is not None:
        for name in within:
            parent_name, _, child_name = name.rpartition(".")
            parent = module.get_submodule(parent_name)
            child = parent.get_submodule(child_name)
            replaced = unfreeze_batch_norm(child)
            if replaced is not child:
                setattr(parent, child_name, replaced)
        return module
    if isinstance(module, FrozenBatchNorm2d):
        bn = nn.BatchNorm2d(module.weight.numel(), eps=module.eps)
        with torch.no_grad():
            bn.weight.copy_(module.weight)
            bn.bias.copy_(module.bias)
            bn.running_mean.copy_(module.running_mean)
            bn.running_var.copy_(module.running_var)
        return bn.to(module.weight.device)
    for name, child in module.named_children():
        replaced = unfreeze_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def backbone_trainable_layers(config: dict[str, Any]) -> int | str | None:
    """The `trainable_layers` in effect: 0 when the backbone does not train (`freeze_backbone`,
    or `lr_backbone` <= 0 as in the authors' code), else config["backbone"]["trainable_layers"]."""
    if config["freeze_backbone"] or float(config["optim"]["lr_backbone"]) <= 0:
        return 0
    return config["backbone"]["trainable_layers"]


def build_training_model(config: dict[str, Any], label_map: LabelMap) -> nn.Module:
    """From scratch (config["model"]) or from `init` weights; the class head follows the data.

    A model whose category ids differ from the dataset's gets a new class head
    (`replace_class_head`), every other weight kept.
    """
    init = config.get("init")
    if init:
        if str(init).endswith(".pt"):
            state = load_checkpoint(init)
            model = build_model(DetrConfig.from_dict(state["model_config"], origin=str(init)))
            trained_bn = [k[len("backbone."):-len(".num_batches_tracked")] for k in state["model"]
                          if k.startswith("backbone.") and k.endswith(".num_batches_tracked")]
            unfreeze_batch_norm(model.backbone, within=trained_bn)  # saved while training them
            model.load_state_dict(state["model"])
            model = inference_copy(model)  # back to frozen batch norm; `train_batch_norm` decides below
        else:
            model = load_model(init)
        overrides = dict(config.get("model_overrides") or {})
        architecture = sorted(set(overrides) - set(PREPROCESSING_FIELDS))
        if architecture:
            raise ValueError(f"model_overrides {architecture} would change the architecture of `init` "
                             f"weights; with `init` only {list(PREPROCESSING_FIELDS)} may change")
        if overrides:  # e.g. fine-tuning at a larger input size: the weights do not depend on it
            model.config = model.config.replace(**overrides)
        if list(model.config.category_ids) != list(label_map.category_ids):
            log.info("replacing the class head: %d -> %d classes", model.config.num_classes, label_map.num_classes)
            replace_class_head(model, list(label_map.class_names), list(label_map.category_ids))
        model.train()
    else:
        model_config = load_config(config["model"]).replace(
            **dict(config.get("model_overrides") or {}),
            num_classes=label_map.num_classes, class_names=list(label_map.class_names),
            category_ids=list(label_map.category_ids))
        model = build_model(model_config)
    trainable_layers = backbone_trainable_layers(config)
    if config["train_batch_norm"]:  # batch norm learns inside the trainable layers only
        unfreeze_batch_norm(model.backbone, within=trainable_modules(model.backbone, trainable_layers))
    trainable = freeze_backbone_layers(model.backbone, trainable_layers)
    log.info("backbone: %s trainable", ", ".join(trainable) if trainable else "nothing")
    return model


def set_train_mode(model: nn.Module, freeze_backbone: bool = False) -> None:
    """Training mode, except the backbone units with no trainable parameter (frozen layers run as
    at inference: no dropout, no batch-norm statistics); `freeze_backbone`: the whole backbone."""
    model.train()
    if freeze_backbone:
        model.backbone.eval()
        return
    for unit in backbone_units(model.backbone):
        modules = [model.backbone.get_submodule(name) for name in unit]
        if not any(p.requires_grad for m in modules for p in m.parameters()):
            for m in modules:
                m.eval()
