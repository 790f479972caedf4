"""Map geometry (padding, stride, resize), batch == alone, encoder point maps, npz round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detection.attention.aggregate import decoder_rollout
from detection.attention.maps import (cells_to_image, detection_maps, encoder_point_maps, image_points_to_cells, query_cell_maps, valid_feature_size)
from detection.runfolder.maps_npz import load_maps_npz, map_metadata, save_maps_npz
from detection.models.outputs import AttentionRecord
from detection.structures import Detections


def make_record(
    input_sizes: list[tuple[int, int]],
    stride: int,
    layers: int = 2,
    heads: int = 2,
    queries: int = 4,
    seed: int = 0,
    encoder: bool = False,
    decoder_self: bool = False,
    junk_in_padding: bool = True,
) -> AttentionRecord:
    """A random but valid record of a padded batch: softmax over each image's valid cells.

    Padded cells of cross-attention carry junk (not 0) to prove they are cropped, not trusted.
    """
    generator = torch.Generator().manual_seed(seed)
    batch_h = max(h for h, _ in input_sizes)
    batch_w = max(w for _, w in input_sizes)
    grid_h, grid_w = math.ceil(batch_h / stride), math.ceil(batch_w / stride)
    batch = len(input_sizes)
    mask = torch.ones(batch, grid_h, grid_w, dtype=torch.bool)
    cross = torch.zeros(layers, batch, heads, queries, grid_h, grid_w)
    enc = torch.zeros(layers, batch, heads, grid_h * grid_w, grid_h * grid_w) if encoder else None
    for b, (h, w) in enumerate(input_sizes):
        valid_h, valid_w = math.ceil(h / stride), math.ceil(w / stride)
        mask[b, :valid_h, :valid_w] = False
        logits = torch.randn(layers, heads, queries, valid_h * valid_w, generator=generator)
        cross[:, b, :, :, :valid_h, :valid_w] = logits.softmax(-1).reshape(layers, heads, queries, valid_h, valid_w)
        if junk_in_padding:
            cross[:, b][..., mask[b]] = torch.rand(layers, heads, queries, int(mask[b].sum()), generator=generator)
        if encoder:
            flat = (torch.arange(valid_h)[:, None] * grid_w + torch.arange(valid_w)[None]).reshape(-1)
            cells = len(flat)
            weights = torch.randn(layers, heads, cells, cells, generator=generator).softmax(-1)
            # padded query rows attend somewhere too (junk); padded key columns stay 0
            enc[:, b, :, :, flat] = torch.rand(layers, heads, grid_h * grid_w, cells, generator=generator)
            block = enc[:, b, :, flat]
            block[:, :, :, flat] = weights
            enc[:, b, :, flat] = block
    dec = None
    if decoder_self:
        dec = torch.randn(layers, batch, heads, queries, queries, generator=generator).softmax(-1)
    return AttentionRecord(
        decoder_cross=cross,
        feature_padding_mask=mask,
        feature_stride=stride,
        input_size=(batch_h, batch_w),
        image_sizes=torch.tensor(input_sizes, dtype=torch.int64),
        encoder_self=enc,
        decoder_self=dec,
    )


def one_hot_record(input_size, stride, cell, batch_sizes=None) -> AttentionRecord:
    """Query 0 of image 0 attends only to `cell` (row, col) in the last layer, head 0."""
    record = make_record(batch_sizes or [input_size], stride, layers=2, heads=2, queries=3, seed=3)
    record.decoder_cross[-1, 0, :, 0] = 0.0
    record.decoder_cross[-1, 0, 0, 0, cell[0], cell[1]] = 1.0
    return record


def expected_region(cell, stride, input_size, original_size) -> np.ndarray:
    """Original pixels whose centre lies in the cell's input region (cropped to the input size)."""
    (row, col), (input_h, input_w), (out_h, out_w) = cell, input_size, original_size
    y_lo, y_hi = row * stride * out_h / input_h, min((row + 1) * stride, input_h) * out_h / input_h
    x_lo, x_hi = col * stride * out_w / input_w, min((col + 1) * stride, input_w) * out_w / input_w
    centres_y = np.arange(out_h) + 0.5
    centres_x = np.arange(out_w) + 0.5
    inside_y = (centres_y >= y_lo) & (centres_y < y_hi)
    inside_x = (centres_x >= x_lo) & (centres_x < x_hi)
    return inside_y[:, None] & inside_x[None, :]


