"""Sampled (deformable) attention maps: hand-made points with known answers, record API of both kinds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detection.attention.maps import detection_maps, encoder_point_maps, query_cell_maps
from detection.runfolder.maps_npz import map_metadata
from detection.attention.sampled import splat_points, target_coordinates
from detection.models.outputs import AttentionRecord, SampledAttention


def normalised(pixel_xy, level_size, stride):
    """Input pixel (x, y) -> (x, y) normalised over a level's padded grid (grid_sample convention)."""
    height, width = level_size
    return (pixel_xy[0] / (width * stride), pixel_xy[1] / (height * stride))


def level_sizes_for(input_size, strides):
    return tuple((math.ceil(input_size[0] / s), math.ceil(input_size[1] / s)) for s in strides)


def sampled_record(points, image_sizes, strides, layers=1, heads=1, queries=1, decoder_self=None):
    """Record whose query/point slots are filled from `points`.

    points: {(layer, image, head, query, level): [((x_pix, y_pix), weight), ...]} in input pixels;
    unused slots carry weight 0. The batch is padded to the largest image.
    """
    input_size = (max(h for h, _ in image_sizes), max(w for _, w in image_sizes))
    sizes = level_sizes_for(input_size, strides)
    slots = max([len(v) for v in points.values()] + [1])
    locations = torch.zeros(layers, len(image_sizes), heads, queries, len(strides), slots, 2)
    weights = torch.zeros(layers, len(image_sizes), heads, queries, len(strides), slots)
    for (layer, image, head, query, level), entries in points.items():
        for slot, (pixel, weight) in enumerate(entries):
            locations[layer, image, head, query, level, slot] = torch.tensor(normalised(pixel, sizes[level], strides[level]))
            weights[layer, image, head, query, level, slot] = weight
    mask = torch.ones(len(image_sizes), *sizes[0], dtype=torch.bool)
    for b, (h, w) in enumerate(image_sizes):
        mask[b, : math.ceil(h / strides[0]), : math.ceil(w / strides[0])] = False
    return AttentionRecord(
        # these hand-made geometry tests were written for the point-placement geometry
        # ('at_points'); the per-level footprint default is tested in test_capture_sampled.py
        decoder_cross_sampled=SampledAttention(locations=locations, weights=weights, level_sizes=sizes, level_strides=strides,
                                               level_combination="at_points"),
        feature_padding_mask=mask,
        feature_stride=strides[0],
        input_size=input_size,
        image_sizes=torch.tensor(image_sizes, dtype=torch.int64),
        decoder_self=decoder_self,
    )


def cells(record, image=0, query=0, **kwargs):
    return query_cell_maps(record, image, [query], **kwargs)[0].double()


def one_hot(shape, *entries):
    expected = torch.zeros(shape, dtype=torch.float64)
    for (row, col), value in entries:
        expected[row, col] = value
    return expected


# -- geometry of single points ---------------------------------------------------------------
def test_point_at_a_level0_cell_centre_puts_all_weight_in_that_cell():
    # cell (row 1, col 2) of a stride-8 grid has its centre at input pixel (x 20, y 12)
    record = sampled_record({(0, 0, 0, 0, 0): [((20.0, 12.0), 1.0)]}, [(32, 32)], (8,))
    assert record.kind == "sampled" and record.feature_size == (4, 4)
    assert torch.equal(cells(record), one_hot((4, 4), ((1, 2), 1.0)))


def test_point_halfway_between_two_cell_centres_splits_evenly():
    record = sampled_record({(0, 0, 0, 0, 0): [((24.0, 12.0), 0.8)]}, [(32, 32)], (8,))
    assert torch.allclose(cells(record), one_hot((4, 4), ((1, 2), 0.4), ((1, 3), 0.4)), atol=1e-7)


def test_point_on_a_coarser_level_lands_at_its_input_pixel_on_the_finest_grid():
    strides = (8, 16)
    # a fine cell centre (row 2, col 4: input pixel x 36, y 20) given on the stride-16 level
    record = sampled_record({(0, 0, 0, 0, 1): [((36.0, 20.0), 1.0)]}, [(64, 64)], strides)
    location = record.decoder_cross_sampled.locations[0, 0, 0, 0, 1, 0]
    assert torch.allclose(location, torch.tensor([36 / 64, 20 / 64]))
    assert torch.equal(cells(record), one_hot((8, 8), ((2, 4), 1.0)))
    # the centre of coarse cell (1, 2) is the corner shared by fine cells (2..3, 4..5)
    record = sampled_record({(0, 0, 0, 0, 1): [((40.0, 24.0), 1.0)]}, [(64, 64)], strides)
    quarter = [((r, c), 0.25) for r in (2, 3) for c in (4, 5)]
    assert torch.allclose(cells(record), one_hot((8, 8), *quarter), atol=1e-7)


