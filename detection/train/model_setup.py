"""The model as training needs it: built from a config or from `init` weights with the class
head following the data, trainable batch norm, frozen backbone, train/eval modes."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.data.coco import LabelMap
from detection.models.detr import DetrConfig
from detection.models.registry import build_model, load_config, load_model, replace_class_head
from detection.train.checkpoint import load_checkpoint
from detection.train.config import PREPROCESSING_FIELDS
from detection.train.export import inference_copy

log = logging.getLogger(__name__)


def unfreeze_batch_norm(module: nn.Module) -> nn.Module:
    """FrozenBatchNorm2d -> trainable nn.BatchNorm2d with the same statistics (in place).

    The inverse of `detection.models.backbone.freeze_batch_norm`: in eval mode the two compute
    the same function, so a model trained this way is saved back with frozen batch norm.
    """
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
            if any(k.endswith("num_batches_tracked") for k in state["model"]):
                unfreeze_batch_norm(model.backbone)  # saved while training batch norm
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
    if config["train_batch_norm"] and not config["freeze_backbone"]:
        unfreeze_batch_norm(model.backbone)
    if config["freeze_backbone"]:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return model


def set_train_mode(model: nn.Module, freeze_backbone: bool) -> None:
    """Training mode, except a frozen backbone (its batch-norm statistics must not move)."""
    model.train()
    if freeze_backbone:
        model.backbone.eval()  # frozen: batch-norm statistics must not move either
