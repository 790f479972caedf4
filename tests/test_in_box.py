"""in-box maps (issue 23, Deliver 8): the box's share of each feature cell on hand-made geometry, the
contrast exponent, the method against its definition on a real record, a hole the attention avoids
that no box-only map can leave out, and the eval CLI's entry with its frozen exponent."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detection.attention.maps import query_cell_maps
from detection.attention.methods import METHODS, ImageInput, Targets
from detection.attention.methods.in_box import DEFAULT_POWER, InBoxAttention, box_cell_coverage, in_box_cells
from detection.attention.metrics import explanation_mask
from detection.cli import main
from detection.data.preprocess import pad_batch
from detection.models.registry import build_model
from tests.test_evaluate_model import confident_model_setup


def test_coverage_is_the_share_of_each_cell_inside_the_box():
    # original = input (64 x 96), stride 16: a 4 x 6 grid; box x 8..40, y 16..48
    coverage = box_cell_coverage(torch.tensor([[8.0, 16.0, 40.0, 48.0]]), (64, 96), (64, 96), 16, (4, 6))
    expected = np.zeros((4, 6))
    expected[1:3, 0] = expected[1:3, 2] = 0.5
    expected[1:3, 1] = 1.0
    np.testing.assert_allclose(coverage[0].numpy(), expected)
    # the same box in an original twice the size maps to the same input pixels
    doubled = box_cell_coverage(torch.tensor([[16.0, 32.0, 80.0, 96.0]]), (128, 192), (64, 96), 16, (4, 6))
    torch.testing.assert_close(doubled, coverage)
    # a last cell cut by the input's edge (60 px high: cell 3 covers 48..60) is whole when the box reaches the edge
    edge = box_cell_coverage(torch.tensor([[0.0, 54.0, 96.0, 60.0]]), (60, 96), (60, 96), 16, (4, 6))
    np.testing.assert_allclose(edge[0, 3].numpy(), np.full(6, 0.5))
    assert float(edge[0, :3].abs().sum()) == 0.0


def test_in_box_cells_flatten_the_peaks_and_keep_zero_outside():
    cells = torch.tensor([[[0.0, 1.0], [4.0, 0.25]]])
    coverage = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    np.testing.assert_allclose(in_box_cells(cells, coverage, 0.5)[0].numpy(), [[0.0, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(in_box_cells(cells, coverage, 1.0)[0].numpy(), [[0.0, 0.25], [1.0, 0.0]])
    assert float(in_box_cells(torch.zeros(1, 2, 2), coverage).abs().sum()) == 0.0
    with pytest.raises(ValueError, match="power"):
        in_box_cells(cells, coverage, 0.0)


@pytest.fixture(scope="module")
def record_setup():
    torch.manual_seed(0)
    model = build_model("detr-tiny").eval()
    images, mask = pad_batch([torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))])
    with torch.no_grad():
        record = model(images, mask, cross_attention=True)["attention"]
    return ImageInput((150, 200), attention=record, images=images, padding_mask=mask)


def test_the_method_is_its_definition_on_a_real_record(record_setup):
    image = record_setup
    boxes = [[0.0, 0.0, 100.0, 75.0], [50.0, 40.0, 200.0, 150.0]]
    targets = Targets([2, 5], [0, 1], boxes)
    maps = InBoxAttention(("last", "rollout", 1), ("mean", "max")).explain(image, targets)
    assert list(maps) == ["in-box/last/mean", "in-box/last/max", "in-box/1/mean", "in-box/1/max"]
    assert InBoxAttention.name in METHODS and DEFAULT_POWER == 0.35
    for choice, got in maps.items():
        _, layers, heads = choice.split("/")
        raw = query_cell_maps(image.attention, 0, [2, 5], heads=heads, layers=int(layers) if layers != "last" else layers)
        # input 96 x 128 from 150 x 200 (scale 0.64), stride 32: 3 x 4 cells. Box 0 -> x 0..64, y 0..48:
        # cells (0, 0..1) whole, (1, 0..1) half. Box 1 -> x 32..128, y 25.6..96: columns 1..3, row 0 by 0.2.
        coverage = torch.zeros(2, 3, 4)
        coverage[0, 0, :2], coverage[0, 1, :2] = 1.0, 0.5
        coverage[1] = torch.tensor([[0.0, 0.2, 0.2, 0.2], [0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
        expected = (raw / raw.flatten(1).amax(1)[:, None, None]).double() ** 0.35 * coverage.double()
        torch.testing.assert_close(got.values, expected.float(), rtol=1e-6, atol=1e-7)
        assert got.stride == 32 and got.input_size == (96, 128)


def test_a_hole_the_attention_avoids_is_left_out_where_every_box_only_map_fills_it():
    """A ring of cells inside a 4 x 4 box of an 8 x 8 grid: the in-box map's Otsu mask is the ring;
    any map constant over the box (the uniform box) covers the hole too."""
    ring = np.zeros((8, 8), bool)
    ring[2:6, 2:6] = True
    ring[3:5, 3:5] = False
    attention = torch.from_numpy(np.where(ring, 1.0, 0.1)).float()[None]
    attention[0, 3:5, 3:5] = 0.05  # the hole gets a little attention, the outside (0.1) some
    coverage = box_cell_coverage(torch.tensor([[32.0, 32.0, 96.0, 96.0]]), (128, 128), (128, 128), 16, (8, 8))
    cells = in_box_cells(attention, coverage)[0].numpy()
    np.testing.assert_array_equal(explanation_mask(cells), ring)
    box_mask = explanation_mask(coverage[0].numpy())
    iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
    assert iou(explanation_mask(cells), ring) == 1.0 and iou(box_mask, ring) == 12 / 16


def test_eval_scores_in_box_with_its_frozen_power_and_records_an_override(tmp_path_factory):
    root, ann = confident_model_setup(tmp_path_factory.mktemp("inbox"))
    runs = {}
    for name, extra in (("default", []), ("power1", ["--in-box-power", "1"])):
        out = root / name
        code = main(["eval", "--no-progress", "--model", str(root / "model"), "--ann", str(ann), "--images",
                     str(root / "images"), "--out", str(out), "--attention-threshold", "0.3", "--first", "3",
                     "--explain", "raw,in-box", "--layers", "last", "--heads", "mean", *extra])
        assert code == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    assert list(runs["default"]["attention"]) == ["last/mean", "in-box/last/mean", "gaussian-baseline"]
    assert "in_box_power" not in runs["default"]["settings"] and runs["power1"]["settings"]["in_box_power"] == 1.0
    row = runs["default"]["attention"]["in-box/last/mean"]
    assert row["num_matched"] == runs["default"]["attention"]["last/mean"]["num_matched"] > 0
    # zero outside the box: the whole map's mass lies in the detection's box, so more of it in the object's
    assert row["energy_pointing_game"] >= runs["default"]["attention"]["last/mean"]["energy_pointing_game"]
    assert runs["power1"]["attention"]["in-box/last/mean"] != row


def test_the_api_gives_in_box_maps_that_vanish_away_from_each_box():
    import detection

    explanation = detection.explain("demo/images/shapes_1.png", method="in-box", device="cpu")
    height, width = explanation.maps.shape[1:]
    # a cell the box touches is nonzero; bilinear upsampling carries it to the next cell's centre: 1.5 cells
    reach = 1.5 * 16 * max(height / 160, width / 199) + 1  # stride 16 at the 160 x 199 input
    rows, cols = np.mgrid[0:height, 0:width]
    assert len(explanation.detections) > 0
    for saliency, (x0, y0, x1, y1) in zip(explanation.maps, explanation.detections.boxes.tolist()):
        far = (cols < x0 - reach) | (cols > x1 + reach) | (rows < y0 - reach) | (rows > y1 + reach)
        assert far.any() and float(np.abs(saliency[far]).max()) == 0.0
        inside = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
        assert float(saliency[inside].max()) == pytest.approx(1.0)
