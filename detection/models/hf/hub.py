"""`hf:ORG/NAME[@REVISION]` model names: fetched into huggingface_hub's own cache, then loaded as a folder."""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from detection.models.hf.folder import COMBINED_PROCESSOR_FILE, CONFIG_FILE, PROCESSOR_FILE, read_model_type

HUB_PREFIX = "hf:"
#: What a Hub folder's snapshot fetches: config, weights, the processor's settings, and the tokenizer
#: files the prompted families need (CLIP: vocab.json + merges.txt; BERT: vocab.txt; or tokenizer.json).
_PATTERNS = [CONFIG_FILE, PROCESSOR_FILE, COMBINED_PROCESSOR_FILE, "model.safetensors", "model.safetensors.index.json",
             "model-*.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
             "merges.txt", "vocab.txt"]


def is_hub_name(name: str) -> bool:
    return str(name).startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """"hf:ORG/NAME@REV" -> ("ORG/NAME", "REV" or None)."""
    repo, _, revision = str(name)[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r}: a Hub model is named hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return repo, revision or None


#: Seconds to wait for the Hub's host to answer once before treating the machine as offline.
REACH_TIMEOUT = 3.0


@lru_cache(maxsize=8)
def hub_reachable(endpoint: str) -> bool:
    """Whether the Hub endpoint's host accepts a connection (asked once per endpoint and process)."""
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=REACH_TIMEOUT).close()
    except OSError:
        return False
    return True


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (huggingface_hub's constant or the environment), or the Hub does not answer."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or flag or not hub_reachable(constants.ENDPOINT)


def fetch_hub_folder(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Download (or find in the huggingface_hub cache) a Hub detector's files.

    Returns (snapshot folder, source "hf:ORG/NAME@COMMIT"). config.json is fetched first and
    checked (remote code refused) before any weights are. Offline (HF_HUB_OFFLINE, or a Hub that
    does not answer one connection: `hub_offline`) only the cache is read, with no retry; when it
    lacks the files, ValueError says how to pass a local folder instead. Only safetensors weights
    are fetched (pickles are never loaded).
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, revision = parse_hub_name(name)
    offline = hub_offline()
    try:
        config_path = hf_hub_download(repo, CONFIG_FILE, revision=revision, cache_dir=cache_dir,
                                      local_files_only=offline)
        read_model_type(Path(config_path).parent)  # refuses auto_map before weights are fetched
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=_PATTERNS,
                                        local_files_only=offline))
    except ValueError:
        raise
    except Exception as exc:  # huggingface_hub raises many types: offline, 404, gated, HTTP
        where = ("the Hugging Face Hub cannot be reached (offline)" if offline
                 else f"cannot fetch {repo} from the Hugging Face Hub")
        raise ValueError(
            f"{name}: {where} and it is not in the cache ({type(exc).__name__}). On a machine without "
            "network, download the model folder elsewhere (config.json, model.safetensors, "
            "preprocessor_config.json) and pass its path: --model /path/to/folder") from exc
    return folder, f"hf:{repo}@{folder.name}"
