"""Training loop pieces: loss goes down, LR schedule, config overrides, batch-norm round trip,
fine-tuning with another class count, backbone freezing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detection.data.coco import LabelMap
from detection.data.synthetic import SynthConfig, generate_dataset
from detection.models.registry import build_model, load_config, load_model, save_model
from detection.train.config import apply_override, load_train_config
from detection.train.model_export import inference_copy
from detection.train.loop import train
from detection.train.model_setup import build_training_model, unfreeze_batch_norm
from detection.train.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/train/tiny.yaml"


def _tiny_model_config():
    config = load_train_config(TINY, ["data.train_images=x", "data.train_annotations=y"])
    return load_config(config["model"]).replace(**config["model_overrides"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, train=4, val=0, seed=5, config=SynthConfig(image_size=64, max_objects=2))
    return root


def test_a_few_steps_reduce_the_loss(data, tmp_path):
    config = load_train_config(TINY, [
        f"data.train_images={data / 'train'}", f"data.train_annotations={data / 'annotations/instances_train.json'}",
        "optim.epochs=25", "optim.batch_size=4", "optim.schedule=constant", "optim.warmup_steps=0",
        "augment={hflip: 0.0, color_jitter: {}, crop: {}, scales: [64], max_size: 96}",
        "model_overrides.dropout=0.0", "ema.enabled=false", "checkpoint_every=0",
    ])
    summary = train(config, tmp_path / "run")
    assert summary["steps"] == 25
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if json.loads(l)["type"] == "train"]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_lr_schedule_warmup_cosine_and_step():
    optim = {"warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1}
    assert lr_factor(0, 110, 10, optim) == pytest.approx(0.1)
    assert lr_factor(9, 110, 10, optim) == pytest.approx(1.0)
    assert lr_factor(60, 110, 10, optim) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_factor(110, 110, 10, optim) == pytest.approx(0.1)
    step = {"warmup_steps": 0, "schedule": "step", "lr_drop_epochs": [2, 4], "lr_drop_factor": 0.5}
    assert [lr_factor(s, 100, 10, step) for s in (0, 19, 20, 39, 40)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 1, {"schedule": "linear"})


def test_overrides_parse_yaml_and_reject_unknown_keys():
    config = load_train_config(TINY, ["data.train_images=a", "data.train_annotations=b",
                                      "optim.lr=2e-3", "ema.enabled=false", "augment.scales=[32, 48]"])
    assert config["optim"]["lr"] == 2e-3 and config["ema"]["enabled"] is False
    assert config["augment"]["scales"] == [32, 48]
    # free-form mappings merge: setting one key keeps the file's others and earlier --sets
    assert config["augment"]["hflip"] == 0.5 and config["augment"]["crop"] == {"p": 0.3, "max_fraction": 0.2}
    config = load_train_config(TINY, ["data.train_images=a", "data.train_annotations=b",
                                      "model_overrides.backbone=resnet18",
                                      "model_overrides.backbone_kwargs={channels: [8, 16, 32, 64]}",
                                      "augment.crop.p=0.0"])
    assert config["model_overrides"]["backbone"] == "resnet18"
    assert config["model_overrides"]["backbone_kwargs"] == {"channels": [8, 16, 32, 64]}
    assert config["model_overrides"]["hidden_dim"] == 32  # from the file
    assert config["augment"]["crop"] == {"p": 0.0, "max_fraction": 0.2}
    # a whole mapping replaces the section
    config = load_train_config(TINY, ["data.train_images=a", "data.train_annotations=b",
                                      "augment={hflip: 0.0, scales: [64]}"])
    assert config["augment"] == {"hflip": 0.0, "scales": [64]}
    with pytest.raises(ValueError, match="unknown config key 'lrr'"):
        apply_override(config, "optim.lrr=1")
    with pytest.raises(ValueError, match="key=value"):
        apply_override(config, "optim.lr")
    with pytest.raises(ValueError, match="data.train_images"):
        load_train_config(TINY)


def test_trained_batch_norm_round_trips_to_the_shipped_frozen_layout():
    torch.manual_seed(0)
    model = build_model(_tiny_model_config())
    unfreeze_batch_norm(model.backbone)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.train()
    images, mask = torch.rand(3, 3, 64, 80), torch.zeros(3, 64, 80, dtype=torch.bool)
    for _ in range(3):  # move the running statistics away from their initial values
        model(images, mask)
    model.eval()
    frozen = inference_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    with torch.no_grad():
        a, b = model(images, mask), frozen(images, mask)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-5, atol=1e-5)


def test_fine_tuning_replaces_only_the_class_head_and_can_freeze_the_backbone(tmp_path):
    torch.manual_seed(0)
    source = build_model(_tiny_model_config())  # 3 classes (detr-tiny)
    save_model(source.eval(), tmp_path / "source", source="test")
    label_map = LabelMap((4, 9), ("a", "b"))
    config = load_train_config(TINY, ["data.train_images=a", "data.train_annotations=b",
                                      f"init={tmp_path / 'source'}", "freeze_backbone=true",
                                      "model_overrides={}"])
    model = build_training_model(config, label_map)
    assert model.config.num_classes == 2 and model.config.category_ids == [4, 9]
    assert model.class_embed.out_features == 3
    kept = load_model(tmp_path / "source").state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith("class_embed."):
            assert torch.equal(value, kept[name]), name
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))


def test_fine_tuning_at_another_input_size_keeps_the_weights_and_stores_the_size(tmp_path):
    torch.manual_seed(0)
    source = build_model(_tiny_model_config())
    save_model(source.eval(), tmp_path / "source", source="test")
    label_map = LabelMap(tuple(source.config.category_ids), tuple(source.config.class_names))
    base = ["data.train_images=a", "data.train_annotations=b", f"init={tmp_path / 'source'}"]
    config = load_train_config(TINY, base + ["model_overrides={min_size: 96, max_size: 144}"])
    model = build_training_model(config, label_map)
    assert (model.config.min_size, model.config.max_size) == (96, 144)
    assert source.config.min_size != 96
    kept = source.state_dict()
    for name, value in inference_copy(model).state_dict().items():
        assert torch.equal(value, kept[name]), name
    save_model(inference_copy(model).eval(), tmp_path / "tuned", source="test")
    assert load_model(tmp_path / "tuned").config.min_size == 96

    config = load_train_config(TINY, base + ["model_overrides={min_size: 96, hidden_dim: 64}"])
    with pytest.raises(ValueError, match=r"\['hidden_dim'\].*only \['min_size', 'max_size'\]"):
        build_training_model(config, label_map)
