"""Deprecated home of the evaluation subset and ground-truth names (one release): subsets are
in `detection.evaluation.subsets`, the COCO ground-truth loader in `detection.data.ground_truth`."""
from __future__ import annotations

from detection.deprecation import forward_moved_names

__getattr__ = forward_moved_names(__name__, {
    "GroundTruthError": "detection.data.ground_truth:GroundTruthError",
    "validate_coco_gt": "detection.data.ground_truth:validate_coco_gt",
    "load_coco_gt": "detection.data.ground_truth:load_coco_gt",
    "SubsetSpec": "detection.evaluation.subsets:SubsetSpec",
    "Subset": "detection.evaluation.subsets:Subset",
    "read_image_ids_file": "detection.evaluation.subsets:read_image_ids_file",
    "select_subset": "detection.evaluation.subsets:select_subset",
})
