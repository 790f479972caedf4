"""Hugging Face detector folders: processor rules reproduced exactly, bad folders refused with the
file and the field named, hf:ORG/NAME through huggingface_hub's cache (written here in its layout)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from detection.data.preprocess import image_to_input  # noqa: E402
from detection.models.hf.families import FAMILIES, family_of  # noqa: E402
from detection.models.hf.folder import HFFolderError, processor_spec, read_hf_folder  # noqa: E402
from detection.models.hf.hub import fetch_hub_folder, parse_hub_name  # noqa: E402
from detection.models.registry import load_model  # noqa: E402

transformers.logging.set_verbosity_error()


def _tiny_yolos_folder(folder: Path, processor: dict | None = None) -> Path:
    config = transformers.YolosConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=[64, 64],
        patch_size=16, num_detection_tokens=5, id2label={0: "cat", 1: "dog"})
    torch.manual_seed(0)
    transformers.YolosForObjectDetection(config).save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.fixture(scope="module")
def yolos_folder(tmp_path_factory) -> Path:
    return _tiny_yolos_folder(tmp_path_factory.mktemp("yolos") / "model")


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


PROCESSORS = [
    ("DetrImageProcessor", {"size": {"shortest_edge": 96, "longest_edge": 130}}),
    ("DetrImageProcessor", {"size": {"shortest_edge": 70, "longest_edge": 200}, "resample": 3}),
    ("YolosImageProcessor", {"size": {"shortest_edge": 96, "longest_edge": 130}}),
    ("RTDetrImageProcessor", {"size": {"height": 64, "width": 80}}),
    ("RTDetrImageProcessor", {"size": {"height": 64, "width": 64}, "resample": 0, "do_normalize": True}),
    ("ConditionalDetrImageProcessor", {"size": {"shortest_edge": 64, "longest_edge": 100}}),
    ("DeformableDetrImageProcessor", {"size": {"shortest_edge": 64, "longest_edge": 100}}),
    ("DeformableDetrImageProcessor", {"size": {"height": 64, "width": 96}}),  # LW-DETR's folders: fixed 640 x 640
    ("RfDetrImageProcessor", {"size": {"height": 56, "width": 56}}),
]


@pytest.mark.parametrize("class_name, options", PROCESSORS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(PROCESSORS)])
def test_processor_spec_reproduces_the_hf_processor(tmp_path, class_name: str, options: dict) -> None:
    processor = getattr(transformers, class_name)(**options)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    family = next(f for f in FAMILIES.values() if f.processor_class == class_name) if any(
        f.processor_class == class_name for f in FAMILIES.values()) else FAMILIES["table-transformer"]
    spec = processor_spec(saved, family, tmp_path / "preprocessor_config.json")
    rng = np.random.default_rng(0)
    for height, width in [(123, 157), (200, 61), (64, 64), (97, 300)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        ours = image_to_input(image, spec)
        assert ours.shape == expected.shape, (height, width)
        assert (ours - expected).abs().max().item() <= 1e-5


def test_processor_defaults_apply_without_a_processor_file(tmp_path) -> None:
    spec = processor_spec(None, FAMILIES["rt_detr"], tmp_path / "preprocessor_config.json")
    assert (spec.resize, spec.fixed_size, spec.mean, spec.backend) == ("fixed", (640, 640), None, "torchvision")
    spec = processor_spec(None, FAMILIES["deformable_detr"], tmp_path / "preprocessor_config.json")
    assert (spec.resize, spec.min_size, spec.max_size, spec.size_rounding) == ("shortest_edge", 800, 1333, "hf")
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406)) and spec.std == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("processor, field", [
    ({"size": {"max_height": 100, "max_width": 100}}, "size"),
    ({"resample": 1}, "resample"),
    ({"rescale_factor": 0.5}, "rescale_factor"),
    ({"do_rescale": False}, "do_rescale"),
    ({"pad_size": {"height": 64, "width": 64}}, "pad_size"),
    ({"image_processor_type": "NoSuchImageProcessor"}, "image_processor_type"),
])
def test_processor_with_an_unsupported_rule_is_refused(tmp_path, processor: dict, field: str) -> None:
    path = tmp_path / "preprocessor_config.json"
    with pytest.raises(HFFolderError, match=f"field '{field}'") as info:
        processor_spec(processor, FAMILIES["deformable_detr"], path)
    assert str(path) in str(info.value)


def test_loads_a_folder_and_keeps_id2label(yolos_folder) -> None:
    model = load_model(yolos_folder)
    assert model.config.class_names == ("cat", "dog") and model.config.category_ids == (0, 1)
    assert model.config.model_type == "yolos" and model.config.source == str(yolos_folder.resolve())
    assert model.postprocess_rule.kind == "softmax_no_object" and not model.supports_padding
    assert not model.precision_allowed("bf16", torch.device("cpu")) and model.precision_allowed("fp32", "cpu")
    images = torch.rand(1, 3, 64, 64)
    reference = transformers.YolosForObjectDetection.from_pretrained(yolos_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ours, theirs = model(images), reference(pixel_values=images)
    assert torch.equal(ours["pred_logits"], theirs.logits) and torch.equal(ours["pred_boxes"], theirs.pred_boxes)
    with pytest.raises(ValueError, match="takes no padding mask"):
        model(images, torch.ones(1, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="not offered for YOLOS"):
        model.prepare_for_inference("cpu", "bf16")


def test_remote_code_is_refused(yolos_folder, tmp_path) -> None:
    folder = _copy(yolos_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForObjectDetection": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFolderError, match="auto_map") as info:
        load_model(folder)
    assert str(folder / "config.json") in str(info.value)


def test_unsupported_model_type_lists_the_supported_ones(yolos_folder, tmp_path) -> None:
    folder = _copy(yolos_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "florence2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'florence2' is not supported; supported model types: .*deformable_detr.*yolos"):
        load_model(folder)
    with pytest.raises(ValueError, match="supported model types"):
        family_of(None, "x")


def test_missing_or_corrupt_weights_name_the_file(yolos_folder, tmp_path) -> None:
    folder = _copy(yolos_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(HFFolderError, match="not a valid safetensors file") as info:
        load_model(folder)
    assert str(weights) in str(info.value)
    weights.unlink()
    with pytest.raises(HFFolderError, match="missing") as info:
        read_hf_folder(folder)
    assert str(weights) in str(info.value)


def test_config_that_does_not_match_the_weights_names_both(yolos_folder, tmp_path) -> None:
    folder = _copy(yolos_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFolderError) as info:
        load_model(folder)
    message = str(info.value)
    assert str(folder / "model.safetensors") in message and "config.json" in message
    assert "intermediate" in message or "mlp" in message or "fc" in message or "size" in message


def _hub_cache(root: Path, repo: str, folder: Path, commit: str) -> Path:
    """huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)
    return base / "snapshots" / commit


