"""The run folder's format versions, in one place: every writer stamps them, every reader checks them."""
from __future__ import annotations

#: The maps npz: per-detection cell maps (float32, un-normalised) with their geometry.
MAPS_NPZ_FORMAT = "detr-attn-maps/2"
#: The previous maps npz: full-resolution normalised float16 maps (still read).
MAPS_NPZ_FORMAT_V1 = "detr-attn-maps/1"
#: The viewer's grids npz (`runfolder.grids`).
GRIDS_NPZ_FORMAT = "detr-attn-grids/1"
#: The run.json fingerprint key that records the maps npz format of a folder.
MAPS_FORMAT_KEY = "maps_format"
#: The token-scores npz of prompted detectors (`runfolder.tokens_npz`): per-detection prompt-token
#: and phrase scores.
TOKENS_NPZ_FORMAT = "detr-attn-tokens/1"
