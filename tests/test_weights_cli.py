"""`detr-attn weights ...` end to end: convert an authors' checkpoint and an HF folder, verify, list."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from detection.cli import main
from detection.models.convert import save_authors_checkpoint
from detection.models.registry import build_model, load_model


def _same_outputs(a, b) -> bool:
    images = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(images)["pred_logits"], b(images)["pred_logits"])


def test_convert_authors_checkpoint(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    original = build_model("detr-tiny").eval()
    src = save_authors_checkpoint(original, tmp_path / "mine.pth")
    out = tmp_path / "native"
    assert main(["weights", "convert", str(src), "--out", str(out), "--config", "detr-tiny"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["source"] == f"authors:{src}"
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["num_classes"] == 3 and meta["nheads"] == 4
    assert _same_outputs(load_model(out), original)
    assert "wrote" in capsys.readouterr().out
    assert main(["weights", "verify", str(out)]) == 0
    assert main(["weights", "verify", str(src), "--config", "detr-tiny"]) == 0
    assert hashlib.sha256(src.read_bytes()).hexdigest() in capsys.readouterr().out


def test_convert_hf_folder(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.DetrConfig(
        use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, id2label={0: "N/A", 1: "thing"})
    torch.manual_seed(0)
    hf = transformers.DetrForObjectDetection(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "native"
    assert main(["weights", "convert", str(tmp_path / "hf"), "--out", str(out)]) == 0
    model = load_model(out)
    assert model.config.class_names == ["N/A", "thing"] and model.config.dec_layers == 2
    meta = json.loads((out / "model.json").read_text())
    weights_file = tmp_path / "hf" / "model.safetensors"
    assert meta["source_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert _same_outputs(model, load_model(tmp_path / "hf"))  # load_model converts in memory too


def test_errors_exit_nonzero_with_message(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["weights", "convert", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "bad.pth" in err and "error:" in err
    assert not (tmp_path / "o" / "model.json").exists()
    assert main(["weights", "download", "no-such-model", "--cache-dir", str(tmp_path)]) == 1
    assert "unknown checkpoint 'no-such-model'" in capsys.readouterr().err


def test_list(capsys) -> None:
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "detr-r101-dc5" in out and "44.9" in out and "detr-r50-e632da11.pth" in out