# -- geometry -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stride, input_size, original_size, cell",
    [
        (32, (100, 150), (200, 300), (1, 2)),  # interior cell, scale 2
        (32, (100, 150), (200, 300), (3, 4)),  # last cell: overhangs the input (128 > 100, 160 > 150)
        (16, (100, 150), (157, 233), (2, 5)),  # DC5 stride, non-integer scale
        (16, (96, 160), (96, 160), (5, 9)),  # ViT-like, unpadded and unscaled
        (32, (800, 1066), (480, 640), (12, 20)),  # downscaled original
    ],
)
def test_one_hot_cell_lights_exactly_its_region(stride, input_size, original_size, cell):
    record = one_hot_record(input_size, stride, cell)
    maps = detection_maps(
        record, 0, [0], original_size, heads=0, layers="last", normalize=None, interpolation="nearest"
    )
    assert maps.shape == (1, *original_size) and maps.dtype == np.float32
    region = expected_region(cell, stride, input_size, original_size)
    assert region.any()
    np.testing.assert_array_equal(maps[0] == 1.0, region)
    np.testing.assert_array_equal(maps[0][~region], 0.0)


@pytest.mark.parametrize("stride", [32, 16])
def test_one_hot_in_padded_batch_matches_image_alone(stride):
    input_size, original_size, cell = (100, 150), (300, 450), (2, 3)
    alone = one_hot_record(input_size, stride, cell)
    batched = one_hot_record(input_size, stride, cell, batch_sizes=[input_size, (180, 120)])
    assert batched.feature_size != alone.feature_size  # the batch really is padded for image 0
    for interpolation in ("nearest", "bilinear"):
        a = detection_maps(alone, 0, [0], original_size, heads=0, normalize=None, interpolation=interpolation)
        b = detection_maps(batched, 0, [0], original_size, heads=0, normalize=None, interpolation=interpolation)
        np.testing.assert_array_equal(a, b)


def test_bilinear_one_hot_peaks_at_cell_centre_and_half_level_marks_the_cell():
    stride, input_size, original_size, cell = 32, (128, 192), (256, 384), (1, 3)
    record = one_hot_record(input_size, stride, cell)
    saliency = detection_maps(record, 0, [0], original_size, heads=0, normalize="minmax")[0]
    region = expected_region(cell, stride, input_size, original_size)
    ys, xs = np.nonzero(region)
    # the weighted centroid is the cell centre in original pixels ((1.5 * 64, 3.5 * 64))
    total = saliency.sum()
    centroid_y = ((np.arange(256) + 0.5)[:, None] * saliency).sum() / total
    centroid_x = ((np.arange(384) + 0.5)[None, :] * saliency).sum() / total
    assert centroid_y == pytest.approx(1.5 * 64, abs=1e-3)
    assert centroid_x == pytest.approx(3.5 * 64, abs=1e-3)
    # the separable tent exceeds one half exactly over the cell along each axis
    np.testing.assert_array_equal(np.nonzero(saliency.max(axis=0) > 0.5)[0], np.unique(xs))
    np.testing.assert_array_equal(np.nonzero(saliency.max(axis=1) > 0.5)[0], np.unique(ys))


