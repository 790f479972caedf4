"""The sanity check (Adebayo et al. 2018, issue 23 item 7): the cascade re-initialises exactly the
layers it names, as the model's own init does; with nothing randomised every method's maps are
the trained maps (correlation exactly 1); with the whole transformer randomised every method's
maps change; seeded runs repeat; the correlations and the bootstrap against references."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from detection.attention.methods import AttentionRollout, AttnGrad, RawAttention, Relevance
from detection.data.images import load_image
from detection.evaluation.sanity import (bootstrap_mean, map_correlations, randomisable_layers, randomised_copy,
                                         sanity_check)
from detection.models.detr import DETR
from detection.models.registry import load_model

REPO = Path(__file__).resolve().parents[1]
IMAGES = [REPO / "demo" / "images" / f"shapes_{i}.png" for i in (1, 2)]
METHODS = [RawAttention.name, AttentionRollout.name, AttnGrad.name, Relevance.name]
CASCADE = ["transformer.decoder.layers.2", "transformer.decoder.layers.1", "transformer.decoder.layers.0",
           "transformer.encoder.layers.1", "transformer.encoder.layers.0"]
# Measured on these two images (seed 0), whole transformer randomised: mean Spearman raw 0.28,
# rollout 0.73, attn-grad 0.03, relevance 0.52; the bound leaves a margin above the largest.
FULLY_RANDOMISED_BOUND = 0.85


@pytest.fixture(scope="module")
def model():
    return load_model("demo")


@pytest.fixture(scope="module")
def images():
    return [load_image(path).rgb for path in IMAGES]


@pytest.fixture(scope="module")
def result(model, images):
    return sanity_check(model, images, METHODS, seed=0)


def test_the_cascade_runs_top_down_through_the_decoder_then_the_encoder(model):
    assert [name for name, _ in randomisable_layers(model)] == CASCADE
    with pytest.raises(ValueError, match="depth 6 is outside 0..5"):
        randomised_copy(model, 6)


def test_a_model_without_detr_layers_is_refused_by_name():
    with pytest.raises(ValueError, match="Linear has no transformer.decoder.layers / transformer.encoder.layers"):
        randomisable_layers(torch.nn.Linear(2, 2))


def test_the_cascade_reinitialises_exactly_the_layers_it_names(model):
    trained = {name: value.clone() for name, value in model.state_dict().items()}
    previous = None
    for depth in range(len(CASCADE) + 1):
        randomised, touched = randomised_copy(model, depth, seed=0)
        assert touched == CASCADE[:depth]
        state = randomised.state_dict()
        for name, value in state.items():
            in_touched = any(name.startswith(layer + ".") for layer in touched)
            assert torch.equal(value, trained[name]) != in_touched, name
            if previous is not None and any(name.startswith(layer + ".") for layer in CASCADE[:depth - 1]):
                assert torch.equal(value, previous[name]), name  # a deeper step keeps the shallower draws
        previous = state
    for name, value in model.state_dict().items():  # the model itself is never changed
        assert torch.equal(value, trained[name]), name


def test_a_reinitialised_layer_is_drawn_as_the_model_builds_one(model):
    randomised, _ = randomised_copy(model, len(CASCADE), seed=0)
    torch.manual_seed(0)
    fresh = DETR(model.config).state_dict()
    for name, value in randomised.state_dict().items():
        if not any(name.startswith(layer + ".") for layer in CASCADE):
            continue  # the backbone, heads and decoder.norm (shared by every layer) stay trained
        reference = fresh[name]
        if torch.all(reference == 0) or torch.all(reference == 1):  # zeroed biases, LayerNorm weights
            assert torch.equal(value, reference), name
        else:  # Xavier / default-Linear draws: same bound, so spreads within sampling error
            assert float(value.abs().max()) <= float(reference.abs().max()) * 1.05, name
            assert abs(float(value.std()) / float(reference.std()) - 1) < 0.2, name


def test_nothing_randomised_gives_correlation_exactly_one(result):
    assert result.depths[0] == 0 and sum(result.detections) == 3
    for table in (result.spearman[0], result.pearson[0]):
        for choice in result.choices:
            assert all(np.all(values == 1.0) for values in table[choice]), choice


def test_the_whole_transformer_randomised_changes_every_method(result):
    assert result.choices == ["last/mean", "rollout/mean", "attn-grad/last", "relevance"]
    rows = {row["choice"]: row for row in result.rows() if row["depth"] == len(CASCADE)}
    for choice in result.choices:
        assert rows[choice]["spearman"]["mean"] < FULLY_RANDOMISED_BOUND, choice
        assert rows[choice]["undefined"] == 0
        assert rows[choice]["randomised_down_to"] == CASCADE[-1]


def test_seeded_runs_repeat_and_the_seed_matters(model, images, result):
    # the same methods: they decide whether the encoder runs its explicit attention path (rollout)
    again = sanity_check(model, images, METHODS, depths=[len(CASCADE)], seed=0)
    other = sanity_check(model, images, [RawAttention.name], depths=[len(CASCADE)], seed=1)
    for choice in again.choices:
        for first, second in zip(result.spearman[-1][choice], again.spearman[0][choice]):
            np.testing.assert_array_equal(first, second)
        for first, second in zip(result.pearson[-1][choice], again.pearson[0][choice]):
            np.testing.assert_array_equal(first, second)
    assert not np.array_equal(np.concatenate(other.spearman[0]["last/mean"]),
                              np.concatenate(result.spearman[-1]["last/mean"]))


def test_map_correlations_equal_scipy():
    rng = np.random.default_rng(0)
    trained = rng.random((3, 4, 5))
    other = np.stack([trained[0] ** 3, -trained[1], rng.random((4, 5))])  # monotone, reversed, unrelated
    spearman, pearson = map_correlations(trained, other)
    for k in range(3):
        assert spearman[k] == pytest.approx(spearmanr(trained[k].ravel(), other[k].ravel())[0], abs=1e-12)
        assert pearson[k] == pytest.approx(pearsonr(trained[k].ravel(), other[k].ravel())[0], abs=1e-12)
    assert spearman[0] == pytest.approx(1.0) and pearson[0] < 0.99 and spearman[1] == pytest.approx(-1.0)
    constant = map_correlations(trained[:1], np.zeros((1, 4, 5)))
    assert np.isnan(constant[0][0]) and np.isnan(constant[1][0])
    with pytest.raises(ValueError, match="the grids differ"):
        map_correlations(trained, other[:, :3])


def test_bootstrap_resamples_images():
    # one image at 0 and one at 1 (two detections each): resamples of two images give 0, 0.5 or 1
    mean, low, high = bootstrap_mean([np.zeros(2), np.ones(2)], resamples=2000, seed=0)
    assert (mean, low, high) == (0.5, 0.0, 1.0)
    assert bootstrap_mean([np.full(3, 0.25), np.full(1, 0.25)]) == (0.25, 0.25, 0.25)
    # the mean weights detections, not images: (0 + 0 + 0 + 1) / 4
    assert bootstrap_mean([np.zeros(3), np.ones(1)])[0] == 0.25


def test_the_script_writes_what_the_library_computes(model, images, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("sanity_check_script", REPO / "scripts" / "sanity_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--model", "demo", "--images", str(IMAGES[0]), "--methods", "raw", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "sanity.json").read_text())
    expected = sanity_check(model, images[:1], [RawAttention.name], seed=0).rows()
    assert written["rows"] == json.loads(json.dumps(expected))
    assert written["cascade"] == CASCADE and written["methods"] == ["raw"]
    markdown = (tmp_path / "sanity.md").read_text()
    assert f"| 5: down to {CASCADE[-1]} | {expected[-1]['spearman']['mean']:.3f}" in markdown
