"""A model that fails inside its forward: a usage error naming the module before anything is
written (the probe), one image's error record during a run (the run goes on), and a crash of our
own code leaves run.json saying "failed"."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detection.cli import main
from detection.engine import predict_run
from detection.engine.predict_run import PredictSettings, PredictUsageError, run_predict
from detection.models.contract import PostprocessRule, PreprocessSpec


class PositionTable(nn.Module):
    """Fails on inputs wider than `max_width` pixels (as a fixed position-embedding table would)."""

    def __init__(self, max_width: int) -> None:
        super().__init__()
        self.max_width = max_width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] > self.max_width:
            raise RuntimeError(f"position table holds {self.max_width} columns, the input has {images.shape[-1]}")
        return images.mean(dim=(1, 2, 3))


class TableDetector(nn.Module):
    """A detector whose `PositionTable` fails on wide inputs; every image gives one box."""

    family_name, attention_kind, gradient_capture = "table", "dense", None
    supports_padding = False

    def __init__(self, max_width: int) -> None:
        super().__init__()
        self.table = PositionTable(max_width)
        self.config = type("Config", (), {"class_names": ["a"], "category_ids": [1], "to_dict": lambda self: {}})()

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        # the shorter side becomes 60: the 60-pixel-tall test images keep their size, the 480 x 640 probe is 60 x 80
        return PreprocessSpec(resize="shortest_edge", min_size=60, max_size=1000, mean=None, std=None,
                              size_divisibility=1)

    @property
    def postprocess_rule(self) -> PostprocessRule:
        return PostprocessRule.sigmoid_topk(top_k=1)

    def precision_allowed(self, precision, device):
        return precision == "fp32"

    def forward(self, images, padding_mask=None, *, cross_attention=False, encoder_attention=False,
                decoder_self_attention=False):
        score = self.table(images)
        b = images.shape[0]
        return {"pred_logits": score.reshape(b, 1, 1) + 5.0, "pred_boxes": torch.full((b, 1, 4), 0.5),
                "aux_outputs": [], "attention": None}

    def prepare_for_inference(self, device, precision, fold_bn=True, channels_last=True, compile=False):
        return self


def _images(folder, widths):
    folder.mkdir()
    for index, width in enumerate(widths):
        Image.fromarray(np.full((60, width, 3), 90, np.uint8)).save(folder / f"im{index}.png")


def _settings(tmp_path, **extra):
    return PredictSettings(inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), model="table-folder",
                           device="cpu", precision="fp32", workers=0, progress=False, **extra)


def test_a_model_that_cannot_run_is_a_usage_error_naming_the_module_and_writes_nothing(tmp_path):
    _images(tmp_path / "in", [40])
    with pytest.raises(PredictUsageError) as error:
        run_predict(_settings(tmp_path), model=TableDetector(max_width=10))
    message = str(error.value)
    assert message.startswith("--model table-folder: the model failed on a 80x60 input in PositionTable (")
    assert message.endswith("RuntimeError: position table holds 10 columns, the input has 80")
    assert "test_model_failures.py:" in message and not (tmp_path / "out").exists()


def test_an_image_the_model_cannot_take_is_that_images_error_and_the_run_goes_on(tmp_path):
    _images(tmp_path / "in", [40, 150, 60])  # 150 px wide: the table (100 columns) fails on it alone
    summary = run_predict(_settings(tmp_path), model=TableDetector(max_width=100))
    assert (summary.images, summary.errors, summary.detections) == (2, 1, 2)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["key"] for e in errors] == ["im1"]
    assert errors[0]["reason"].startswith("the model failed on a 150x60 input in PositionTable (")
    assert errors[0]["reason"].endswith("position table holds 100 columns, the input has 150")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "complete"


def test_a_crash_of_our_own_code_leaves_run_json_saying_failed(tmp_path, monkeypatch):
    _images(tmp_path / "in", [40])

    def broken(*args, **kwargs):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(predict_run, "PendingWrites", broken)
    with pytest.raises(KeyError):
        run_predict(_settings(tmp_path), model=TableDetector(max_width=100))
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["status"] == "failed" and info["failure"] == "KeyError: 'a bug of ours'"


def test_the_cli_says_it_in_one_paragraph_with_exit_2(tmp_path, monkeypatch, capsys):
    from detection.engine import predict_run as module

    _images(tmp_path / "in", [40])
    monkeypatch.setattr(module, "load_model", lambda name, device="cpu", **options: TableDetector(max_width=10))
    status = main(["predict", str(tmp_path / "in"), "--model", "table-folder", "--out", str(tmp_path / "out"),
                   "--device", "cpu", "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and not (tmp_path / "out").exists()
    assert "the model failed on a 80x60 input in PositionTable" in err and "Traceback" not in err


def test_explain_and_eval_probe_the_model_first(tmp_path, monkeypatch, capsys):
    import detection
    from detection.cli import eval as eval_cli
    from detection.engine.model_failure import ModelRunError

    with pytest.raises(ModelRunError, match=r"the model failed on a 80x60 input in PositionTable \("):
        detection.explain(np.zeros((60, 80, 3), np.uint8), model=TableDetector(max_width=10), device="cpu")
    _images(tmp_path / "in", [40])
    annotations = {"images": [{"id": 1, "file_name": "im0.png", "width": 40, "height": 60}],
                   "categories": [{"id": 1, "name": "a"}],
                   "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 30],
                                    "area": 600, "iscrowd": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(annotations))
    monkeypatch.setattr(eval_cli, "load_model", lambda name, device="cpu", **options: TableDetector(max_width=10))
    status = main(["eval", "--model", "table-folder", "--ann", str(tmp_path / "gt.json"), "--images",
                   str(tmp_path / "in"), "--out", str(tmp_path / "eval"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "the model failed on a 80x60 input in PositionTable" in err
    assert not (tmp_path / "eval" / "metrics.json").exists()