def test_bilinear_equals_upsample_crop_resize_pipeline():
    """Single sampling == F.interpolate to (hv*s, wv*s), crop to input, resize to original."""
    stride, input_size, original_size = 16, (100, 150), (200, 300)
    generator = torch.Generator().manual_seed(5)
    valid_h, valid_w = math.ceil(100 / stride), math.ceil(150 / stride)
    cells = torch.rand(3, valid_h, valid_w, generator=generator)
    ours = cells_to_image(cells, stride, input_size, original_size)
    up = F.interpolate(cells[None], size=(valid_h * stride, valid_w * stride), mode="bilinear", align_corners=False)
    cropped = up[..., : input_size[0], : input_size[1]]
    reference = F.interpolate(cropped, size=original_size, mode="bilinear", align_corners=False)[0].numpy()
    # The reference interpolates twice: its second (input -> original) step cuts the kinks of the
    # piecewise-linear map at cell centres. Values in [0, 1] and 16 px cells give slopes <= 1/16
    # per input pixel, so a kink changes the slope by <= 2/16 per axis and the cut costs at most
    # (2/16)/4 per axis. Away from kinks the two agree, hence the tiny mean difference.
    difference = np.abs(ours - reference)
    assert difference.max() <= 2 * (2 / 16) / 4
    assert difference.mean() < 1e-3


def test_cells_to_image_with_identity_geometry_is_block_repeat():
    cells = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    expected = np.repeat(np.repeat(cells, 4, axis=1), 4, axis=2)
    np.testing.assert_array_equal(cells_to_image(cells, 4, (8, 12), (8, 12), "nearest"), expected)


def test_valid_feature_size_and_bad_masks():
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:3, :2] = False
    assert valid_feature_size(mask) == (3, 2)
    mask[3, 4] = False  # a valid cell outside the top-left block
    with pytest.raises(ValueError, match="top-left block"):
        valid_feature_size(mask)
    with pytest.raises(ValueError, match="top-left block"):
        valid_feature_size(torch.ones(2, 2, dtype=torch.bool))


def test_inconsistent_record_and_bad_queries_raise():
    record = make_record([(100, 150)], 32)
    with pytest.raises(ValueError, match=r"query_index values must lie in \[0, 4\)"):
        detection_maps(record, 0, [4], (100, 150))
    with pytest.raises(ValueError, match="image_index 1 out of range"):
        detection_maps(record, 1, [0], (100, 150))
    record.feature_stride = 16  # 4 x 5 cells of 16 px cannot cover 100 x 150
    with pytest.raises(ValueError, match="record is inconsistent"):
        detection_maps(record, 0, [0], (100, 150))
    with pytest.raises(ValueError, match="original_size"):
        cells_to_image(np.zeros((1, 2, 2)), 8, (16, 16), (0, 5))
    with pytest.raises(ValueError, match="interpolation"):
        cells_to_image(np.zeros((1, 2, 2)), 8, (16, 16), (16, 16), "cubic")


# -- aggregation choices through the map pipeline ----------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        dict(heads="mean", layers="last"),
        dict(heads="max", layers="mean"),
        dict(heads=1, layers=0),
        dict(heads="mean", layers="rollout"),
    ],
)
def test_padded_batch_equals_image_alone_for_every_aggregation(options):
    sizes = [(100, 150), (190, 70)]
    batch = make_record(sizes, 32, layers=3, queries=5, seed=11, encoder=True, decoder_self=True)
    queries = torch.tensor([4, 0, 2])
    for image_index, size in enumerate(sizes):
        alone = make_record([size], 32, layers=3, queries=5, seed=99, encoder=True, decoder_self=True)
        valid_h, valid_w = math.ceil(size[0] / 32), math.ceil(size[1] / 32)
        alone.decoder_cross[:, 0] = batch.decoder_cross[:, image_index, ..., :valid_h, :valid_w]
        alone.decoder_self[:, 0] = batch.decoder_self[:, image_index]
        grid_w = batch.feature_size[1]
        flat = (torch.arange(valid_h)[:, None] * grid_w + torch.arange(valid_w)[None]).reshape(-1)
        alone.encoder_self[:, 0] = batch.encoder_self[:, image_index][:, :, flat][:, :, :, flat]
        original = (size[0] * 2 + 1, size[1] * 3)
        a = detection_maps(alone, 0, queries, original, **options)
        b = detection_maps(batch, image_index, queries, original, **options)
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert a.min() == 0.0 and a.max() == pytest.approx(1.0)


