"""SampledCapture on small random HF deformable detectors: the captured points ARE the attention used.

Per family (Deformable DETR single-stage / box-refine / two-stage, RT-DETR, RT-DETR v2 with both
samplers, D-FINE with a points list and the discrete sampler, RF-DETR, DEIMv2 with its HGNetV2
(hybrid and lite encoders) and DINOv3 backbones, LW-DETR on two projector levels): (a) the per-level splat
reproduces the sampling core's output, (b) every decoder layer is found and a model whose
modules moved makes the capture fail loudly, (c) the capture changes no output, (d) planted
points land in their own region of the image map with the padding cropped, (e) the AIFI
encoder attention reproduces its layer's output. Plus the per-level geometry of the maps.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_sampled_models as models  # noqa: E402

from detection.attention.maps import detection_maps, query_cell_maps  # noqa: E402
from detection.attention.sampled import footprint_weights, level_splats, splat_on_level, spread_footprint  # noqa: E402
from detection.models.hf.capture_sampled import SampledCapture  # noqa: E402
from detection.models.outputs import AttentionRecord, SampledAttention  # noqa: E402

IMAGE_SIZES = torch.tensor([[64, 96], [48, 64]])
LW_DETR_LIKE = ("rf_detr", "lw_detr")  # decoder layers' `cross_attn` (the others: `encoder_attn`)
CORE_ATTRIBUTE = ("d_fine", "deimv2")  # the instance attribute `ms_deformable_attn_core`
_BUILT: dict[str, nn.Module] = {}


def model_of(family: str) -> nn.Module:
    if family not in _BUILT:
        _BUILT[family] = models.build(family)
    return _BUILT[family]


def model_type(family: str) -> str:
    return model_of(family).config.model_type


def cross_module(model: nn.Module, layer: int) -> nn.Module:
    decoder_layer = model.model.decoder.layers[layer]
    return decoder_layer.cross_attn if model.config.model_type in LW_DETR_LIKE else decoder_layer.encoder_attn


def hook_counts(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(module._forward_hooks), len(module._forward_pre_hooks)) for module in model.modules()]


def run(model, capture=None, images=None, padding=None):
    images, padding = models.batch() if images is None else (images, padding)
    with torch.no_grad():
        if capture is None:
            return model(pixel_values=images, pixel_mask=(~padding).long()), None
        with capture:
            outputs = model(pixel_values=images, pixel_mask=(~padding).long(), **capture.forward_kwargs())
        return outputs, capture.record(outputs, input_size=tuple(images.shape[-2:]), image_sizes=IMAGE_SIZES,
                                       padding_mask=padding)


_RUNS: dict[str, dict] = {}


def runs_of(family: str) -> dict:
    """One plain run and one captured run (with a Spy on the last decoder layer's sampling core),
    cached. Eager models capture everything (decoder self-attention, AIFI encoder attention with
    its layer's inputs and outputs), the others the cross-attention only."""
    if family in _RUNS:
        return _RUNS[family]
    model = model_of(family)
    result: dict = {"hooks": hook_counts(model)}
    result["plain"], _ = run(model)
    everything = model.config._attn_implementation == "eager"
    aifi = (everything and model_type(family) in ("rt_detr", "rt_detr_v2", "d_fine", "deimv2")
            and getattr(model.config, "encoder_type", "hybrid") != "lite")
    seen, handles = {}, []
    if aifi:
        self_attn = model.model.encoder.aifi[-1].layers[0].self_attn
        handles = [
            self_attn.register_forward_pre_hook(lambda _m, _a, kwargs: seen.update(hidden=kwargs["hidden_states"]),
                                                with_kwargs=True),
            self_attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.update(output=args[0])),
        ]
    try:
        with Spy(model, model.config.decoder_layers - 1) as spy:
            result["captured"], result["record"] = run(model, SampledCapture(model, decoder_self=everything, encoder=aifi))
    finally:
        for handle in handles:
            handle.remove()
    result["spy"], result["aifi"] = spy.seen, seen
    _RUNS[family] = result
    return result


class Spy:
    """Records the sampling core's input value and output of one decoder layer, independently of the capture."""

    def __init__(self, model: nn.Module, layer: int):
        self.model, self.layer, self.seen = model, layer, {}
        self.module = cross_module(model, layer)

    def __enter__(self):
        family = self.model.config.model_type
        if family in ("deformable_detr", "rt_detr", *LW_DETR_LIKE):
            handle = self.module.attn.register_forward_hook(
                lambda _m, args, output: self.seen.update(value=args[0], output=output))
            self.undo = handle.remove
        else:
            owner = sys.modules[type(self.module).__module__] if family == "rt_detr_v2" else self.module
            name = "multi_scale_deformable_attention_v2" if family == "rt_detr_v2" else "ms_deformable_attn_core"
            original = getattr(owner, name)
            active = {"on": family in CORE_ATTRIBUTE}

            def spy(*args, **kwargs):
                output = original(*args, **kwargs)
                if active["on"]:
                    self.seen.update(value=args[0], output=output)
                return output

            setattr(owner, name, spy)
            handles = []
            if family == "rt_detr_v2":
                handles = [self.module.register_forward_pre_hook(lambda *_: active.update(on=True)),
                           self.module.register_forward_hook(lambda *_: active.update(on=False))]

            def undo():
                for handle in handles:
                    handle.remove()
                if family in CORE_ATTRIBUTE:
                    del self.module.ms_deformable_attn_core  # back to the instance attribute below
                    self.module.ms_deformable_attn_core = original
                else:
                    setattr(owner, name, original)
            self.undo = undo
        return self

    def __exit__(self, *exc):
        self.undo()


# -- (a) reproduction: sum over cells of splat * value == the core's output ----------------------
@pytest.mark.parametrize("family", models.FAMILIES)
def test_splat_times_value_reproduces_the_sampling_core_output(family):
    model, runs = model_of(family), runs_of(family)
    layer = model.config.decoder_layers - 1
    sampled = runs["record"].decoder_cross_sampled
    value, output = runs["spy"]["value"].double(), runs["spy"]["output"].double()  # (B, S, heads, hd), (B, Q, heads*hd)
    batch, _, heads, head_dim = value.shape
    values = value.split([h * w for h, w in sampled.level_sizes], dim=1)
    queries = torch.arange(sampled.num_queries)
    for image in range(batch):
        splats = level_splats(sampled, image, queries)  # per level (L, heads, Q, h_l, w_l)
        rebuilt = sum(
            torch.einsum("hqc,chd->qhd", splat[layer].flatten(-2), level_value[image])
            for splat, level_value in zip(splats, values)
        )
        expected = output[image].reshape(sampled.num_queries, heads, head_dim)
        assert (rebuilt - expected).abs().max() <= 1e-5, family
        assert expected.abs().max() > 1e-2  # a live output, not zeros
    expected_sampler = "nearest" if family in ("rt_detr_v2_discrete", "d_fine") else "bilinear"
    assert sampled.sampler == expected_sampler
    if family == "d_fine":
        assert sampled.points_per_level == (3, 1, 2)


def test_nearest_splat_is_the_transpose_of_hf_discrete_sampling_with_clamping():
    from transformers.models.d_fine.modeling_d_fine import multi_scale_deformable_attention_v2

    generator = torch.Generator().manual_seed(0)
    sizes, counts = [(5, 7), (3, 4)], [3, 2]
    value = torch.randn(1, 35 + 12, 2, 4, generator=generator, dtype=torch.float64).float()
    locations = torch.rand(1, 6, 2, 5, 2, generator=generator) * 1.4 - 0.2  # some outside: clamped
    weights = torch.rand(1, 6, 2, 5, generator=generator)
    output = multi_scale_deformable_attention_v2(value, sizes, locations, weights, counts, "discrete")
    rebuilt = torch.zeros(6, 2, 4, dtype=torch.float64)
    for level, (loc, wgt, val) in enumerate(zip(locations.split(counts, 3), weights.split(counts, 3),
                                                value.split([35, 12], 1))):
        splat = splat_on_level(loc[0], wgt[0], sizes[level], "nearest")  # (Q, heads, h, w)
        rebuilt += torch.einsum("qhc,chd->qhd", splat.flatten(-2), val[0].double())
    assert (rebuilt - output[0].reshape(6, 2, 4).double()).abs().max() <= 1e-6


def test_discrete_cells_are_read_in_the_model_dtype():
    from transformers.models.d_fine.modeling_d_fine import multi_scale_deformable_attention_v2

    from detection.models.hf.capture_sampled import _read_cells

    generator = torch.Generator().manual_seed(1)
    sizes, counts = [(37, 53), (19, 27)], [4, 4]
    value = torch.randn(1, 37 * 53 + 19 * 27, 1, 1, generator=generator).to(torch.bfloat16)
    locations = torch.rand(1, 400, 1, 8, 2, generator=generator).to(torch.bfloat16)
    weights = torch.zeros(1, 400, 1, 8, dtype=torch.bfloat16)
    weights[..., 0] = 1.0  # each query reads one level-0 point: the output IS the value read
    output = multi_scale_deformable_attention_v2(value, sizes, locations, weights, counts, "discrete")
    cells = _read_cells(locations, sizes, counts)  # float32 c / w
    splat = splat_on_level(cells[0, :, :, :4], weights[0, :, :, :4].float(), sizes[0], "nearest")
    rebuilt = torch.einsum("qhc,ch->q", splat.flatten(-2), value[0, : 37 * 53, :, 0].double())
    assert torch.equal(rebuilt.float(), output[0, :, 0].float())
    # float32 arithmetic on the raw bf16 locations would pick other cells for some points
    naive = splat_on_level(locations[0, :, :, :4].float(), weights[0, :, :, :4].float(), sizes[0], "nearest")
    assert not torch.equal(naive, splat)


# -- (b) every decoder layer, loud failure when nothing is found ------------------------------------
@pytest.mark.parametrize("family", ["deformable_detr", "rt_detr", "rt_detr_v2", "d_fine", "rf_detr", "deimv2",
                                    "deimv2_dinov3", "deimv2_lite", "lw_detr"])
def test_capture_finds_every_decoder_layer_and_fails_loudly_when_modules_moved(family):
    model = model_of(family)
    record = runs_of(family)["record"]
    sampled = record.decoder_cross_sampled
    assert sampled.weights.shape[0] == model.config.decoder_layers
    # softmax weights of every layer, image, head and query sum to 1 over levels x points
    torch.testing.assert_close(sampled.weights.sum(dim=(-2, -1)), torch.ones(sampled.weights.shape[:4]))
    assert record.num_queries == model.config.num_queries

    class Moved(nn.Module):  # HF renamed / restructured its attention: the capture cannot see it
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

        def forward(self, *args, **kwargs):
            return self.wrapped(*args, **kwargs)

    name = "cross_attn" if model_type(family) in LW_DETR_LIKE else "encoder_attn"
    layers = model.model.decoder.layers
    originals = [getattr(layer, name) for layer in layers]
    try:
        if family == "rt_detr":  # one layer moved: named in the error
            setattr(layers[0], name, Moved(originals[0]))
            with pytest.raises(RuntimeError, match=rf"{family}: .*layers \[0\] of 2 missing.*transformers {transformers.__version__}"):
                run(model, SampledCapture(model))
        for layer, original in zip(layers, originals):
            setattr(layer, name, Moved(original))
        with pytest.raises(RuntimeError, match=rf"{model_type(family)}: the capture found no decoder .*transformers {transformers.__version__}"):
            run(model, SampledCapture(model))
    finally:
        for layer, original in zip(layers, originals):
            setattr(layer, name, original)


def test_unsupported_model_types_and_requests_are_refused():
    with pytest.raises(ValueError, match="model types"):
        SampledCapture(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no dense encoder self-attention"):
        SampledCapture(model_of("deformable_detr"), encoder=True)
    with pytest.raises(ValueError, match="deimv2 with encoder_type 'lite' has no AIFI"):
        SampledCapture(model_of("deimv2_lite"), encoder=True)


@pytest.mark.parametrize("family, strides, sizes", [
    ("deimv2", (8, 16, 32), ((8, 12), (4, 6), (2, 3))),  # HGNetV2: config.feat_strides
    ("deimv2_dinov3", (8, 16, 32), ((8, 12), (4, 6), (2, 3))),  # DINOv3 patch 16 resized x2, x1, x0.5
    ("deimv2_lite", (16, 32), ((4, 6), (2, 3))),  # lite encoder: two levels
    ("lw_detr", (4, 16), ((16, 24), (4, 6))),  # patch 8 over projector scales 2.0 and 0.5
])
def test_level_strides_of_each_backbone_agree_with_the_levels_the_model_ran(family, strides, sizes):
    sampled = runs_of(family)["record"].decoder_cross_sampled  # on the 64 x 96 batch
    assert sampled.level_strides == strides and sampled.level_sizes == sizes
    with pytest.raises(RuntimeError, match=rf"{model_type(family)}: level of .* disagrees with stride"):
        SampledCapture(model_of(family))._check_strides(sizes, tuple(2 * s for s in strides), (64, 96))


# -- (c) capture changes nothing; patches are undone -----------------------------------------------
@pytest.mark.parametrize("family", models.FAMILIES)
def test_capture_changes_no_output_and_restores_the_model(family):
    model, runs = model_of(family), runs_of(family)
    plain, captured = runs["plain"], runs["captured"]
    assert torch.equal(plain.logits, captured.logits) and torch.equal(plain.pred_boxes, captured.pred_boxes)
    if model.config._attn_implementation == "eager":  # self-attention was captured too, same kernels
        record = runs["record"]
        assert record.decoder_self.shape == (2, 2, 2, 10, 10)
        torch.testing.assert_close(record.decoder_self.sum(-1), torch.ones(2, 2, 2, 10))
    assert hook_counts(model) == runs["hooks"]
    module = cross_module(model, 0)
    if model_type(family) in CORE_ATTRIBUTE:  # d_fine / deimv2: their own modeling module's function
        modeling = sys.modules[type(module).__module__]
        assert module.ms_deformable_attn_core is modeling.multi_scale_deformable_attention_v2
    if family.startswith("rt_detr_v2"):
        from transformers.models.rt_detr_v2 import modeling_rt_detr_v2

        assert not hasattr(modeling_rt_detr_v2.multi_scale_deformable_attention_v2, "_detection_capture")


@pytest.mark.parametrize("family", ["rt_detr_v2", "d_fine", "deformable_detr", "deimv2"])
def test_patches_and_hooks_are_removed_when_the_forward_raises(family):
    model = model_of(family)
    from transformers.models.rt_detr_v2 import modeling_rt_detr_v2

    before = modeling_rt_detr_v2.multi_scale_deformable_attention_v2
    hooks = hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with SampledCapture(model, decoder_self=True):
            raise RuntimeError("boom")
    assert modeling_rt_detr_v2.multi_scale_deformable_attention_v2 is before
    assert hook_counts(model) == hooks
    assert "ms_deformable_attn_core" not in cross_module(model, 0).__dict__ or family in CORE_ATTRIBUTE
    if family == "deformable_detr":
        assert model.config._attn_implementation == "sdpa"  # switched to eager inside the block only


# -- (d) geometry: planted points light their own region, padding cropped ------------------------------
def planted(record: AttentionRecord, image: int, points: list[tuple[int, float, float, float]]) -> AttentionRecord:
    """The record with query 0's last layer replaced by `points` [(level, x_px, y_px, weight)] in every head."""
    sampled = record.decoder_cross_sampled
    locations, weights = sampled.locations.clone(), sampled.weights.clone()
    weights[-1, image, :, 0] = 0.0
    for slot, (level, x_px, y_px, weight) in enumerate(points):
        (height, width), stride = sampled.level_sizes[level], sampled.level_strides[level]
        locations[-1, image, :, 0, level, slot] = torch.tensor([x_px / (width * stride), y_px / (height * stride)])
        weights[-1, image, :, 0, level, slot] = weight
    new = SampledAttention(locations=locations, weights=weights, level_sizes=sampled.level_sizes,
                           level_strides=sampled.level_strides, points_per_level=sampled.points_per_level,
                           sampler=sampled.sampler)
    return AttentionRecord(decoder_cross_sampled=new, feature_padding_mask=record.feature_padding_mask,
                           feature_stride=record.feature_stride, input_size=record.input_size,
                           image_sizes=record.image_sizes)


@pytest.mark.parametrize("family", ["deformable_detr", "rt_detr", "rf_detr", "deimv2", "deimv2_dinov3"])
def test_planted_points_light_their_own_region_of_the_image_and_padding_is_cropped(family):
    record = runs_of(family)["record"]
    # image 1: input 48 x 64 inside the 64 x 96 batch; its original image is twice as large
    original = (96, 128)
    # level 0 (stride 8): the centre of cell (row 1, col 2) -> input x [16, 24), y [8, 16)
    # -> original x [32, 48), y [16, 32); a second point sits in the padding (input x 80)
    record_0 = planted(record, 1, [(0, 20.0, 12.0, 0.5), (0, 84.0, 4.0, 0.5)])
    maps = detection_maps(record_0, 1, [0], original, normalize=None, interpolation="nearest")
    assert maps.shape == (1, 96, 128)
    expected = np.zeros(original, dtype=np.float32)
    expected[16:32, 32:48] = 0.5
    np.testing.assert_allclose(maps[0], expected, atol=1e-6)
    if len(record.decoder_cross_sampled.level_sizes) > 1:
        # level 1 (stride 16): the centre of its cell (0, 1) -> input x [16, 32), y [0, 16): the
        # cell's footprint, four level-0 cells, each with a quarter of the weight
        record_1 = planted(record, 1, [(1, 24.0, 8.0, 1.0)])
        maps = detection_maps(record_1, 1, [0], original, normalize=None, interpolation="nearest")
        expected = np.zeros(original, dtype=np.float32)
        expected[0:32, 32:64] = 0.25
        np.testing.assert_allclose(maps[0], expected, atol=1e-6)


def test_planted_point_of_the_discrete_sampler_lights_the_cell_the_model_indexed():
    record = runs_of("d_fine")["record"]
    # input x 27.9 on level 0 (stride 8, w 12): x·w + 0.5 = 27.9/8 + 0.5 = 3.99 -> column 3
    # (input x [24, 32)); y 3.0 -> 0.875 -> row 0; bilinear would have split it over columns 2 and 3
    planted_record = planted(record, 0, [(0, 27.9, 3.0, 1.0)])
    cells = query_cell_maps(planted_record, 0, [0])[0]
    expected = torch.zeros_like(cells)
    expected[0, 3] = 1.0
    torch.testing.assert_close(cells, expected)


def test_footprint_weights_spread_coarse_cells_over_level0_and_keep_level0_exact():
    torch.testing.assert_close(footprint_weights(5, 8, 5, 8), torch.eye(5, dtype=torch.float64))
    shares = footprint_weights(6, 8, 3, 16)  # each stride-16 cell covers two stride-8 cells
    torch.testing.assert_close(shares, torch.tensor([[0.5, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0.5, 0],
                                                     [0, 0, 0.5], [0, 0, 0.5]], dtype=torch.float64))
    shares = footprint_weights(5, 8, 2, 32)  # the second stride-32 cell overhangs level 0's 40 px
    torch.testing.assert_close(shares.sum(0), torch.tensor([1.0, 0.25], dtype=torch.float64))


def test_spread_footprint_block_repeat_equals_the_overlap_matrices():
    generator = torch.Generator().manual_seed(5)
    level_map = torch.rand(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    for stride, size in ((16, (7, 9)), (32, (13, 21)), (16, (9, 11))):  # cropped, and padded with zeros
        fast = spread_footprint(level_map, stride, 8, size)
        rows = footprint_weights(size[0], 8, 4, stride)
        cols = footprint_weights(size[1], 8, 5, stride)
        torch.testing.assert_close(fast, rows @ level_map @ cols.T)
    odd = spread_footprint(level_map, 12, 8, (6, 8))  # a stride that is no multiple: the matrices
    torch.testing.assert_close(odd, footprint_weights(6, 8, 4, 12) @ level_map @ footprint_weights(8, 8, 5, 12).T)


def test_footprint_maps_keep_the_mass_of_points_inside_every_level():
    record = runs_of("rt_detr_v2_discrete")["record"]
    # the discrete sampler clamps, so every point lands on some cell of its level; levels
    # (8, 12) / (4, 6) / (2, 3) at strides 8 / 16 / 32 tile the 64 x 96 input exactly
    maps = query_cell_maps(record, 0, list(range(10)), heads=0, layers=0)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(10))


# -- ragged levels in the record --------------------------------------------------------------------
def test_ragged_levels_are_padded_slots_with_zero_weight():
    generator = torch.Generator().manual_seed(4)
    flat_locations = [torch.rand(1, 3, 2, 6, 2, generator=generator) for _ in range(2)]
    flat_weights = [torch.rand(1, 3, 2, 6, generator=generator) for _ in range(2)]
    sampled = SampledAttention.from_layers(flat_locations, flat_weights, [(4, 6), (2, 3), (1, 2)], (8, 16, 32),
                                           points_per_level=(3, 1, 2), sampler="nearest")
    assert sampled.locations.shape == (2, 1, 2, 3, 3, 3, 2) and sampled.points_per_level == (3, 1, 2)
    # layer 1, head 1, query 2: level 1's only point is flat point 3; level 2's are 4 and 5
    assert torch.equal(sampled.locations[1, 0, 1, 2, 1, 0], flat_locations[1][0, 2, 1, 3])
    assert torch.equal(sampled.weights[1, 0, 1, 2, 2, :2], flat_weights[1][0, 2, 1, 4:6])
    assert torch.equal(sampled.weights[..., 1, 1:], torch.zeros(2, 1, 2, 3, 2))
    assert sampled.point_mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    weights = sampled.weights.clone()
    weights[0, 0, 0, 0, 1, 2] = 0.1
    with pytest.raises(ValueError, match="padding point slots"):
        SampledAttention(locations=sampled.locations, weights=weights, level_sizes=sampled.level_sizes,
                         level_strides=sampled.level_strides, points_per_level=(3, 1, 2))
    with pytest.raises(ValueError, match="bilinear sampler only"):
        SampledAttention(locations=sampled.locations, weights=sampled.weights, level_sizes=sampled.level_sizes,
                         level_strides=sampled.level_strides, points_per_level=(3, 1, 2), sampler="nearest",
                         level_combination="at_points")


# -- (e) AIFI encoder self-attention ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["rt_detr", "rt_detr_v2", "d_fine", "deimv2", "deimv2_dinov3"])
def test_aifi_attention_times_values_reproduces_the_attention_output(family):
    model, runs = model_of(family), runs_of(family)
    self_attn = model.model.encoder.aifi[-1].layers[0].self_attn
    record, seen = runs["record"], runs["aifi"]
    assert record.encoder_self_size == (2, 3) and record.encoder_self_stride == 32  # the top level, stride 32
    attention = record.encoder_self[0].double()  # (B, heads, 6, 6)
    batch, heads, cells, _ = attention.shape
    values = self_attn.v_proj(seen["hidden"]).detach().double().view(batch, cells, heads, -1)
    rebuilt = torch.einsum("bhij,bjhd->bihd", attention, values).reshape(batch, cells, -1)
    assert (rebuilt - seen["output"].double()).abs().max() <= 1e-5
    torch.testing.assert_close(record.encoder_self.sum(-1), torch.ones(1, batch, heads, cells))
    one = record.select_image(1)
    assert torch.equal(one.encoder_self, record.encoder_self[:, 1:2]) and one.encoder_self_size == (2, 3)


def test_aifi_capture_switches_to_eager_inside_the_block_only():
    model, runs = model_of("rt_detr"), runs_of("rt_detr")
    model.config._attn_implementation_internal = "sdpa"
    try:
        outputs, record = run(model, SampledCapture(model, encoder=True))
        assert model.config._attn_implementation == "sdpa"
    finally:
        model.config._attn_implementation_internal = "eager"
    # eager inside the block: the very outputs and weights of the eager model
    assert torch.equal(outputs.logits, runs["plain"].logits)
    assert torch.equal(record.encoder_self, runs["record"].encoder_self)


def test_record_checks_the_encoder_grid():
    record = runs_of("rt_detr")["record"]
    fields = dict(decoder_cross_sampled=record.decoder_cross_sampled, feature_padding_mask=record.feature_padding_mask,
                  feature_stride=8, input_size=(64, 96), image_sizes=IMAGE_SIZES)
    with pytest.raises(ValueError, match="encoder_self_size"):
        AttentionRecord(encoder_self=record.encoder_self, **fields)
    with pytest.raises(ValueError, match=r"\(L_enc, B, heads, 4, 4\)"):
        AttentionRecord(encoder_self=record.encoder_self, encoder_self_size=(2, 2), encoder_self_stride=32, **fields)