def test_levels_whose_padded_extents_differ_map_through_input_pixels():
    # input 100 px: level 0 (stride 8) has 13 cells = 104 px, level 1 (stride 32) 4 cells = 128 px
    strides = (8, 32)
    record = sampled_record({(0, 0, 0, 0, 1): [((60.0, 60.0), 1.0)]}, [(100, 100)], strides)
    assert record.decoder_cross_sampled.level_sizes == ((13, 13), (4, 4))
    coords = target_coordinates(record.decoder_cross_sampled.locations[0, 0, 0, 0], ((13, 13), (4, 4)), strides, 8)
    assert torch.allclose(coords[1, 0], torch.tensor([7.0, 7.0], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(cells(record), one_hot((13, 13), ((7, 7), 1.0)), atol=1e-5)


def test_weights_of_points_on_different_levels_add():
    points = {
        (0, 0, 0, 0, 0): [((20.0, 12.0), 0.25)],
        (0, 0, 0, 0, 1): [((20.0, 12.0), 0.5)],
        (0, 0, 0, 0, 2): [((20.0, 12.0), 0.125), ((4.0, 4.0), 0.125)],
    }
    record = sampled_record(points, [(32, 32)], (8, 16, 32))
    assert torch.allclose(cells(record), one_hot((4, 4), ((1, 2), 0.875), ((0, 0), 0.125)), atol=1e-7)


def test_point_outside_the_grid_keeps_only_its_inside_share():
    # x = -2 px -> target u = -0.75: corner -1 (outside) would get 0.75, corner 0 gets 0.25
    record = sampled_record({(0, 0, 0, 0, 0): [((-2.0, 12.0), 1.0), ((100.0, 100.0), 1.0)]}, [(32, 32)], (8,))
    assert torch.allclose(cells(record), one_hot((4, 4), ((1, 0), 0.25)), atol=1e-7)


def test_splat_is_the_transpose_of_grid_sample_on_every_level():
    generator = torch.Generator().manual_seed(0)
    strides, input_size = (8, 16, 32), (72, 100)
    sizes = level_sizes_for(input_size, strides)
    target_h, target_w = sizes[0]
    locations = torch.rand(5, 3, 4, 2, generator=generator) * 1.2 - 0.1  # some outside [0, 1]
    weights = torch.rand(5, 3, 4, generator=generator)
    field = torch.randn(target_h, target_w, generator=generator, dtype=torch.float64)
    splat = splat_points(locations, weights, sizes, strides, sizes[0], strides[0])  # (5, h0, w0)
    # the same points as grid_sample coordinates on level 0's padded grid, via input pixels
    extent = torch.tensor([[w * s, h * s] for (h, w), s in zip(sizes, strides)], dtype=torch.float64)
    on_target = locations.double() * extent[:, None, :] / torch.tensor([target_w * 8, target_h * 8], dtype=torch.float64)
    grid = (2 * on_target - 1).reshape(1, 5, -1, 2)
    sampled = F.grid_sample(field[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    expected = (sampled.reshape(5, -1) * weights.double().reshape(5, -1)).sum(-1)
    assert torch.allclose((splat * field).sum(dim=(-2, -1)), expected, atol=1e-10)


def test_total_mass_equals_the_weights_of_points_inside_the_grid():
    generator = torch.Generator().manual_seed(1)
    strides, input_size = (8, 16), (64, 96)
    sizes = level_sizes_for(input_size, strides)
    # both levels span exactly the 64 x 96 input, so one normalised box serves both; keep every
    # point between the outermost cell centres of level 0 so all four corners are inside
    assert sizes == ((8, 12), (4, 6))
    low = torch.tensor([4.0 / 96, 4.0 / 64])
    high = torch.tensor([92.0 / 96, 60.0 / 64])
    locations = low + (high - low) * torch.rand(1, 1, 2, 3, 2, 4, 2, generator=generator)
    weights = torch.rand(1, 1, 2, 3, 2, 4, generator=generator)
    locations[0, 0, 0, 0, 0, 0] = torch.tensor([1.5, 0.5])  # well outside: its weight drops out
    record = AttentionRecord(
        decoder_cross_sampled=SampledAttention(locations=locations, weights=weights, level_sizes=sizes, level_strides=strides,
                                               level_combination="at_points"),
        feature_padding_mask=torch.zeros(1, *sizes[0], dtype=torch.bool), feature_stride=8, input_size=input_size,
        image_sizes=torch.tensor([input_size]),
    )
    for query in range(3):
        inside = weights[0, 0, :, query].double().sum(dim=(-2, -1))  # per head
        if query == 0:
            inside[0] -= float(weights[0, 0, 0, 0, 0, 0])
        for head in range(2):
            total = float(cells(record, query=query, heads=head).sum())
            assert total == pytest.approx(float(inside[head]), abs=1e-6)
        assert float(cells(record, query=query).sum()) == pytest.approx(float(inside.mean()), abs=1e-6)


def test_padding_cells_are_cropped_like_dense_maps():
    # image 1 (16 x 24 input) in a 32 x 32 batch: valid cells (2, 3); a point in its padding is dropped
    points = {(0, 1, 0, 0, 0): [((12.0, 4.0), 0.5), ((28.0, 28.0), 0.5)]}
    record = sampled_record(points, [(32, 32), (16, 24)], (8,))
    cell_map = cells(record, image=1)
    assert cell_map.shape == (2, 3)
    assert torch.equal(cell_map, one_hot((2, 3), ((0, 1), 0.5)))


# -- heads and layers ------------------------------------------------------------------------------
def head_layer_record():
    points = {
        (0, 0, 0, 0, 0): [((4.0, 4.0), 1.0)],  # layer 0, head 0 -> cell (0, 0)
        (0, 0, 1, 0, 0): [((12.0, 4.0), 1.0)],  # layer 0, head 1 -> cell (0, 1)
        (1, 0, 0, 0, 0): [((4.0, 12.0), 1.0)],  # layer 1, head 0 -> cell (1, 0)
        (1, 0, 1, 0, 0): [((4.0, 12.0), 0.5), ((12.0, 12.0), 0.5)],  # layer 1, head 1
    }
    return sampled_record(points, [(16, 16)], (8,), layers=2, heads=2)


def test_heads_reduce_by_mean_max_and_index():
    record = head_layer_record()
    assert torch.equal(cells(record, layers=0, heads="mean"), one_hot((2, 2), ((0, 0), 0.5), ((0, 1), 0.5)))
    assert torch.equal(cells(record, layers=0, heads="max"), one_hot((2, 2), ((0, 0), 1.0), ((0, 1), 1.0)))
    assert torch.equal(cells(record, layers=0, heads=1), one_hot((2, 2), ((0, 1), 1.0)))
    assert torch.equal(cells(record, layers=0, heads="-2"), one_hot((2, 2), ((0, 0), 1.0)))
    with pytest.raises(ValueError, match="head index 2 out of range"):
        cells(record, heads=2)


def test_layers_reduce_by_last_mean_and_index():
    record = head_layer_record()
    last = one_hot((2, 2), ((1, 0), 0.75), ((1, 1), 0.25))
    assert torch.equal(cells(record), last)
    assert torch.equal(cells(record, layers=1), last)
    assert torch.equal(cells(record, layers=-2), one_hot((2, 2), ((0, 0), 0.5), ((0, 1), 0.5)))
    mean = one_hot((2, 2), ((0, 0), 0.25), ((0, 1), 0.25), ((1, 0), 0.375), ((1, 1), 0.125))
    assert torch.equal(cells(record, layers="mean"), mean)
    with pytest.raises(ValueError, match="rollout.*sampled"):
        cells(record, layers="rollout")


def test_many_queries_in_chunks_match_one_by_one(monkeypatch):
    import detection.attention.sampled as sampled_module

    generator = torch.Generator().manual_seed(2)
    points = {
        (layer, 0, head, query, level): [((float(torch.rand(1, generator=generator)) * 48, 20.0), 0.5)]
        for layer in range(2) for head in range(2) for query in range(5) for level in range(2)
    }
    record = sampled_record(points, [(40, 48)], (8, 16), layers=2, heads=2, queries=5)
    together = query_cell_maps(record, 0, [4, 0, 2], layers="mean", heads="max")
    monkeypatch.setattr(sampled_module, "_CHUNK_VALUES", 1)  # one query per chunk
    for row, query in enumerate([4, 0, 2]):
        assert torch.equal(together[row], query_cell_maps(record, 0, [query], layers="mean", heads="max")[0])
    assert query_cell_maps(record, 0, []).shape == (0, 5, 6)
    with pytest.raises(ValueError, match="query_index"):
        query_cell_maps(record, 0, [5])


# -- detection_maps end to end ---------------------------------------------------------------------
def test_detection_maps_of_a_padded_sampled_record_peak_on_the_object():
    strides = (8, 16, 32)
    original_size = (80, 112)  # image 1: input (40, 56), original twice as large
    target = (36.0, 28.0)  # input pixel (x, y) = centre of level-0 cell (3, 4) = original (y 56, x 72)

    def points_for(image):
        return {
            (layer, image, head, 0, level): [(target, 0.2 + 0.1 * level), ((4.0, 36.0), 0.05)]
            for layer in range(2) for head in range(2) for level in range(3)
        }

    batch = sampled_record(points_for(1), [(64, 96), (40, 56)], strides, layers=2, heads=2)
    alone = sampled_record(points_for(0), [(40, 56)], strides, layers=2, heads=2)
    assert batch.feature_padding_mask[1].logical_not().sum() == 5 * 7
    maps = detection_maps(batch, 1, [0], original_size)
    assert maps.shape == (1, 80, 112) and maps.max() == 1.0
    peak_y, peak_x = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    assert abs(peak_y + 0.5 - 56) <= 1 and abs(peak_x + 0.5 - 72) <= 1
    np.testing.assert_allclose(maps, detection_maps(alone, 0, [0], original_size), atol=1e-6)
    meta = map_metadata(batch, 1)
    assert meta["attention_kind"] == "sampled" and meta["level_strides"] == [8, 16, 32]
    assert meta["valid_feature_size"] == [5, 7] and meta["feature_stride"] == 8


# -- the record API of both kinds ------------------------------------------------------------------
def dense_record():
    cross = torch.rand(3, 2, 2, 4, 3, 5)
    return AttentionRecord(
        decoder_cross=cross, feature_padding_mask=torch.zeros(2, 3, 5, dtype=torch.bool), feature_stride=16,
        input_size=(48, 80), image_sizes=torch.tensor([[48, 80], [40, 64]]),
        decoder_self=torch.rand(3, 2, 2, 4, 4),
    )


def test_record_holds_exactly_one_kind_and_checks_the_sampled_geometry():
    dense = dense_record()
    assert dense.kind == "dense" and dense.feature_size == (3, 5) and dense.batch_size == 2 and dense.num_queries == 4
    sampled = sampled_record({}, [(32, 48), (32, 32)], (8, 16), layers=3, heads=2, queries=6)
    assert sampled.kind == "sampled" and sampled.feature_size == (4, 6)
    assert sampled.batch_size == 2 and sampled.num_queries == 6
    points = sampled.decoder_cross_sampled
    with pytest.raises(ValueError, match="exactly one"):
        AttentionRecord(decoder_cross=dense.decoder_cross, decoder_cross_sampled=points,
                        feature_padding_mask=dense.feature_padding_mask, feature_stride=16, input_size=(48, 80),
                        image_sizes=dense.image_sizes)
    with pytest.raises(ValueError, match="level 0's grid"):
        AttentionRecord(decoder_cross_sampled=points, feature_padding_mask=dense.feature_padding_mask,
                        feature_stride=8, input_size=(32, 48), image_sizes=sampled.image_sizes)
    with pytest.raises(ValueError, match="level 0's stride"):
        AttentionRecord(decoder_cross_sampled=points, feature_padding_mask=sampled.feature_padding_mask,
                        feature_stride=16, input_size=(32, 48), image_sizes=sampled.image_sizes)
    with pytest.raises(ValueError, match="encoder_self"):
        AttentionRecord(decoder_cross_sampled=points, feature_padding_mask=sampled.feature_padding_mask,
                        feature_stride=8, input_size=(32, 48), image_sizes=sampled.image_sizes,
                        encoder_self=torch.zeros(1, 2, 1, 24, 24))
    with pytest.raises(ValueError, match="finest"):
        SampledAttention(locations=points.locations, weights=points.weights, level_sizes=((2, 3), (4, 6)),
                         level_strides=(16, 8))
    with pytest.raises(ValueError, match="levels"):
        SampledAttention(locations=points.locations, weights=points.weights, level_sizes=((4, 6),), level_strides=(8,))
    with pytest.raises(TypeError):  # keyword-only constructor
        AttentionRecord(dense.decoder_cross, dense.feature_padding_mask, 16, (48, 80), dense.image_sizes)
    tensor_sizes = SampledAttention(locations=points.locations, weights=points.weights,
                                    level_sizes=torch.tensor([[4, 6], [2, 3]]), level_strides=torch.tensor([8, 16]))
    assert tensor_sizes.level_sizes == ((4, 6), (2, 3)) and tensor_sizes.level_strides == (8, 16)


def test_select_image_of_both_kinds():
    dense = dense_record()
    one = dense.select_image(1)
    assert torch.equal(one.decoder_cross, dense.decoder_cross[:, 1:2]) and torch.equal(one.decoder_self, dense.decoder_self[:, 1:2])
    assert torch.equal(one.image_sizes, dense.image_sizes[1:2]) and one.kind == "dense"
    sampled = sampled_record({(0, 1, 0, 2, 1): [((20.0, 12.0), 1.0)]}, [(32, 48), (32, 32)], (8, 16), queries=3,
                             decoder_self=torch.rand(1, 2, 1, 3, 3))
    one = sampled.select_image(1)
    assert one.kind == "sampled" and one.batch_size == 1 and one.decoder_cross is None
    assert torch.equal(one.decoder_cross_sampled.locations, sampled.decoder_cross_sampled.locations[:, 1:2])
    assert torch.equal(one.decoder_cross_sampled.weights, sampled.decoder_cross_sampled.weights[:, 1:2])
    assert torch.equal(one.feature_padding_mask, sampled.feature_padding_mask[1:2])
    assert torch.equal(one.decoder_self, sampled.decoder_self[:, 1:2])
    assert torch.equal(query_cell_maps(one, 0, [2]), query_cell_maps(sampled, 1, [2]))


def test_to_moves_every_tensor_of_both_kinds():
    dense = dense_record()
    moved = dense.to("meta")
    for name in ("decoder_cross", "feature_padding_mask", "image_sizes", "decoder_self"):
        assert getattr(moved, name).device.type == "meta", name
    assert moved.device.type == "meta" and moved.encoder_self is None
    assert torch.equal(dense.to("cpu").decoder_cross, dense.decoder_cross)
    sampled = sampled_record({}, [(32, 32)], (8, 16)).to("meta")
    assert sampled.decoder_cross_sampled.locations.device.type == "meta"
    assert sampled.decoder_cross_sampled.weights.device.type == "meta" and sampled.device.type == "meta"
    assert sampled.feature_padding_mask.device.type == "meta" and sampled.kind == "sampled"


def test_keep_last_layer_of_both_kinds():
    dense = dense_record()
    last = dense.keep_last_layer()
    assert torch.equal(last.decoder_cross, dense.decoder_cross[-1:])
    assert last.decoder_self is dense.decoder_self  # self-attention kept whole, as predict did
    assert np.array_equal(detection_maps(last, 0, [1], (48, 80)), detection_maps(dense, 0, [1], (48, 80)))
    sampled = head_layer_record()
    last = sampled.keep_last_layer()
    assert last.decoder_cross_sampled.weights.shape[0] == 1
    assert torch.equal(last.decoder_cross_sampled.locations, sampled.decoder_cross_sampled.locations[-1:])
    assert torch.equal(cells(last), cells(sampled))


def test_encoder_point_maps_say_they_need_a_dense_record():
    record = sampled_record({}, [(32, 32)], (8,))
    with pytest.raises(ValueError, match="dense record"):
        encoder_point_maps(record, 0, [(4.0, 4.0)], (32, 32))


def test_from_layers_stacks_the_deformable_detr_layout():
    generator = torch.Generator().manual_seed(3)
    # per layer, HF / Deformable DETR order: (B, Q, heads, levels, points[, 2])
    locations = [torch.rand(2, 5, 4, 3, 2, 2, generator=generator, dtype=torch.float64) for _ in range(3)]
    weights = [torch.rand(2, 5, 4, 3, 2, generator=generator) for _ in range(3)]
    sizes = torch.tensor([[8, 12], [4, 6], [2, 3]])
    sampled = SampledAttention.from_layers(locations, weights, sizes, (8, 16, 32))
    assert sampled.locations.shape == (3, 2, 4, 5, 3, 2, 2) and sampled.locations.dtype == torch.float32
    assert sampled.weights.shape == (3, 2, 4, 5, 3, 2)
    # layer 2, image 1, head 3, query 4 is the per-layer tensor's [1, 4, 3]
    assert torch.equal(sampled.locations[2, 1, 3, 4], locations[2][1, 4, 3].float())
    assert torch.equal(sampled.weights[2, 1, 3, 4], weights[2][1, 4, 3])
    assert sampled.level_sizes == ((8, 12), (4, 6), (2, 3)) and sampled.level_strides == (8, 16, 32)
    with pytest.raises(ValueError, match="same"):
        SampledAttention.from_layers(locations, weights[:2], sizes, (8, 16, 32))