def test_heads_and_layers_pick_the_right_slices():
    record = make_record([(64, 64)], 32, layers=3, heads=2, queries=2, seed=2)
    cross = record.decoder_cross[:, 0]  # (L, heads, Q, 2, 2)
    np.testing.assert_allclose(query_cell_maps(record, 0, [1], heads=1, layers=0)[0], cross[0, 1, 1])
    np.testing.assert_allclose(query_cell_maps(record, 0, [1], heads="max", layers="last")[0], cross[-1, :, 1].amax(0))
    np.testing.assert_allclose(
        query_cell_maps(record, 0, [0], heads="mean", layers="mean")[0], cross[:, :, 0].mean((0, 1)), rtol=1e-6
    )


def test_rollout_uses_record_self_attention():
    record = make_record([(96, 64)], 32, layers=2, queries=3, seed=4, decoder_self=True)
    cross = record.decoder_cross[:, 0].mean(1).reshape(2, 3, -1).double()
    expected = decoder_rollout(cross, record.decoder_self[:, 0].mean(1).double())
    ours = query_cell_maps(record, 0, [2, 0], layers="rollout")
    np.testing.assert_allclose(ours.reshape(2, -1), expected[[2, 0]].float(), rtol=1e-5)
    assert map_metadata(record, 0, layers="rollout")["rollout"] == "chefer2021-raw+decoder_self"


# -- encoder self-attention at points -----------------------------------------------------------------
def test_encoder_point_maps_both_directions():
    stride, input_size, original_size = 32, (96, 128), (192, 256)  # 3 x 4 cells, scale 2
    record = make_record([input_size, (160, 64)], stride, layers=1, heads=1, seed=6, encoder=True)
    grid_w = record.feature_size[1]
    source, target = (0, 1), (2, 3)
    src_flat, tgt_flat = source[0] * grid_w + source[1], target[0] * grid_w + target[1]
    enc = record.encoder_self[0, 0, 0]
    enc[src_flat] = 0.0
    enc[src_flat, tgt_flat] = 1.0  # the source cell looks only at the target cell
    enc[:, tgt_flat] = 0.0
    enc[src_flat, tgt_flat] = 1.0  # ... and nothing else looks at the target
    point_in_source = [(source[0] * 64 + 10, source[1] * 64 + 60)]  # original pixels (y, x)
    point_in_target = [(target[0] * 64 + 63.9, target[1] * 64)]
    outgoing = encoder_point_maps(
        record, 0, point_in_source, original_size, "outgoing", normalize=None, interpolation="nearest"
    )[0]
    np.testing.assert_array_equal(outgoing == 1.0, expected_region(target, stride, input_size, original_size))
    assert outgoing.sum() == expected_region(target, stride, input_size, original_size).sum()
    incoming = encoder_point_maps(
        record, 0, point_in_target, original_size, "incoming", normalize=None, interpolation="nearest"
    )[0]
    np.testing.assert_array_equal(incoming == 1.0, expected_region(source, stride, input_size, original_size))
    assert incoming.sum() == expected_region(source, stride, input_size, original_size).sum()


def test_encoder_point_maps_rollout_and_errors():
    record = make_record([(64, 96)], 32, layers=2, heads=2, seed=8, encoder=True)
    maps = encoder_point_maps(record, 0, [(10, 10), (50, 90)], (64, 96), layers="rollout")
    assert maps.shape == (2, 64, 96) and maps.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside the original image"):
        encoder_point_maps(record, 0, [(64, 0)], (64, 96))
    with pytest.raises(ValueError, match="direction"):
        encoder_point_maps(record, 0, [(0, 0)], (64, 96), direction="both")
    record.encoder_self = None
    with pytest.raises(ValueError, match="no encoder self-attention"):
        encoder_point_maps(record, 0, [(0, 0)], (64, 96))


def test_image_points_to_cells_scales_then_divides_by_stride():
    cells = image_points_to_cells([(0, 0), (199.9, 299.9), (64, 127.9)], (200, 300), (100, 150), 32, (4, 5))
    np.testing.assert_array_equal(cells, [[0, 0], [3, 4], [1, 1]])


