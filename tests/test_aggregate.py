"""Aggregation maths: head/layer reductions, rollouts against hand-computed examples, normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.attention.aggregate import (
    decoder_rollout,
    encoder_rollout,
    normalize_maps,
    reduce_heads,
    reduce_layers,
    residual_normalized,
    self_relevance,
    self_relevance_rows,
)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# -- reductions ---------------------------------------------------------------------------------
def test_reduce_heads_mean_max_and_index():
    # (L=1, heads=2, K=3)
    attention = t([[[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]]])
    assert torch.allclose(reduce_heads(attention, "mean", dim=1), t([[0.4, 0.2, 0.4]]))
    assert torch.allclose(reduce_heads(attention, "max", dim=1), t([[0.6, 0.3, 0.5]]))
    assert torch.equal(reduce_heads(attention, 1, dim=1), t([[0.6, 0.1, 0.3]]))
    assert torch.equal(reduce_heads(attention, -2, dim=1), t([[0.2, 0.3, 0.5]]))
    assert torch.equal(reduce_heads(attention, "1", dim=1), t([[0.6, 0.1, 0.3]]))  # from a command line


@pytest.mark.parametrize("bad", [2, -3, "sum", True, 1.0])
def test_reduce_heads_rejects_bad_choice(bad):
    with pytest.raises(ValueError, match="head"):
        reduce_heads(torch.zeros(1, 2, 3), bad, dim=1)


def test_reduce_layers_last_mean_and_index():
    attention = t([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])  # (L=3, K=2)
    assert torch.equal(reduce_layers(attention, "last"), t([5.0, 1.0]))
    assert torch.allclose(reduce_layers(attention, "mean"), t([3.0, 3.0]))
    assert torch.equal(reduce_layers(attention, 1), t([3.0, 6.0]))
    assert torch.equal(reduce_layers(attention, -3), t([1.0, 2.0]))
    assert torch.equal(reduce_layers(attention, "-1"), t([5.0, 1.0]))
    with pytest.raises(ValueError, match="layer index 3 out of range"):
        reduce_layers(attention, 3)
    with pytest.raises(ValueError, match="rollout"):
        reduce_layers(attention, "first")


# -- encoder rollout (Abnar & Zuidema) --------------------------------------------------------------
def test_encoder_rollout_hand_example():
    # Ã1 = 0.5*[[.5,.5],[0,1]] + 0.5*I = [[.75,.25],[0,1]]; Ã2 = 0.5*[[0,1],[1,0]] + 0.5*I = [[.5,.5],[.5,.5]]
    # rollout = Ã2 @ Ã1 = [[.375,.625],[.375,.625]]
    stack = t([[[0.5, 0.5], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    assert torch.allclose(encoder_rollout(stack), t([[0.375, 0.625], [0.375, 0.625]]))


def test_encoder_rollout_renormalises_rows():
    # 0.5*[[2,0],[0,0]] + 0.5*I = [[1.5,0],[0,.5]] -> rows renormalised -> I
    assert torch.allclose(encoder_rollout(t([[[2.0, 0.0], [0.0, 0.0]]])), torch.eye(2, dtype=torch.float64))


def test_encoder_rollout_rows_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    stack = torch.rand(4, 6, 6, generator=generator).softmax(dim=-1)
    rollout = encoder_rollout(stack)
    assert torch.allclose(rollout.sum(dim=-1), torch.ones(6), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(L, N, N\)"):
        encoder_rollout(torch.zeros(2, 3, 4))


# -- Chefer et al. rules ----------------------------------------------------------------------------
def test_self_relevance_hand_example():
    # R1 = I + A = [[1.5,.5],[0,2]]; R2 = R1 + A @ R1 = R1 + [[.75,1.25],[0,2]]
    stack = t([[[0.5, 0.5], [0.0, 1.0]], [[0.5, 0.5], [0.0, 1.0]]])
    assert torch.allclose(self_relevance(stack), t([[2.25, 1.75], [0.0, 4.0]]))


def test_self_relevance_rows_are_rows_of_self_relevance():
    stack = t([[[0.5, 0.5], [0.0, 1.0]], [[0.5, 0.5], [0.0, 1.0]]])
    assert torch.allclose(self_relevance_rows(stack, [1, 0]), t([[0.0, 4.0], [2.25, 1.75]]))  # the hand example
    # non-commuting layers: the order of the products matters
    layers = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(self_relevance_rows(layers, [6, 2]), self_relevance(layers)[[6, 2]])
    assert not torch.allclose(self_relevance_rows(layers.flip(0), [6, 2]), self_relevance(layers)[[6, 2]])


def test_residual_normalized_keeps_zero_rows():
    # R - I = [[.5,.5],[0,0]]: the first row already sums to 1, the second is all zero -> stays 0
    assert torch.allclose(residual_normalized(t([[1.5, 0.5], [0.0, 1.0]])), t([[1.5, 0.5], [0.0, 1.0]]))
    # R - I = [[1,2],[2,1]] -> rows / 3 -> + I
    assert torch.allclose(residual_normalized(t([[2.0, 2.0], [2.0, 2.0]])), t([[4 / 3, 2 / 3], [2 / 3, 4 / 3]]))


def test_decoder_rollout_one_layer_hand_example():
    # R_qq = I + A_self = [[1.5,.5],[.25,1.75]]; R̄_qq = R_qq (rows of A_self sum to 1)
    # R_qi = R̄_qqᵀ @ A_cross = [[1.5,.25],[.5,1.75]] @ [[1,0,0],[0,.5,.5]]
    decoder_self = t([[[0.5, 0.5], [0.25, 0.75]]])
    cross = t([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]])
    expected = t([[1.5, 0.125, 0.125], [0.5, 0.875, 0.875]])
    assert torch.allclose(decoder_rollout(cross, decoder_self), expected)


def test_decoder_rollout_two_layer_hand_example():
    # layer 1: A_self = I -> R_qq = 2I, R̄_qq = 2I; R_qi = 2 * C1 = 2I
    # layer 2: A_self = swap -> R_qq = [[2,2],[2,2]], R_qi = 2I + swap @ 2I = [[2,2],[2,2]]
    #          R̄_qq = rownorm([[1,2],[2,1]]) + I = [[4/3,2/3],[2/3,4/3]]
    #          R̄_qqᵀ @ C2 = [[4/3,2/3],[5/3,1/3]] with C2 = [[.5,.5],[1,0]]
    decoder_self = t([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    cross = t([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [1.0, 0.0]]])
    expected = t([[10 / 3, 8 / 3], [11 / 3, 7 / 3]])
    assert torch.allclose(decoder_rollout(cross, decoder_self), expected)


def test_decoder_rollout_with_encoder_relevance_and_without_self_attention():
    # no decoder self-attention: R_qq = I -> R̄_qq = I; R̄_ii = rownorm(R_ii - I) + I = [[1.5,.5],[0,1]]
    cross = t([[[1.0, 0.0], [0.0, 1.0]]])
    encoder_relevance = t([[1.5, 0.5], [0.0, 1.0]])
    assert torch.allclose(decoder_rollout(cross, None, encoder_relevance), t([[1.5, 0.5], [0.0, 1.0]]))


def test_decoder_rollout_without_self_attention_sums_cross_attention():
    generator = torch.Generator().manual_seed(1)
    cross = torch.rand(3, 4, 5, generator=generator).softmax(dim=-1)
    assert torch.allclose(decoder_rollout(cross), cross.sum(dim=0), atol=1e-6)


def test_decoder_rollout_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match"):
        decoder_rollout(torch.zeros(2, 3, 4), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="encoder_relevance"):
        decoder_rollout(torch.zeros(2, 3, 4), None, torch.eye(3))


# -- normalisation --------------------------------------------------------------------------------
def test_normalize_minmax_per_map():
    maps = np.array([[[1.0, 3.0], [5.0, 2.0]], [[-2.0, 0.0], [2.0, 0.0]]])
    out = normalize_maps(maps, "minmax")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [1.0, 0.25]])
    np.testing.assert_allclose(out[1], [[0.0, 0.5], [1.0, 0.5]])


def test_normalize_constant_map_is_zero():
    np.testing.assert_array_equal(normalize_maps(np.full((1, 3, 3), 7.0), "minmax"), np.zeros((1, 3, 3)))
    np.testing.assert_array_equal(normalize_maps(np.full((1, 3, 3), 7.0), "percentile"), np.zeros((1, 3, 3)))


def test_normalize_percentile_clips_outliers():
    values = np.arange(101, dtype=np.float64)  # percentile 1 -> 1.0, percentile 99 -> 99.0
    values[100] = 1e6
    values[0] = -1e6
    out = normalize_maps(values.reshape(1, 1, 101), "percentile", percentiles=(1.0, 99.0))[0, 0]
    low = np.percentile(values, 1.0)
    high = np.percentile(values, 99.0)
    assert out[0] == 0.0 and out[100] == 1.0
    assert out[50] == pytest.approx((50 - low) / (high - low), rel=1e-6)
    # without clipping the outliers would squash the middle to about 0.5 exactly
    assert normalize_maps(values.reshape(1, 1, 101), "minmax")[0, 0, 50] == pytest.approx(0.5, abs=1e-4)


def test_normalize_none_and_errors():
    maps = np.array([[[0.2, 4.0]]])
    np.testing.assert_array_equal(normalize_maps(maps, None), maps.astype(np.float32))
    with pytest.raises(ValueError, match="normalize must be"):
        normalize_maps(maps, "zscore")
    with pytest.raises(ValueError, match="percentiles"):
        normalize_maps(maps, "percentile", percentiles=(90.0, 10.0))


def test_normalize_maps_accepts_zero_maps():
    from detection.attention.aggregate import normalize_maps

    for method in ("minmax", "percentile"):
        out = normalize_maps(np.zeros((0, 5, 7), dtype=np.float32), method)
        assert out.shape == (0, 5, 7) and out.dtype == np.float32


def test_normalize_maps_in_place_equals_the_copy_and_leaves_other_inputs_alone():
    rng = np.random.default_rng(3)
    maps = (rng.random((4, 9, 11)) * 7 - 2).astype(np.float32)
    maps[2] = 1.5  # a constant map
    for method in ("minmax", "percentile", None):
        expected = normalize_maps(maps, method)
        fresh = maps.copy()
        result = normalize_maps(fresh, method, copy=False)
        assert result is fresh and np.array_equal(result, expected)
        # a view that is not C-contiguous is never written
        strided = maps.copy()[:, :, ::2]
        before = strided.copy()
        assert np.array_equal(normalize_maps(strided, method, copy=False), normalize_maps(before, method))
        assert np.array_equal(strided, before)
    assert np.array_equal(expected, maps)  # method None: unchanged values
    minmax = normalize_maps(maps, "minmax")
    assert np.allclose(minmax.reshape(4, -1).max(1), [1, 1, 0, 1]) and np.array_equal(minmax[2], np.zeros((9, 11)))
