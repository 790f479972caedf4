"""A new explanation method is one class plus one entry in the method table: a toy method added
that way runs through predict (its npz and overlays), the one-call API and the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import detection
from detection.api import clear_model_cache
from detection.attention.maps import maps_from_cells, valid_feature_size
from detection.attention.methods import (METHODS, ExplanationMethod, ImageInput, MethodContext, MethodMaps,
                                         MethodNotApplicable, MethodOptions, Targets, check_methods, parse_methods)
from detection.engine.image_files import OutputOptions
from detection.engine.predict_methods import ExplainOptions
from detection.engine.predict_run import PredictSettings, run_predict
from detection.render.report import read_run, write_report
from detection.runfolder.maps_npz import load_maps_npz

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "demo" / "images" / "shapes_1.png"


class ToyMethod(ExplanationMethod):
    """Detection k's map over the valid cells is x + k (x the cell column): known values to check."""

    name = "toy"
    options = ("heads",)
    needs_attention = True
    built_with: list[MethodOptions] = []

    @classmethod
    def refusal(cls, model):
        return None if model.attention_kind == "dense" else "toy maps need a dense grid"

    @classmethod
    def build(cls, context: MethodContext, options: MethodOptions) -> "ToyMethod":
        cls.built_with.append(options)
        return cls()

    def explain(self, image: ImageInput, targets: Targets) -> dict[str, MethodMaps]:
        record = image.attention
        valid_h, valid_w = valid_feature_size(record.feature_padding_mask[0])
        return {self.name: MethodMaps(toy_cells(len(targets), valid_h, valid_w), record.feature_stride,
                                      image.input_size())}


def toy_cells(count: int, height: int, width: int) -> torch.Tensor:
    columns = torch.arange(width, dtype=torch.float32).expand(height, width)
    return torch.stack([columns + k for k in range(count)]) if count else torch.zeros(0, height, width)


@pytest.fixture()
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, ToyMethod.name, ToyMethod)  # the one table entry
    ToyMethod.built_with.clear()
    clear_model_cache()
    yield
    clear_model_cache()


def test_the_table_knows_the_toy_method(registered):
    assert parse_methods("raw,toy") == ["raw", "toy"]
    check_methods(["toy"], detection.load_model("demo"))

    class Sampled:
        attention_kind, family_name = "sampled", "RT-DETR"

    with pytest.raises(MethodNotApplicable, match="'toy' does not apply to the RT-DETR family: toy maps need a dense"):
        check_methods(["toy"], Sampled())


def test_a_toy_method_runs_through_predict_the_api_and_the_report(registered, tmp_path):
    out = tmp_path / "run"
    settings = PredictSettings(inputs=[str(IMAGE)], out=str(out), model="demo", device="cpu", precision="fp32",
                               workers=0, progress=False, explain=ExplainOptions(methods=("raw", "toy")),
                               outputs=OutputOptions(overlays=True, save_attention=True))
    summary = run_predict(settings)
    assert summary.images == 1 and summary.detections >= 1 and summary.errors == 0
    assert ToyMethod.built_with and ToyMethod.built_with[0].heads == ["mean"]
    # predict: the toy method's npz holds exactly its cells, and its per-detection overlays exist
    record = read_run(out).images[0]
    cells, meta = load_maps_npz(out / "attention" / "toy" / "shapes_1.npz", size=None)
    assert meta["method"] == "toy" and len(cells) == summary.detections
    np.testing.assert_array_equal(cells, toy_cells(len(cells), *cells.shape[1:]).numpy())
    assert [path.name for path in record.method_overlays["toy"]] == [f"det_{k}.toy.png" for k in range(len(cells))]
    # the report: a column for the toy method beside raw
    html, _ = write_report(out)
    page = Path(html).read_text(encoding="utf-8")
    assert "toy" in page and 'class="m1"' in page
    # the API: the same maps, through the one resize path
    explanation = detection.explain(str(IMAGE), method="toy", precision="fp32", device="cpu")
    assert explanation.method == "toy" and len(explanation.detections) == len(cells)
    expected = maps_from_cells(cells, meta["feature_stride"], meta["input_size"], explanation.detections.image_size,
                               "minmax")
    np.testing.assert_array_equal(explanation.maps, expected)