# -- npz ------------------------------------------------------------------------------------------------
def make_detections(count: int, size=(40, 60)) -> Detections:
    generator = torch.Generator().manual_seed(count)
    boxes = torch.rand(count, 4, generator=generator) * 20
    boxes[:, 2:] += boxes[:, :2] + 5
    return Detections(
        size,
        boxes=boxes,
        scores=torch.rand(count, generator=generator),
        labels=torch.arange(count),
        query_index=torch.arange(count) * 7,
        class_names=[f"class <{i}> & \"x\"" for i in range(count)],
    )


def test_npz_round_trip(tmp_path):
    detections = make_detections(3)
    record = make_record([(40, 60)], 16, seed=3)
    cells = query_cell_maps(record, 0, [0, 2, 3], heads=1, layers="mean")
    meta = map_metadata(record, 0, heads=1, layers="mean", normalize="percentile")
    path = tmp_path / "attention" / "img.npz"
    save_maps_npz(path, cells, detections, meta["feature_stride"], meta["input_size"], meta)
    stored, loaded_meta = load_maps_npz(path, size=None)
    np.testing.assert_array_equal(stored, cells.numpy())  # float32, un-normalised, exact
    with np.load(path, allow_pickle=False) as archive:
        assert archive["cells"].dtype == np.float32 and sorted(archive.files) == ["cells", "meta_json"]
    loaded, _ = load_maps_npz(path)
    expected = detection_maps(record, 0, [0, 2, 3], (40, 60), heads=1, layers="mean", normalize="percentile")
    np.testing.assert_array_equal(loaded, expected)
    assert loaded_meta["image_size"] == [40, 60] and loaded_meta["valid_feature_size"] == [3, 4]
    assert loaded_meta["query_index"] == [0, 7, 14]
    assert loaded_meta["labels"] == [0, 1, 2]
    np.testing.assert_allclose(loaded_meta["boxes"], detections.boxes.numpy(), rtol=1e-6)
    np.testing.assert_allclose(loaded_meta["scores"], detections.scores.numpy(), rtol=1e-6)
    assert loaded_meta["class_names"][1] == 'class <1> & "x"'
    assert loaded_meta["feature_stride"] == 16 and loaded_meta["heads"] == 1 and loaded_meta["layers"] == "mean"
    assert loaded_meta["normalize"] == "percentile" and loaded_meta["num_maps"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["img.npz"]  # no temp file left behind


def test_npz_empty_detections_round_trip(tmp_path):
    path = tmp_path / "empty.npz"
    save_maps_npz(path, np.zeros((0, 2, 3), np.float32), Detections.empty((5, 7)), 4, (5, 7), {})
    maps, meta = load_maps_npz(path)
    assert maps.shape == (0, 5, 7) and meta["boxes"] == [] and meta["num_maps"] == 0
    assert load_maps_npz(path, size=None)[0].shape == (0, 2, 3)


def test_npz_errors(tmp_path):
    detections = make_detections(2)
    with pytest.raises(ValueError, match="1 maps for 2 detections"):
        save_maps_npz(tmp_path / "a.npz", np.zeros((1, 3, 4)), detections, 16, (40, 60))
    with pytest.raises(ValueError, match=r"do not cover the input size \(40, 60\)"):
        save_maps_npz(tmp_path / "a.npz", np.zeros((2, 2, 4)), detections, 16, (40, 60))
    with pytest.raises(ValueError, match="finite"):
        save_maps_npz(tmp_path / "a.npz", np.full((2, 3, 4), np.nan), detections, 16, (40, 60))
    with pytest.raises(ValueError, match="reserved"):
        save_maps_npz(tmp_path / "a.npz", np.zeros((2, 3, 4)), detections, 16, (40, 60), {"labels": [5, 5]})
    with pytest.raises(ValueError, match="reserved"):
        save_maps_npz(tmp_path / "a.npz", np.zeros((2, 3, 4)), detections, 16, (40, 60), {"feature_stride": 8})
    assert not (tmp_path / "a.npz").exists()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="bad.npz"):
        load_maps_npz(bad)
    other = tmp_path / "other.npz"
    np.savez(other, something=np.zeros(2))
    with pytest.raises(ValueError, match="not a maps npz"):
        load_maps_npz(other)
