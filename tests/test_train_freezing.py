"""Which backbone parameters train: the DETR authors' rule (ResNet layers 2-4) by default,
torchvision's `trainable_layers` 0-5 convention, the ViT rule, batch norm, train/eval modes."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.data.coco import LabelMap
from detection.models.backbone import backbone_units
from detection.train.checkpoint import load_checkpoint, save_checkpoint
from detection.train.config import load_train_config
from detection.train.model_setup import build_training_model, set_train_mode

LABELS = LabelMap((1, 2, 3), ("circle", "square", "triangle"))
DATA = ["data.train_images=a", "data.train_annotations=b"]


def _model(*overrides: str, model: str = "detr-tiny"):
    torch.manual_seed(0)
    return build_training_model(load_train_config(None, [*DATA, f"model={model}", *overrides]), LABELS)


def _backbone_names(model, trainable: bool | None = None) -> set[str]:
    """Backbone parameter names without the "backbone.body." prefix: the authors' and
    torchvision's ResNet names (conv1, bn1, layer1..layer4)."""
    return {name.removeprefix("backbone.body.") for name, p in model.named_parameters()
            if name.startswith("backbone.") and (trainable is None or p.requires_grad == trainable)}


def _torchvision_trainable(trainable_layers: int) -> set[str]:
    """torchvision's own rule, applied by torchvision to its ResNet-18 with frozen batch norm."""
    backbone = _resnet_fpn_extractor(resnet18(norm_layer=FrozenBatchNorm2d), trainable_layers)
    return {name.removeprefix("body.") for name, p in backbone.named_parameters()
            if name.startswith("body.") and p.requires_grad}


def _authors_trainable(names: set[str], train_backbone: bool = True) -> set[str]:
    """facebookresearch/detr models/backbone.py: only names holding layer2/3/4 train."""
    return {n for n in names if train_backbone and ("layer2" in n or "layer3" in n or "layer4" in n)}


def test_default_is_the_authors_rule_layers_2_to_4():
    model = _model()  # detr-tiny: ResNet-18, the stage names of DETR-R50
    names = _backbone_names(model)
    assert names == {n for n in _backbone_names_of_torchvision()}  # same parameter names
    trainable = _backbone_names(model, trainable=True)
    assert trainable == _authors_trainable(names) == _torchvision_trainable(3)
    assert len(trainable) == 15 and not any(n.startswith(("conv1", "bn1", "layer1")) for n in trainable)
    # the rest of the model trains
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))


def _backbone_names_of_torchvision() -> set[str]:
    backbone = _resnet_fpn_extractor(resnet18(norm_layer=FrozenBatchNorm2d), 5)
    return {n.removeprefix("body.") for n, _ in backbone.named_parameters() if n.startswith("body.")}


@pytest.mark.parametrize("trainable_layers", [0, 1, 2, 3, 4, 5])
def test_trainable_layers_follow_torchvision(trainable_layers):
    model = _model(f"backbone.trainable_layers={trainable_layers}")
    assert _backbone_names(model, trainable=True) == _torchvision_trainable(trainable_layers)
    expected_count = {0: 0, 1: 5, 2: 10, 3: 15, 4: 19, 5: 20}[trainable_layers]  # conv weights
    assert len(_backbone_names(model, trainable=True)) == expected_count


def test_backbone_not_trained_when_lr_backbone_is_zero_or_frozen():
    for override in ("optim.lr_backbone=0", "freeze_backbone=true"):
        model = _model(override, "backbone.trainable_layers=5", "train_batch_norm=true")
        assert _backbone_names(model, trainable=True) == set()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    model = _model("optim.lr_backbone=0")
    assert _backbone_names(model, trainable=True) == _authors_trainable(_backbone_names(model), False)


def test_trained_batch_norm_only_inside_the_trainable_layers():
    model = _model("train_batch_norm=true")
    body = model.backbone.body
    for name, module in body.named_modules():
        if isinstance(module, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            in_trainable = name.startswith(("layer2", "layer3", "layer4"))
            assert isinstance(module, torch.nn.BatchNorm2d) == in_trainable, name
    trainable = _backbone_names(model, trainable=True)
    assert trainable == {n for n in _backbone_names(model) if n.startswith(("layer2", "layer3", "layer4"))}
    assert len(trainable) == 15 + 2 * 15  # convs + the weight and bias of each trained batch norm
    # train mode: the frozen stem and layer1 run as at inference
    set_train_mode(model)
    assert model.training and body.layer2.training and body.layer4.training
    assert not body.layer1.training and not body.conv1.training and not body.bn1.training
    # every layer trainable (the demo recipe): all batch norm trains, nothing is frozen
    model = _model("train_batch_norm=true", "backbone.trainable_layers=5")
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_checkpoint_with_partly_trained_batch_norm_initialises_a_model(tmp_path):
    model = _model("train_batch_norm=true")
    model.train()
    model(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))  # statistics move
    save_checkpoint(tmp_path / "last.pt", {"model": model.state_dict(), "model_config": model.config.to_dict()})
    tuned = _model(f"init={tmp_path / 'last.pt'}", "train_batch_norm=true")
    saved = load_checkpoint(tmp_path / "last.pt")["model"]
    for name, value in tuned.state_dict().items():
        if not name.endswith("num_batches_tracked"):  # a new run counts its own batches
            assert torch.equal(value, saved[name]), name
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in tuned.modules()) == 15  # layers 2-4


def test_vit_rule_counts_blocks_from_the_top():
    vit = ["model_overrides={backbone_kwargs: {depth: 3}}"]
    model = _model(*vit, model="detr-vit-tiny")
    assert len(backbone_units(model.backbone)) == 4  # 3 blocks + the embeddings
    everything = _backbone_names(model)
    assert _backbone_names(model, trainable=True) == everything  # default: the whole ViT

    def trained(k):
        return _backbone_names(_model(*vit, f"backbone.trainable_layers={k}", model="detr-vit-tiny"), True)

    top = {n for n in everything if n.startswith(("blocks.2.", "norm."))}
    assert trained(1) == top and {"norm.weight", "norm.bias"} <= top
    assert trained(2) == top | {n for n in everything if n.startswith("blocks.1.")}
    embeddings = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert trained(3) == everything - embeddings
    assert trained(4) == everything and trained(0) == set()
    with pytest.raises(ValueError, match=r"0\.\.4 or 'all'"):
        trained(5)
    with pytest.raises(ValueError, match=r"0\.\.5 or 'all'.*7"):
        _model("backbone.trainable_layers=7")
