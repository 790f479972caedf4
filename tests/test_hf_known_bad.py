"""Known-bad checkpoints: a D-FINE folder converted before transformers PR #40257 (identical k_proj
and v_proj in the decoder self-attention, issue #40253) loads with a warning naming the fix; a good
folder loads without one."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_sampled_models  # noqa: E402

from detection.cli import main  # noqa: E402
from detection.models.hf.load import identical_key_value_layers  # noqa: E402
from detection.models.registry import load_model  # noqa: E402

transformers.logging.set_verbosity_error()
LOGGER = "detection.models.hf.load"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """A small random D-FINE saved as it is (good) and with every decoder layer's k_proj weight
    and bias copied into v_proj (what the faulty conversion produced), same config."""
    root = tmp_path_factory.mktemp("dfine")
    model = hf_sampled_models.build("d_fine")
    model.save_pretrained(root / "good")
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.self_attn.v_proj.weight.copy_(layer.self_attn.k_proj.weight)
            layer.self_attn.v_proj.bias.copy_(layer.self_attn.k_proj.bias)
    model.save_pretrained(root / "bad")
    return root / "good", root / "bad"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_a_folder_with_identical_key_and_value_projections_warns_naming_the_fix(folders, caplog) -> None:
    _, bad = folders
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = load_model(bad)
    (message,) = _warnings(caplog)
    assert message.startswith(f"{bad}: D-FINE decoder self-attention has identical k_proj and v_proj weights "
                              "in layers [0, 1] of 2")
    assert "PR #40257" in message and "issue #40253" in message and "Fix: convert the original" in message
    assert identical_key_value_layers(model.hf_model) == [0, 1]


def test_a_good_folder_and_a_partly_fixed_one(folders, caplog, tmp_path) -> None:
    good, bad = folders
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = load_model(good)
    assert _warnings(caplog) == [] and identical_key_value_layers(model.hf_model) == []
    # one layer's bias differs: that layer is not flagged, the other still is
    model = load_model(bad)
    with torch.no_grad():
        model.hf_model.model.decoder.layers[0].self_attn.v_proj.bias.add_(1e-3)
    assert identical_key_value_layers(model.hf_model) == [1]


def test_predict_on_the_command_line_warns_for_the_bad_folder_only(folders, tmp_path, caplog) -> None:
    import numpy as np
    from PIL import Image

    good, bad = folders
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(images / "a.png")
    for folder, expected in ((bad, 1), (good, 0)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert main(["predict", str(images), "--model", str(folder), "--out", str(tmp_path / folder.name),
                         "--device", "cpu", "--workers", "0", "--quiet"]) == 0
        assert sum("identical k_proj and v_proj" in m for m in _warnings(caplog)) == expected
