"""`detr-attn train --data DIR`: the synth layout, flags over --set and --config, fine-tuning
with --init (class head replaced, stem frozen), and the errors that name the missing part."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from detection import cli
from detection.data.synthetic import SynthConfig, generate_dataset
from detection.models.registry import build_model, load_config, load_model, save_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/train/tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, train=4, val=2, seed=7, config=SynthConfig(image_size=64, max_objects=2))
    return root


def _categories(root: Path) -> list[dict]:
    return json.loads((root / "annotations/instances_train.json").read_text())["categories"]


def test_data_folder_and_flags_make_a_complete_run(data, tmp_path, capsys):
    run = tmp_path / "run"
    status = cli.main(["train", "--config", str(TINY), "--data", str(data), "--out", str(run),
                       "--epochs", "1", "--batch-size", "2", "--lr", "5e-4", "--set", "optim.lr=1.0"])
    assert status == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["epochs"] == 1  # 4 images / batch 2, one epoch
    config = yaml_config(run)
    assert config["optim"]["epochs"] == 1 and config["optim"]["batch_size"] == 2
    assert config["optim"]["lr"] == 5e-4  # the flag wins over --set and the file
    assert config["data"]["train_images"] == str(data / "train")
    assert config["data"]["val_annotations"] == str(data / "annotations/instances_val.json")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["start", "train", "train", "eval", "end"]
    for part in ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "model/model.safetensors",
                 "best_model/model.json"):
        assert (run / part).is_file(), part
    model = load_model(run / "model")
    assert model.config.class_names == [c["name"] for c in _categories(data)]
    assert model.config.category_ids == [c["id"] for c in _categories(data)]


def yaml_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_init_fine_tunes_with_a_new_class_head_and_the_authors_freezing(data, tmp_path, capsys):
    torch.manual_seed(0)
    base = load_config("detr-tiny").replace(backbone="test_resnet", hidden_dim=32, nheads=2, enc_layers=1,
                                            dec_layers=2, dim_feedforward=64, num_queries=6, min_size=64,
                                            max_size=96, num_classes=2, class_names=["a", "b"],
                                            category_ids=[7, 8])
    source = build_model(base).eval()
    save_model(source, tmp_path / "source", source="test")
    run = tmp_path / "tuned"
    status = cli.main(["train", "--data", str(data), "--out", str(run), "--init", str(tmp_path / "source"),
                       "--epochs", "1", "--batch-size", "2", "--set", "threads=1", "--set", "progress=false",
                       "--set", "data.num_workers=0", "--set", "optim.lr_backbone=1e-3"])
    assert status == 0, capsys.readouterr().err
    tuned = load_model(run / "model")
    assert tuned.config.category_ids == [c["id"] for c in _categories(data)] != [7, 8]
    assert tuned.class_embed.out_features == len(_categories(data)) + 1
    before, after = source.state_dict(), tuned.state_dict()
    # the authors' rule: stem and layer1 frozen, layers 2-4 train (batch norm frozen throughout)
    for name in ("backbone.body.conv1.0.weight", "backbone.body.layer1.0.conv1.weight",
                 "backbone.body.bn1.running_mean", "backbone.body.layer3.0.bn1.weight"):
        assert torch.equal(before[name], after[name]), name
    for name in ("backbone.body.layer2.0.conv1.weight", "backbone.body.layer4.0.conv2.weight",
                 "input_proj.weight"):
        assert not torch.equal(before[name], after[name]), name


def _error(argv: list[str], capsys) -> str:
    assert cli.main(["train", *argv]) == 2
    return capsys.readouterr().err


def test_errors_name_the_missing_part(data, tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    assert "give --data DIR" in _error(out, capsys)
    assert f"--data {tmp_path / 'nowhere'}: no such folder" in _error(["--data", str(tmp_path / "nowhere"), *out], capsys)

    partial = tmp_path / "partial"
    shutil.copytree(data / "train", partial / "train")
    message = _error(["--data", str(partial), *out], capsys)
    assert f"missing {partial / 'annotations/instances_train.json'} (COCO annotations file)" in message
    assert "train/, val/, annotations/instances_{train,val}.json" in message

    (partial / "annotations").mkdir()
    shutil.copy(data / "annotations/instances_train.json", partial / "annotations")
    shutil.copytree(data / "val", partial / "val")  # val images without their annotations
    message = _error(["--data", str(partial), *out], capsys)
    assert f"missing {partial / 'annotations/instances_val.json'} (COCO annotations file)" in message
    assert "instances_train" not in message.split("; expected")[0]

    shutil.rmtree(partial / "train")
    message = _error(["--data", str(partial), *out], capsys)
    assert f"missing {partial / 'train'} (image folder), {partial / 'annotations/instances_val.json'}" in message

    assert "--epochs must be positive" in _error(["--data", str(data), "--epochs", "0", *out], capsys)
    assert "unknown config key" in _error(["--data", str(data), "--set", "optim.lrr=1", *out], capsys)


def test_data_without_validation_set_trains_without_evaluation(data, tmp_path, capsys):
    train_only = tmp_path / "train_only"
    shutil.copytree(data / "train", train_only / "train")
    (train_only / "annotations").mkdir()
    shutil.copy(data / "annotations/instances_train.json", train_only / "annotations")
    run = tmp_path / "run"
    status = cli.main(["train", "--config", str(TINY), "--data", str(train_only), "--out", str(run),
                       "--epochs", "1", "--batch-size", "4"])
    assert status == 0
    assert "training without evaluation" in capsys.readouterr().err
    assert yaml_config(run)["data"]["val_images"] is None
    assert [json.loads(line)["type"] for line in (run / "log.jsonl").read_text().splitlines()] == \
        ["start", "train", "end"]
