"""Older import path for checkpoint IO, published checkpoints and their loading.

The code lives in checkpoint_io (safe file IO), published (manifest, cache, download) and
registry (ensure_published_native, load_published); these names stay importable from here.
"""
from __future__ import annotations

from detection.models.checkpoint_io import (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES,  # noqa: F401
                                            WRAPPER_PREFIXES, CheckpointError, extract_state_dict,
                                            load_checkpoint_file, load_state_dict_file, load_weights_into,
                                            sha256_file, strip_wrapper_prefixes)
from detection.models.published import (CACHE_ENV, MANIFEST_PATH, DownloadError,  # noqa: F401
                                        ManifestEntry, cache_dir, check_hash, download_checkpoint,
                                        load_manifest, published_native_dir)
from detection.models.registry import ensure_published_native, load_published  # noqa: F401
