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
from detection.train.config import load_train_config, resolve_model_and_schedule

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


def test_help_names_the_model_trained_and_both_schedules(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "without --init detr-tiny (configs/models/detr-tiny.yaml) from random weights: lr 1e-04" in text
    assert "with --init NAME|PATH those weights are fine-tuned: lr 1e-05, backbone lr 1e-06, 50 warm-up steps" in text
    assert "default 1e-04 from random weights, 1e-05 with --init" in text


def test_from_scratch_names_its_model_first_and_in_config_yaml(data, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    with caplog.at_level("INFO"):
        status = cli.main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "4",
                           "--set", "model_overrides={backbone: test_resnet, hidden_dim: 32, nheads: 2, "
                           "enc_layers: 1, dec_layers: 1, dim_feedforward: 32, num_queries: 4, min_size: 64, "
                           "max_size: 96}", "--set", "eval.every_epochs=0", "--set", "progress=false"])
    assert status == 0, capsys.readouterr().err
    assert caplog.records[0].getMessage() == \
        "training detr-tiny from random weights (lr 0.0001, backbone lr 1e-05, warm-up 0 steps)"
    config = yaml_config(run)
    assert config["model"] == "detr-tiny" and config["init"] is None
    assert {k: config["optim"][k] for k in ("lr", "lr_backbone", "warmup_steps")} == \
        {"lr": 1e-4, "lr_backbone": 1e-5, "warmup_steps": 0}
    assert "AP " not in capsys.readouterr().out  # no "before -> after" line without --init


def test_init_fine_tunes_with_a_new_class_head_and_the_authors_freezing(data, tmp_path, capsys, caplog):
    torch.manual_seed(0)
    base = load_config("detr-tiny").replace(backbone="test_resnet", hidden_dim=32, nheads=2, enc_layers=1,
                                            dec_layers=2, dim_feedforward=64, num_queries=6, min_size=64,
                                            max_size=96, num_classes=2, class_names=["a", "b"],
                                            category_ids=[7, 8])
    source = build_model(base).eval()
    save_model(source, tmp_path / "source", source="test")
    run = tmp_path / "tuned"
    with caplog.at_level("INFO"):
        status = cli.main(["train", "--data", str(data), "--out", str(run), "--init", str(tmp_path / "source"),
                           "--epochs", "1", "--batch-size", "2", "--set", "threads=1", "--set", "progress=false",
                           "--set", "data.num_workers=0", "--set", "optim.lr_backbone=1e-3",
                           "--set", "optim.warmup_steps=0"])  # two steps: warm-up would hide the freezing
    out = capsys.readouterr().out
    assert status == 0
    # which model trains: the first log line and config.yaml; without --lr the fine-tuning schedule
    assert caplog.records[0].getMessage() == (f"fine-tuning the weights of {tmp_path / 'source'} "
                                              "(lr 1e-05, backbone lr 0.001, warm-up 0 steps)")
    config = yaml_config(run)
    assert config["model"] is None and config["init"] == str(tmp_path / "source")
    assert {k: config["optim"][k] for k in ("lr", "lr_backbone", "warmup_steps")} == \
        {"lr": 1e-5, "lr_backbone": 1e-3, "warmup_steps": 0}
    # the init weights evaluated before the first step: AP before -> after in the log and on stdout
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in records if r["type"] in ("train", "eval")] == \
        [("eval", 0), ("train", 2), ("eval", 2)]  # log_every 20: the last step only
    summary = json.loads(out.splitlines()[-2])
    before, after = summary["initial_metrics"], summary["metrics"]
    assert before["AP"] == records[1]["AP"] and after["AP"] == records[-2]["AP"]
    assert out.splitlines()[-1] == (f"AP {before['AP']:.3f} -> {after['AP']:.3f}, AP50 {before['AP50']:.3f} -> "
                                    f"{after['AP50']:.3f} (the --init weights before training -> the trained "
                                    "model, on 2 validation images)")
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


def test_rates_given_win_over_the_fine_tuning_schedule():
    data = ["data.train_images=a", "data.train_annotations=b"]
    config = load_train_config(None, [*data, "optim.warmup_steps=5"], {"init": "demo", "optim.lr": 3e-4})
    assert (config["model"], config["optim"]["lr"], config["optim"]["lr_backbone"], config["optim"]["warmup_steps"]) \
        == (None, 3e-4, 1e-6, 5)
    fine_tune = load_train_config(None, data, {"init": "demo"})
    assert {k: fine_tune["optim"][k] for k in ("lr", "lr_backbone", "warmup_steps")} == \
        {"lr": 1e-5, "lr_backbone": 1e-6, "warmup_steps": 50}
    assert load_train_config(None, data, {"init": "demo"}) == load_train_config(None, data, {"init": "demo"}) \
        == resolve_model_and_schedule(load_train_config(None, data, {"init": "demo"}))  # resume re-reads it as is
    scratch = load_train_config(None, [*data, "model=detr-r50"])
    assert (scratch["model"], scratch["optim"]["lr"], scratch["optim"]["warmup_steps"]) == ("detr-r50", 1e-4, 0)


def test_data_without_validation_set_trains_without_evaluation(data, tmp_path, capsys, caplog):
    train_only = tmp_path / "train_only"
    shutil.copytree(data / "train", train_only / "train")
    (train_only / "annotations").mkdir()
    shutil.copy(data / "annotations/instances_train.json", train_only / "annotations")
    run = tmp_path / "run"
    status = cli.main(["train", "--config", str(TINY), "--data", str(train_only), "--out", str(run),
                       "--epochs", "1", "--batch-size", "4"])
    assert status == 0
    assert "training without evaluation" in caplog.text
    assert yaml_config(run)["data"]["val_images"] is None
    assert [json.loads(line)["type"] for line in (run / "log.jsonl").read_text().splitlines()] == \
        ["start", "train", "end"]
