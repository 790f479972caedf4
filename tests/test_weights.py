"""Safe checkpoint loading, manifest, download cache with hash check."""
from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from detection.models import checkpoint_io, published, registry
from detection.models.convert import save_authors_checkpoint
from detection.models.registry import build_model, load_model
from detection.models.checkpoint_io import CheckpointError, load_checkpoint_file, load_state_dict_file
from detection.models.published import DownloadError, ManifestEntry, download_checkpoint, load_manifest


class _CreatesSentinel:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer: str) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"w": torch.zeros(1)}, "extra": _CreatesSentinel(str(sentinel))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        load_checkpoint_file(path)
    assert not sentinel.exists()


def test_truncated_and_corrupt_files_name_the_file(tmp_path) -> None:
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*truncated or corrupt"):
        load_checkpoint_file(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors.*not a valid safetensors"):
        load_checkpoint_file(garbage)
    with pytest.raises(CheckpointError, match=r"weights\.npz.*unknown checkpoint extension"):
        (tmp_path / "weights.npz").write_bytes(b"x")
        load_checkpoint_file(tmp_path / "weights.npz")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint_file(tmp_path / "absent.pth")
    nothing = tmp_path / "nothing.pth"
    torch.save({"epoch": 3}, nothing)
    with pytest.raises(CheckpointError, match=r"nothing\.pth.*no state dict"):
        load_state_dict_file(nothing)


def test_safetensors_and_prefixes(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"module.a.weight": torch.ones(2), "_orig_mod.module.b": torch.zeros(1)}, path)
    state = load_state_dict_file(path)
    assert sorted(state) == ["a.weight", "b"]
    with pytest.raises(ValueError, match="two keys map to 'a'"):
        checkpoint_io.strip_wrapper_prefixes({"module.a": torch.ones(1), "a": torch.ones(1)})


def test_manifest_records_prefixes_from_file_names() -> None:
    entries = load_manifest()
    assert set(entries) == {"detr-r50", "detr-r50-dc5", "detr-r101", "detr-r101-dc5"}
    aps = {name: e.coco_val_ap for name, e in entries.items()}
    assert aps == {"detr-r50": 42.0, "detr-r50-dc5": 43.3, "detr-r101": 43.5, "detr-r101-dc5": 44.9}
    for entry in entries.values():
        assert entry.url.startswith("https://dl.fbaipublicfiles.com/detr/")
        # the 8 hex digits in the file name ARE the recorded hash prefix; no invented full hash
        assert entry.file_name == f"{entry.name}-{entry.sha256_prefix}.pth"
        assert len(entry.sha256_prefix) == 8 and entry.sha256 is None
        assert registry.load_config(entry.config).name == entry.name


def _file_entry(path, name="tiny-pub", prefix=None, config="detr-tiny") -> ManifestEntry:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ManifestEntry(name=name, url=path.resolve().as_uri(), config=config,
                         sha256_prefix=prefix if prefix is not None else digest[:8])


def test_download_verifies_hash_and_is_atomic(tmp_path) -> None:
    source = tmp_path / "src" / "tiny-abc.pth"
    source.parent.mkdir()
    torch.save({"model": {"w": torch.arange(10.0)}}, source)
    cache = tmp_path / "cache"
    entry = _file_entry(source)
    path = download_checkpoint("tiny-pub", cache, progress=False, manifest={"tiny-pub": entry})
    assert path == cache / "checkpoints" / "tiny-abc.pth"
    assert path.read_bytes() == source.read_bytes()

    bad = _file_entry(source, name="bad", prefix="00000000")
    with pytest.raises(DownloadError, match="hash mismatch.*00000000"):
        download_checkpoint("bad", tmp_path / "cache2", progress=False, manifest={"bad": bad})
    leftovers = list((tmp_path / "cache2" / "checkpoints").iterdir())
    assert leftovers == []  # neither the target nor a temp file remains


def test_offline_error_names_url_and_local_alternative(tmp_path) -> None:
    entry = ManifestEntry(name="x", url="http://127.0.0.1:9/detr-x-12345678.pth", config="detr-r50",
                          sha256_prefix="12345678")
    with pytest.raises(DownloadError, match=r"http://127\.0\.0\.1:9/detr-x-12345678\.pth.*"
                                            r"detr-attn weights convert FILE --out DIR --config detr-r50"):
        download_checkpoint("x", tmp_path, progress=False, manifest={"x": entry})


def test_cache_dir_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DETECTION_CACHE", str(tmp_path / "env"))
    assert published.cache_dir() == tmp_path / "env"
    assert published.cache_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("DETECTION_CACHE")
    assert published.cache_dir().name == "detection"


def test_load_model_by_published_name(tmp_path, monkeypatch) -> None:
    """load_model(NAME): download to the cache, verify, convert once, then reuse."""
    torch.manual_seed(0)
    original = build_model("detr-tiny").eval()
    source = tmp_path / "tiny-pub.pth"
    save_authors_checkpoint(original, source)
    entry = _file_entry(source)
    monkeypatch.setattr(published, "load_manifest", lambda path=None: {"tiny-pub": entry})
    monkeypatch.setenv("DETECTION_CACHE", str(tmp_path / "cache"))
    model = load_model("tiny-pub")
    native = tmp_path / "cache" / "native" / "tiny-pub"
    assert (native / "model.json").is_file()
    assert model.source == entry.url
    assert model.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images)["pred_logits"], original(images)["pred_logits"])
    source.unlink()  # second use needs neither the network nor the source
    assert load_model("tiny-pub").config.name == "detr-tiny"
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        load_model("nope")
