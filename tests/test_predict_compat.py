"""Moved and renamed prediction names: the main API imports from `detection.engine.predict`
without warnings; every deprecated old name warns and still works."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from detection.engine.journal import read_journal
from detection.models.digest import weights_digest
from detection.models.registry import build_model
from detection.runtime.distributed import DistContext


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("detr-tiny").eval()


def test_main_api_imports_from_engine_predict_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = importlib.reload(importlib.import_module("detection.engine.predict"))
        from detection.engine.predict import OutputOptions, PredictSettings, Predictor, run_predict  # noqa: F401
    from detection.engine import outputs, predict_run, predictor

    assert module.Predictor is predictor.Predictor and module.run_predict is predict_run.run_predict
    assert module.PredictSettings is predict_run.PredictSettings and module.OutputOptions is outputs.OutputOptions


def test_predictor_attention_flag_is_deprecated_and_still_works(tiny_model):
    from detection.engine.predictor import Predictor

    with pytest.warns(DeprecationWarning, match="cross_attention"):
        old = Predictor(tiny_model, attention=True)
    assert old.cross_attention is True
    with pytest.warns(DeprecationWarning, match="cross_attention"):
        assert old.attention is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = Predictor(tiny_model, cross_attention=False)
    assert new.cross_attention is False
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))]
    _, record_old = old.predict_tensors(images, [(64, 80)])
    _, record_new = new.predict_tensors(images, [(64, 80)])
    assert record_new is None and record_old.decoder_cross.shape[:2] == (tiny_model.config.dec_layers, 1)


def test_engine_predict_old_names_warn_and_work(tiny_model):
    from detection.cli import predict as cli_predict
    from detection.engine import predict
    from detection.runtime.device import resolve_precision

    with pytest.warns(DeprecationWarning, match="detection.models.digest"):
        assert predict.weights_digest(tiny_model) == weights_digest(tiny_model)
    with pytest.warns(DeprecationWarning, match="detection.runtime.device"):
        assert predict.resolve_precision is resolve_precision
    with pytest.warns(DeprecationWarning, match="detection.cli.predict"):
        assert (predict.EXIT_OK, predict.EXIT_USAGE) == (0, 2)
    with pytest.warns(DeprecationWarning, match="detection.cli.predict"):
        assert predict.run is cli_predict.run
    with pytest.raises(AttributeError):
        predict.no_such_name  # noqa: B018


def test_init_from_env_warns_and_returns_the_shared_context(monkeypatch):
    from detection.engine import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(DeprecationWarning, match="init_distributed"):
        context = distributed.init_from_env()
    assert isinstance(context, DistContext) and distributed.DistContext is DistContext
    assert (context.rank, context.world_size, context.is_main, context.enabled) == (0, 1, True, False)


def test_writers_and_weights_cli_modules_warn_and_forward(tmp_path):
    from detection.cli import weights as cli_weights
    from detection.engine import run_folder, writers
    from detection.models import weights_cli

    journal = tmp_path / "p.jsonl"
    journal.write_bytes(b'{"key": "a"}\n')
    with pytest.warns(DeprecationWarning, match="detection.engine.journal"):
        assert writers.read_journal(journal) == read_journal(journal) == [{"key": "a"}]
    with pytest.warns(DeprecationWarning, match="detection.engine.run_folder"):
        assert writers.RunFolder is run_folder.RunFolder
    with pytest.warns(DeprecationWarning, match="detection.cli.weights"):
        assert weights_cli.run is cli_weights.run
