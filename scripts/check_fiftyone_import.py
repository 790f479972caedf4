#!/usr/bin/env python
"""Read a `detr-attn export --format fiftyone` folder with FiftyOne's own importer (no database).

`fo.Dataset.from_dir(DIR, dataset_type=fo.types.FiftyOneDataset)` defers to FiftyOne's
LegacyFiftyOneDatasetImporter for a folder whose metadata.json has no "version"; this script runs
that importer's parsing (Sample.from_dict, media paths under fields/) without inserting into
MongoDB, for machines where FiftyOne installs but its database cannot start. Run it with a Python
that has fiftyone (it is not a dependency of this project):

    /path/to/fiftyone-venv/bin/python scripts/check_fiftyone_import.py DIR
"""
from __future__ import annotations

import sys

import fiftyone as fo  # noqa: F401  (registers the label classes)
from fiftyone.utils.data.importers import LegacyFiftyOneDatasetImporter


def main(folder: str) -> int:
    importer = LegacyFiftyOneDatasetImporter(folder)
    importer.setup()
    count = detections = 0
    for sample in iter(importer):
        count += 1
        for det in sample["detections"].detections:
            detections += 1
            assert det.mask is not None and det.mask.ndim == 2, "every detection carries its mask"
        if sample["detections"].detections:
            assert sample["saliency"].map_path.startswith("/"), "heatmap paths resolve to absolute paths"
    print(f"{folder}: FiftyOne read {count} samples with {detections} detections (masks and heatmaps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
