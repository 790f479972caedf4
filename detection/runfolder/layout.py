"""The run folder's layout: every file name and path of a predict run folder, in one place.

Layout (docs/ARCHITECTURE.md "Predict run folder"):

    OUT/run.json            settings + fingerprint, status "running" -> "complete", timing
    OUT/predictions.jsonl   one line per image; during the run an append-only journal
    OUT/errors.jsonl        {"file", "reason", "key", "image_id"[, "frame_index"]} per failed input
    OUT/detections.json     COCO results list, written at the end
    OUT/overlays/<key>.<method>.<fmt>        the combined overlay (the run's attention maps)
    OUT/overlays/<key>/det_<k>.<method>.<fmt>  detection k's overlay drawn from `method`'s map
                            (<method>-points: the point view); OUT/attention/<key>.npz
    OUT/attention/<method>/<key>.npz  with --explain, per method other than the default
    OUT/attention/grids/<key>.npz  the viewer's data (runfolder.grids), with --save-attention
    OUT/attention/tokens/<key>.npz  a prompted detector's token scores (runfolder.tokens_npz), with
                            --save-attention
    OUT/.parts/             per-rank journals of a torchrun run (merged by rank 0, then removed)
    OUT/.lock               pid + host of the live run writing OUT (removed when it ends; not an output)
"""
from __future__ import annotations

RUN_FILE = "run.json"
PREDICTIONS_FILE = "predictions.jsonl"
ERRORS_FILE = "errors.jsonl"
DETECTIONS_FILE = "detections.json"
PARTS_DIR = ".parts"
OVERLAYS_DIR = "overlays"
ATTENTION_DIR = "attention"
#: Inside ATTENTION_DIR (a key holds no '/', so no image's npz can be named like it).
GRIDS_DIR = f"{ATTENTION_DIR}/grids"
TOKENS_DIR = f"{ATTENTION_DIR}/tokens"
#: The live run's lock (runfolder.lock): not an output, so `--overwrite` (run under the lock)
#: keeps it; the run removes it when it ends.
LOCK_FILE = ".lock"
#: Everything a predict run writes; `--overwrite` removes these and nothing else.
OWN_OUTPUTS = (RUN_FILE, PREDICTIONS_FILE, ERRORS_FILE, DETECTIONS_FILE, PARTS_DIR, OVERLAYS_DIR, ATTENTION_DIR)
#: Overlay formats predict writes (and the report finds).
OVERLAY_FORMATS = ("png", "jpg", "jpeg")


# -- names inside the folder (relative, '/'-separated: as predictions.jsonl records them) ---------
# Every overlay's file name says what it shows: the explanation method whose map it draws
# (`attention.methods.table`), and for the point view of deformable attention "-points".
# The kinds and their colour schemes: docs/formats.md "Overlays".
POINTS_VIEW = "points"


def overlay_name(key: str, method: str, image_format: str) -> str:
    """The combined overlay of image `key` (every detection's `method` map in its class colour)."""
    return f"{OVERLAYS_DIR}/{key}.{method}.{image_format}"


def detection_overlay_name(key: str, index: int, method: str, image_format: str, style: str = "heatmap") -> str:
    """The overlay of detection `index` (0-based, predictions.jsonl order) of image `key`: its
    `method` map as a heat map, or with style POINTS_VIEW its sampling points."""
    shown = f"{method}-{POINTS_VIEW}" if style == POINTS_VIEW else method
    return f"{OVERLAYS_DIR}/{key}/det_{index}.{shown}.{image_format}"


def legacy_overlay_name(key: str, index: int | None, method: str, default_method: str,
                         image_format: str) -> str:
    """Where folders written before the overlays carried their method put them (still read):
    overlays/<key>.<fmt> (combined), overlays/<key>/det_<k>.<fmt> (the default method's, either
    style), overlays/<key>/<method>/det_<k>.<fmt> (another method's)."""
    if index is None:
        return f"{OVERLAYS_DIR}/{key}.{image_format}"
    folder = f"{OVERLAYS_DIR}/{key}" if method == default_method else f"{OVERLAYS_DIR}/{key}/{method}"
    return f"{folder}/det_{index}.{image_format}"


def image_overlays_dir(key: str) -> str:
    """The folder of image `key`'s per-detection overlays (every method's)."""
    return f"{OVERLAYS_DIR}/{key}"


def attention_name(key: str) -> str:
    """The npz of per-detection maps of image `key` (runfolder.maps_npz)."""
    return f"{ATTENTION_DIR}/{key}.npz"


def method_attention_name(key: str, method: str) -> str:
    """The npz of explanation method `method`'s maps of image `key` . A
    folder per method, not "<key>.<method>.npz": a key may itself end in ".<method>"."""
    return f"{ATTENTION_DIR}/{method}/{key}.npz"


def tokens_name(key: str) -> str:
    """A prompted detector's token scores of image `key` (runfolder.tokens_npz)."""
    return f"{TOKENS_DIR}/{key}.npz"


def grids_name(key: str) -> str:
    """The viewer's data of image `key`: attention grids, encoder attention, image (runfolder.grids)."""
    return f"{GRIDS_DIR}/{key}.npz"
