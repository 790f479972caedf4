"""The token-scores npz of a run folder (format `versions.TOKENS_NPZ_FORMAT`): a prompted detector's
per-detection prompt-token and phrase scores (`attention.token_scores.TokenScores`), written
atomically, read without pickle."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from detection.attention.token_scores import TokenScores
from detection.io import atomic_path
from detection.runfolder.versions import TOKENS_NPZ_FORMAT


def save_tokens_npz(path: str | os.PathLike, scores: TokenScores, meta: dict[str, Any] | None = None) -> None:
    """Write `scores` (detection k = row k, the image's predictions.jsonl order) with JSON metadata:
    format, phrases, tokens, token_method, phrase_method and `meta` (file, key, ...)."""
    if not (np.isfinite(scores.scores).all() and np.isfinite(scores.phrase_scores).all()):
        raise ValueError(f"{path}: token scores must be finite")
    document = {**(meta or {}), "format": TOKENS_NPZ_FORMAT, "phrases": list(scores.phrases),
                "tokens": list(scores.tokens), "token_method": scores.token_method,
                "phrase_method": scores.phrase_method, "num_detections": len(scores)}
    payload = np.frombuffer(json.dumps(document, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            raw = {} if scores.raw_scores is None else {"raw_scores": scores.raw_scores.astype(np.float32)}
            np.savez_compressed(handle, scores=scores.scores.astype(np.float32),
                                phrase_scores=scores.phrase_scores.astype(np.float32),
                                token_phrase=scores.token_phrase.astype(np.int64), meta_json=payload, **raw)


def load_tokens_npz(path: str | os.PathLike) -> tuple[TokenScores, dict[str, Any]]:
    """Read a `save_tokens_npz` file -> (TokenScores, metadata). ValueError names the file when it
    is not such a file or has another format version."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: cannot read token scores npz: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a token scores npz (a single .npy array)")
    with archive:
        needed = {"scores", "phrase_scores", "token_phrase", "meta_json"}
        if not needed <= set(archive.files):
            raise ValueError(f"{path}: not a token scores npz (needs {sorted(needed)}, has {sorted(archive.files)})")
        try:
            arrays = {name: archive[name] for name in (needed - {"meta_json"}) | ({"raw_scores"} & set(archive.files))}
            meta = json.loads(archive["meta_json"].tobytes().decode("utf-8"))
        except (OSError, EOFError, ValueError) as error:
            raise ValueError(f"{path}: cannot read token scores npz: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != TOKENS_NPZ_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: unknown token scores format {found!r} (this version reads {TOKENS_NPZ_FORMAT})")
    scores = TokenScores(phrases=tuple(meta["phrases"]), tokens=tuple(meta["tokens"]),
                         token_phrase=arrays["token_phrase"].astype(np.int64),
                         scores=arrays["scores"].astype(np.float32),
                         phrase_scores=arrays["phrase_scores"].astype(np.float32),
                         token_method=str(meta["token_method"]), phrase_method=str(meta["phrase_method"]),
                         raw_scores=arrays["raw_scores"].astype(np.float32) if "raw_scores" in arrays else None)
    return scores, meta
