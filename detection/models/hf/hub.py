"""`hf:ORG/NAME[@REVISION]` model names: fetched into huggingface_hub's own cache, then loaded as a folder."""
from __future__ import annotations

import os
from pathlib import Path

from detection.models.hf.folder import CONFIG_FILE, PROCESSOR_FILE, read_model_type

HUB_PREFIX = "hf:"
_PATTERNS = [CONFIG_FILE, PROCESSOR_FILE, "model.safetensors", "model.safetensors.index.json",
             "model-*.safetensors"]


def is_hub_name(name: str) -> bool:
    return str(name).startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """"hf:ORG/NAME@REV" -> ("ORG/NAME", "REV" or None)."""
    repo, _, revision = str(name)[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r}: a Hub model is named hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return repo, revision or None


def fetch_hub_folder(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Download (or find in the huggingface_hub cache) a Hub detector's files.

    Returns (snapshot folder, source "hf:ORG/NAME@COMMIT"). config.json is fetched first and
    checked (remote code refused) before any weights are. Offline (HF_HUB_OFFLINE=1, or no
    network) the cache is used when it has the files; otherwise ValueError says how to use a
    local folder instead. Only safetensors weights are fetched (pickles are never loaded).
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, revision = parse_hub_name(name)
    try:
        config_path = hf_hub_download(repo, CONFIG_FILE, revision=revision, cache_dir=cache_dir)
        read_model_type(Path(config_path).parent)  # refuses auto_map before weights are fetched
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=_PATTERNS))
    except ValueError:
        raise
    except Exception as exc:  # huggingface_hub raises many types: offline, 404, gated, HTTP
        raise ValueError(
            f"{name}: cannot fetch {repo} from the Hugging Face Hub and it is not in the cache "
            f"({type(exc).__name__}: {exc}). On a machine without network, download the model folder "
            "elsewhere (config.json, model.safetensors, preprocessor_config.json) and pass its path: "
            "--model /path/to/folder") from exc
    return folder, f"hf:{repo}@{folder.name}"
