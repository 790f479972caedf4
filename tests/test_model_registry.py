"""Registry: build/save/load native folders, demo resolution, class-head replacement."""
from __future__ import annotations

import json

import pytest
import torch

from detection.models import registry
from detection.models.registry import build_model, load_model, replace_class_head, save_model
from detection.models.checkpoint_io import CheckpointError


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 96, generator=gen)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    return images, mask


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("detr-tiny").eval()
    folder = save_model(model, tmp_path / "m", source="random init", source_sha256=None)
    meta = json.loads((folder / "model.json").read_text())
    assert meta["architecture"] == "detr" and meta["source"] == "random init"
    assert meta["class_names"] == ["circle", "square", "triangle"] and meta["num_queries"] == 10
    loaded = load_model(folder)
    assert not loaded.training and loaded.config == model.config
    images, mask = _inputs()
    with torch.no_grad():
        a, b = model(images, mask), loaded(images, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert loaded.source == "random init"


def test_backbone_kwargs_shape_the_timm_body_and_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    config = registry.load_config("detr-tiny").replace(
        backbone="resnet18", backbone_kwargs={"channels": [8, 16, 24, 40]})
    model = build_model(config).eval()
    assert model.backbone.num_channels == 40 and model.input_proj.in_channels == 40
    assert model.backbone.body.layer1[0].conv1.out_channels == 8
    assert len(model.backbone.body.layer2) == 2  # resnet18's depth, narrow widths
    folder = save_model(model, tmp_path / "m", source="random init", source_sha256=None)
    loaded = load_model(folder)
    assert loaded.config.backbone_kwargs == {"channels": [8, 16, 24, 40]}
    images, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(model(images, mask)["pred_boxes"], loaded(images, mask)["pred_boxes"])
    with pytest.raises(TypeError):
        build_model(config.replace(backbone_kwargs={"no_such_argument": 1}))


def test_load_reports_missing_and_unexpected_keys(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = build_model("detr-tiny")
    folder = save_model(model, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("query_embed.weight")
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing keys.*query_embed\.weight.*unexpected keys.*extra\.weight"):
        load_model(folder)


def test_demo_missing_gives_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(registry.SHIPPED_MODELS, "demo", tmp_path / "demo")
    with pytest.raises(ValueError, match="demo model is not available"):
        load_model("demo")


def test_demo_resolves_to_weights_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(registry.SHIPPED_MODELS, "demo", tmp_path / "demo")
    save_model(build_model("detr-tiny"), tmp_path / "demo", source="test")
    assert load_model("demo").config.name == "detr-tiny"


def test_replace_class_head_changes_only_the_classifier() -> None:
    torch.manual_seed(0)
    model = build_model("detr-tiny").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replace_class_head(model, ["a", "b", "c", "d", "e"], [10, 20, 30, 40, 50])
    after = model.state_dict()
    assert after["class_embed.weight"].shape == (6, 64)
    assert model.config.num_classes == 5 and model.config.category_ids == [10, 20, 30, 40, 50]
    for key, value in before.items():
        if not key.startswith("class_embed."):
            assert torch.equal(after[key], value), key
    images, mask = _inputs()
    with torch.no_grad():
        out = model(images, mask)
    assert out["pred_logits"].shape == (2, 10, 6)
    with pytest.raises(ValueError, match="category ids"):
        replace_class_head(model, ["a"], [1, 2])