def test_hub_name_loads_from_the_cache_offline(yolos_folder, tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = _hub_cache(tmp_path / "hub", "tiny-org/yolos-tiny", yolos_folder, commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert parse_hub_name("hf:tiny-org/yolos-tiny@v1") == ("tiny-org/yolos-tiny", "v1")
    folder, source = fetch_hub_folder("hf:tiny-org/yolos-tiny")
    assert folder == snapshot and source == f"hf:tiny-org/yolos-tiny@{commit}"
    model = load_model("hf:tiny-org/yolos-tiny")
    assert model.config.source == source and model.config.class_names == ("cat", "dog")
    with pytest.raises(ValueError, match="not in the cache.*--model /path/to/folder"):
        load_model("hf:tiny-org/not-there")
    with pytest.raises(ValueError, match="hf:ORG/NAME"):
        parse_hub_name("hf:no-slash")


def test_weights_download_cli_uses_the_hub_cache(yolos_folder, tmp_path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    from detection.cli import main

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    _hub_cache(tmp_path / "hub", "tiny-org/yolos-tiny", yolos_folder, commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["weights", "download", "hf:tiny-org/yolos-tiny"]) == 0
    assert f"hf:tiny-org/yolos-tiny@{commit}" in capsys.readouterr().out
    assert main(["weights", "download", "hf:tiny-org/absent"]) == 1
    assert "--model /path/to/folder" in capsys.readouterr().err


def test_an_unreachable_hub_is_asked_once_and_the_cache_read_without_retries(yolos_folder, tmp_path, monkeypatch):
    """No network: the endpoint (a closed port on this machine) refuses one connection; from then on
    only the cache is read (local_files_only), so there is no retry loop, and the message says how
    to pass a local folder."""
    import huggingface_hub
    from huggingface_hub import constants

    from detection.models.hf import hub

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    snapshot = _hub_cache(tmp_path / "hub", "tiny-org/yolos-tiny", yolos_folder, commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    hub.hub_reachable.cache_clear()
    calls = []
    for function in ("hf_hub_download", "snapshot_download"):
        original = getattr(huggingface_hub, function)

        def spy(*args, _original=original, _name=function, **kwargs):
            calls.append((_name, kwargs.get("local_files_only")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(huggingface_hub, function, spy)
    assert hub.hub_offline()
    folder, source = fetch_hub_folder("hf:tiny-org/yolos-tiny")
    assert folder == snapshot and source == f"hf:tiny-org/yolos-tiny@{commit}"
    with pytest.raises(ValueError) as error:
        fetch_hub_folder("hf:tiny-org/absent")
    assert "the Hugging Face Hub cannot be reached (offline) and it is not in the cache" in str(error.value)
    assert "--model /path/to/folder" in str(error.value)
    assert calls == [("hf_hub_download", True), ("snapshot_download", True), ("hf_hub_download", True)]
    assert hub.hub_reachable.cache_info().misses == 1  # the Hub was asked once
    hub.hub_reachable.cache_clear()
