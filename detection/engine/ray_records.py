"""The typed records of a Ray run (`engine.ray_run.ray_records`): one Arrow row per input, with the
fields of its predictions.jsonl / errors.jsonl line as columns and, per method whose maps npz the
run writes, the compact cell maps and their geometry -- for users who write the dataset to Parquet
(or Lance, or join it) instead of reading the run folder. pyarrow (a dependency of Ray) is imported
inside functions only.

Columns (`records_schema`; a list column holds one entry per detection, in the record's order):
    key string, image_id int64, file string, frame_index int64 (null for still images),
    kind string ("prediction" | "error"), error string (the errors.jsonl reason; null for a prediction),
    width / height int64 (original pixels; null for an error),
    boxes list<list<float64>> (x0, y0, x1, y1 original-image pixels, the values the npz holds:
        predictions.jsonl's bbox is `boxes.coco_xywh` of them at 3 decimals),
    scores list<float64> (full precision; predictions.jsonl rounds to 6 decimals),
    labels list<int64>, category_ids list<int64>, class_names list<string>, query_index list<int64>
        (null for an error),
    maps_<method> struct per method with an npz (`map_methods`; null where the image has no npz of it):
        cells list<list<float32>> (per detection the (hv, wv) cell map, row-major: the npz's
        "cells" (N, hv, wv) un-normalised), grid_size list<int64> [hv, wv], feature_stride int64,
        input_size list<int64> [h_in, w_in] (the npz's valid_feature_size / feature_stride / input_size),
    record string (the journal line, `runfolder.journal.dumps_record`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from detection.attention.methods import DEFAULT_METHOD, MethodMaps
from detection.runfolder.journal import dumps_record
from detection.structures import Detections

#: The prefix of each method's map column: maps_<method>.
MAPS_PREFIX = "maps_"
#: The columns the driver's journal reads (the rows of a run without typed columns).
JOURNAL_COLUMNS = ("key", "image_id", "kind", "record")


def map_methods(save_attention: bool, explain: Sequence[str] | None) -> list[str]:
    """The methods whose maps npz a run writes, in the order of `image_files.write_image_files`: the
    run's attention maps (attention/<key>.npz, key DEFAULT_METHOD) with --save-attention, then each
    --explain method with files of its own (attention/<method>/<key>.npz)."""
    return ([DEFAULT_METHOD] if save_attention else []) + [m for m in explain or [] if m != DEFAULT_METHOD]


def records_schema(methods: Sequence[str]):
    """The Arrow schema of the typed records (module docstring) with a maps_<method> column per method."""
    import pyarrow as pa

    ints = pa.list_(pa.int64())
    maps = pa.struct([("cells", pa.list_(pa.list_(pa.float32()))), ("grid_size", ints),
                      ("feature_stride", pa.int64()), ("input_size", ints)])
    fields = [("key", pa.string()), ("image_id", pa.int64()), ("file", pa.string()), ("frame_index", pa.int64()),
              ("kind", pa.string()), ("error", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
              ("boxes", pa.list_(pa.list_(pa.float64()))), ("scores", pa.list_(pa.float64())), ("labels", ints),
              ("category_ids", ints), ("class_names", pa.list_(pa.string())), ("query_index", ints)]
    fields += [(MAPS_PREFIX + method, maps) for method in methods]
    return pa.schema(fields + [("record", pa.string())])


def _base(kind: str, record: Mapping[str, Any]) -> dict[str, Any]:
    return {"key": str(record["key"]), "image_id": int(record["image_id"]), "file": record["file"],
            "frame_index": record.get("frame_index"), "kind": kind, "record": dumps_record(dict(record))}


def error_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The row of an errors.jsonl record (no detections, no maps)."""
    return {**_base("error", record), "error": record["reason"]}


def prediction_row(record: Mapping[str, Any], detections: Detections, maps: Mapping[str, MethodMaps],
                   methods: Sequence[str]) -> dict[str, Any]:
    """The row of a predicted image: its predictions.jsonl `record`, its `detections` (full-precision
    boxes and scores, the npz's values), and the cell maps of each of `methods` whose npz the record
    names ("attention" for DEFAULT_METHOD, "methods" for the --explain ones)."""
    entries = record["detections"]
    row = {**_base("prediction", record), "width": int(record["width"]), "height": int(record["height"]),
           "boxes": detections.boxes.tolist(), "scores": detections.scores.tolist(),
           "labels": [int(e["label"]) for e in entries], "category_ids": [int(e["category_id"]) for e in entries],
           "class_names": [str(e["class_name"]) for e in entries],
           "query_index": [int(e["query_index"]) for e in entries]}
    written = ({DEFAULT_METHOD} if "attention" in record else set()) | set(record.get("methods", {}))
    for method in methods:
        if method in written:
            row[MAPS_PREFIX + method] = _map_cells(maps[method])
    return row


def _map_cells(maps: MethodMaps) -> dict[str, Any]:
    """A method's maps as its column's struct: (N, hv, wv) float32 -> N flattened cell maps."""
    cells = np.asarray(maps.values.numpy(), dtype=np.float32)
    return {"cells": list(cells.reshape(len(cells), -1)), "grid_size": [int(v) for v in cells.shape[1:]],
            "feature_stride": int(maps.stride), "input_size": [int(v) for v in maps.input_size]}


def records_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]):
    """Rows (`prediction_row`, `error_row`) -> a pyarrow.Table of `records_schema(methods)`."""
    import pyarrow as pa

    schema = records_schema(methods)
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def journal_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> the journal's numpy columns (JOURNAL_COLUMNS), what the driver of a run reads."""
    return {name: np.array([row[name] for row in rows], dtype=object) for name in JOURNAL_COLUMNS}
