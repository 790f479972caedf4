"""The viewer's saved data (runfolder.grids) and page (render.viewer), without a browser: grids equal
`query_cell_maps` of the record, the byte budget, the npz round trip, old run folders, the CLI."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.cli import main as cli_main
from detection.attention.maps import cells_to_image, encoder_point_maps, query_cell_maps
from detection.runfolder.maps_npz import load_maps_npz
from detection.data.images import load_image
from detection.data.preprocess import image_to_input, pad_batch
from detection.runfolder.versions import GRIDS_NPZ_FORMAT
from detection.runfolder.grids import (build_grids, choose_detail, load_grids_npz, raw_grids, save_grids_npz, slice_plan)
from detection.runfolder.reader import RunReader
from detection.runfolder.layout import grids_name
from detection.models.registry import load_model
from detection.render.colors import apply_colormap
from detection.render.viewer import NoSavedAttention, colormap_table, viewer_payload, write_viewer
from detection.render.viewer_page import viewer_html
from tests.test_sampled import sampled_record

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGE = REPO / "demo" / "images" / "shapes_3.png"


@pytest.fixture(scope="module")
def demo_record():
    """The demo model on one image, every kind of attention recorded; (record, query indices)."""
    model = load_model("demo", device="cpu").eval()
    image = load_image(DEMO_IMAGE)
    images, mask = pad_batch([image_to_input(image.rgb, model.preprocess_spec)], model.preprocess_spec.size_divisibility)
    with torch.no_grad():
        out = model(images, mask, cross_attention=True, encoder_attention=True, decoder_self_attention=True)
    return out["attention"], [3, 7, 11], image.original_size


def test_grids_are_query_cell_maps_of_every_layer_and_head(demo_record, tmp_path: Path) -> None:
    record, queries, size = demo_record
    grids = build_grids(record, 0, queries, [0.9, 0.8, 0.7], size, budget_bytes=None, encoder_attention=True)
    layers, heads = record.decoder_cross.shape[0], record.decoder_cross.shape[2]
    assert (grids.layers, grids.heads, grids.kind, grids.detail) == (layers, heads, "dense", "layer_head")
    raw = grids.methods["raw"]
    assert raw.detections == [0, 1, 2] and len(raw.slices) == layers * heads + 1
    save_grids_npz(tmp_path / "g.npz", grids)
    loaded = load_grids_npz(tmp_path / "g.npz")
    assert loaded.methods["raw"].slices == raw.slices and loaded.rollout == "chefer2021-raw+decoder_self+encoder_self"
    for s, (layer, head) in enumerate(raw.slices):
        expected = query_cell_maps(record, 0, queries, heads=head, layers=layer).numpy()
        np.testing.assert_array_equal(raw.grids[:, s], expected)
        # float16 storage: relative error <= 2^-11
        np.testing.assert_allclose(loaded.methods["raw"].grids[:, s], expected, rtol=2**-11, atol=1e-7)
    assert loaded.image_size == tuple(size) and loaded.input_size == tuple(record.image_sizes[0].tolist())


def test_raw_grids_of_every_detail_equal_query_cell_maps_of_the_whole_record(demo_record) -> None:
    record, queries, _ = demo_record
    layers, heads = record.decoder_cross.shape[0], record.decoder_cross.shape[2]
    slices = [slice for detail in ("layer_head", "last_layer_heads", "layer_mean")
              for slice in slice_plan(detail, layers, heads, rollout=True)] + [("last", "max"), ("mean", 1)]
    grids = raw_grids(record, 0, queries, slices)
    for s, (layer, head) in enumerate(slices):  # exactly: each slice is the same selection and reduction
        np.testing.assert_array_equal(grids[:, s], query_cell_maps(record, 0, queries, heads=head, layers=layer).numpy())


def test_encoder_grid_rows_and_columns_are_encoder_point_maps(demo_record) -> None:
    record, queries, size = demo_record
    grids = build_grids(record, 0, queries, [1, 1, 1], size, encoder_attention=True)
    valid_h, valid_w = grids.valid_size
    assert grids.encoder_self.shape == (valid_h * valid_w, valid_h * valid_w)
    point = (40.0, 120.0)  # (y, x) original pixels
    cell = int(point[0] * grids.input_size[0] / size[0] // grids.feature_stride) * valid_w + int(
        point[1] * grids.input_size[1] / size[1] // grids.feature_stride)
    for direction, cells in (("outgoing", grids.encoder_self[cell]), ("incoming", grids.encoder_self[:, cell])):
        mine = cells_to_image(cells.reshape(1, valid_h, valid_w), grids.feature_stride, grids.input_size, size)
        theirs = encoder_point_maps(record, 0, [point], size, direction=direction, normalize=None)
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)
    assert np.allclose(grids.encoder_self.sum(axis=1), 1.0, atol=1e-5)  # softmax rows


def test_budget_picks_the_most_detailed_level_that_fits() -> None:
    # 3 detections, 100 cells, 6 layers x 8 heads + 1 rollout slice: 3 * 49 * 100 * 2 bytes = 29400
    assert choose_detail(3, 100, 6, 8, True, 29400) == ("layer_head", 3)
    assert choose_detail(3, 100, 6, 8, True, 29399) == ("last_layer_heads", 3)  # 8 + 6 + 1 slices: 9000
    assert choose_detail(3, 100, 6, 8, True, 8999) == ("layer_mean", 3)  # 6 + 1 slices: 4200
    assert choose_detail(3, 100, 6, 8, True, 4199) == ("layer_mean", 2)  # 1400 bytes per detection
    assert choose_detail(3, 100, 6, 8, False, None) == ("layer_head", 3)
    assert slice_plan("last_layer_heads", 2, 2, False) == [(1, 0), (1, 1), (0, "mean"), (1, "mean")]


def test_budget_keeps_the_highest_scoring_detections(demo_record) -> None:
    record, queries, size = demo_record
    cells = int((~record.feature_padding_mask[0]).sum())
    per_detection = len(slice_plan("layer_mean", 3, 8, True)) * cells * 2
    grids = build_grids(record, 0, queries, [0.5, 0.9, 0.7], size, budget_bytes=2 * per_detection)
    raw = grids.methods["raw"]
    assert grids.detail == "layer_mean" and raw.detections == [1, 2]
    assert raw.grids.size * 2 <= 2 * per_detection
    np.testing.assert_array_equal(raw.grids[:, 0], query_cell_maps(record, 0, [7, 11], heads="mean", layers=0).numpy())


def test_sampled_records_offer_no_rollout_and_no_encoder() -> None:
    points = {(layer, 0, head, 0, 0): [((12.0 + 8 * layer, 20.0 + 4 * head), 1.0)] for layer in range(2) for head in range(2)}
    record = sampled_record(points, [(40, 56)], (8, 16), layers=2, heads=2, queries=1)
    grids = build_grids(record, 0, [0], [0.9], (80, 112), encoder_attention=True)
    assert grids.kind == "sampled" and grids.rollout is None and grids.encoder_self is None
    assert grids.methods["raw"].slices == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for s, (layer, head) in enumerate(grids.methods["raw"].slices):
        np.testing.assert_array_equal(grids.methods["raw"].grids[0, s],
                                      query_cell_maps(record, 0, [0], heads=head, layers=layer)[0].numpy())


def test_unknown_grid_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    np.savez(path, meta_json=np.frombuffer(json.dumps({"format": "detr-attn-grids/9"}).encode(), np.uint8))
    with pytest.raises(ValueError, match=r"g\.npz.*detr-attn-grids/9.*" + re.escape(GRIDS_NPZ_FORMAT)):
        load_grids_npz(path)


def _predict(out: Path, *extra: str) -> int:
    return cli_main(["predict", str(DEMO_IMAGE), str(DEMO_IMAGE.with_name("shapes_1.png")), "--out", str(out),
                     "--workers", "0", "--quiet", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer_runs")
    assert _predict(root / "old") == 0  # no --save-attention: as before this feature
    assert _predict(root / "new", "--save-encoder-attention", "--layers", "mean") == 0
    return root


def test_predict_writes_grids_and_keeps_the_maps_npz(runs: Path) -> None:
    reader = RunReader(runs / "new")
    rows = reader.predictions()
    assert [r["key"] for r in rows] == ["shapes_3", "shapes_1"]
    for row in rows:
        maps, meta = load_maps_npz(runs / "new" / row["attention"])  # the maps npz is unchanged
        assert meta["layers"] == "mean" and "grids" not in row
        grids = load_grids_npz(reader.grids(row["key"]))
        assert reader.grids(row["key"]) == runs / "new" / grids_name(row["key"])
        assert grids.methods["raw"].detections == list(range(len(row["detections"])))
        assert grids.encoder_self is not None and grids.image_jpeg[:2] == b"\xff\xd8"
        # the grids reproduce the saved maps: head mean, layer mean, through cells_to_image, min-max
        mean = grids.methods["raw"].grids[:, [s for s, (_, h) in enumerate(grids.methods["raw"].slices)
                                               if isinstance(h, int)]]
        cells = mean.reshape(len(mean), grids.layers, grids.heads, *grids.valid_size).mean(axis=(1, 2))
        image = cells_to_image(cells, grids.feature_stride, grids.input_size, grids.image_size)
        low, high = image.min(axis=(1, 2), keepdims=True), image.max(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose((image - low) / (high - low), maps, atol=3e-3)
    fingerprint = json.loads((runs / "new" / "run.json").read_text())["fingerprint"]
    assert fingerprint["grids"] == {"format": GRIDS_NPZ_FORMAT, "budget_bytes": 4 * 2**20, "encoder_attention": True}
    assert "grids" not in json.loads((runs / "old" / "run.json").read_text())["fingerprint"]


def test_viewer_of_a_run_without_saved_attention_is_a_clear_error(runs: Path, capsys) -> None:
    with pytest.raises(NoSavedAttention, match="--save-attention"):
        write_viewer(runs / "old")
    assert cli_main(["report", str(runs / "old"), "--viewer"]) == 2
    stderr = capsys.readouterr().err
    assert "no saved attention grids" in stderr and "--save-attention" in stderr
    assert not (runs / "old" / "report").exists()


def test_viewer_cli_writes_one_offline_file(runs: Path, capsys) -> None:
    assert cli_main(["report", str(runs / "new"), "--viewer", "--title", "</script><b>x</b>"]) == 0
    page = (runs / "new" / "report" / "viewer.html").read_text()
    assert "2 images" in capsys.readouterr().out
    # nothing fetched: no URL but the SVG namespace; the title cannot close the script
    assert set(re.findall(r"https?://[^\s\"')]+", page)) == {"http://www.w3.org/2000/svg"}
    assert page.count("</script>") == 2 and "&lt;/script&gt;&lt;b&gt;" in page
    payload, skipped = viewer_payload(runs / "new")
    assert skipped == [] and [e["key"] for e in payload["images"]] == ["shapes_3", "shapes_1"]
    entry = payload["images"][0]
    assert entry["canvas"] == [2 * entry["display"][0], 2 * entry["display"][1]]  # 210 px long side: zoom 2
    data = re.search(r'id="viewer-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data.replace("<\\/", "</"))["images"][1]["key"] == "shapes_1"


def test_colormap_table_is_the_overlays_colormap() -> None:
    table = np.array(colormap_table(), dtype=np.uint8)
    levels = np.array([0.0, 0.2, 0.5, 1.0], dtype=np.float32)[None]
    np.testing.assert_array_equal(apply_colormap(levels)[0], table[np.rint(levels[0] * 255).astype(int)])


def test_page_escapes_script_closers_in_data() -> None:
    page = viewer_html({"title": "t", "images": [{"file": "a</script>b"}]})
    assert "a<\\/script>b" in page and page.count("</script>") == 2


def test_viewer_offers_the_explain_methods_saved_on_the_same_cells(tmp_path: Path) -> None:
    """predict --save-attention --explain: relevance / attn-grad join the viewer as methods
    without layer / head axes, their grids the saved cells; D-RISE (another grid) stays out."""
    import base64

    out = tmp_path / "run"
    assert _predict(out, "--save-attention", "--explain", "raw,attn-grad,relevance,drise", "--drise-masks", "4",
                    "--drise-grid", "4") == 0
    payload, _ = viewer_payload(out)
    reader = RunReader(out)
    checked = 0
    for entry, row in zip(payload["images"], reader.predictions()):
        assert set(entry["methods"]) == {"raw", "attn-grad", "relevance"}
        for method in ("attn-grad", "relevance"):
            cells, _ = load_maps_npz(reader.method_attention(row["key"], method), size=None)
            shown = entry["methods"][method]
            assert shown["slices"] == [["all", "all"]] and shown["detections"] == list(range(len(cells)))
            grids = np.frombuffer(base64.b64decode(shown["grids"]), dtype="<f2").reshape(len(cells), 1, *cells.shape[1:])
            np.testing.assert_allclose(grids[:, 0], cells, rtol=1e-3, atol=1e-7)  # float16 in the page
            checked += len(cells)
    assert checked > 0


def test_write_npz_holds_what_savez_compressed_holds(tmp_path: Path) -> None:
    from detection.runfolder.grids import write_npz

    rng = np.random.default_rng(2)
    arrays = {"grid_raw": rng.random((3, 5, 4, 6)).astype(np.float16), "image_jpeg": rng.integers(0, 256, 999, np.uint8),
              "meta_json": np.frombuffer(b'{"format": "x"}', np.uint8), "empty": np.zeros((0, 3), np.float32)}
    np.savez_compressed(tmp_path / "numpy.npz", **arrays)
    for level in (1, 9):
        with open(tmp_path / f"ours{level}.npz", "wb") as handle:
            write_npz(handle, arrays, level)
        with np.load(tmp_path / f"ours{level}.npz", allow_pickle=False) as ours, \
                np.load(tmp_path / "numpy.npz", allow_pickle=False) as theirs:
            assert ours.files == theirs.files == list(arrays)
            for name in arrays:
                assert ours[name].dtype == theirs[name].dtype
                np.testing.assert_array_equal(ours[name], theirs[name])
    with pytest.raises(ValueError):
        with open(tmp_path / "objects.npz", "wb") as handle:
            write_npz(handle, {"bad": np.array([object()], dtype=object)}, 1)
