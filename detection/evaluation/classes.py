"""Class mapping for evaluating a model on a dataset: model label index -> dataset category
id, by normalised name or through an explicit class-map file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from detection.evaluation.results import EvaluationError
from detection.io import read_json


class ClassMappingError(EvaluationError):
    """A class map or a model/dataset class pairing that cannot be evaluated."""


def normalise_name(name: str) -> str:
    """'Traffic_Light ' -> 'traffic light': names compare case-, space-, '_'- and '-'-insensitively."""
    return " ".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())


def load_class_map(path: str | Path) -> dict[str, Any]:
    """JSON object {model class name: dataset category name | category id | null (ignore)}."""
    path = Path(path)
    data = read_json(path, "class-map file", ClassMappingError)
    if not isinstance(data, dict):
        raise ClassMappingError(f"{path}: expected a JSON object {{model class name: dataset category name or id}}")
    return data


def map_classes(
    class_names: Sequence[str],
    dataset_categories: Sequence[dict[str, Any]],
    evaluated_category_ids: Sequence[int],
    class_map: dict[str, Any] | None = None,
    class_map_source: str | Path = "--class-map",
    allow_unmapped: bool = False,
) -> tuple[dict[int, int], list[str]]:
    """Map model label index -> dataset category id, by name or through an explicit map.

    Without `class_map`, names match after `normalise_name`. With it, every key must be a model
    class and every value a dataset category name / id (or null to ignore that class); classes
    not in the map fall back to matching by name. Model classes that map nowhere are dropped
    (reported). An EVALUATED dataset category that no model class maps to would score AP 0
    for a reason unrelated to the model, so it is an error unless `allow_unmapped`.
    Returns (mapping, warnings).
    """
    by_name = {normalise_name(c["name"]): c["id"] for c in dataset_categories}
    known_ids = {c["id"] for c in dataset_categories}
    model_by_name = {normalise_name(n): i for i, n in enumerate(class_names)}
    mapping: dict[int, int] = {}
    explicit: set[int] = set()
    if class_map:
        for model_name, target in class_map.items():
            label = model_by_name.get(normalise_name(model_name))
            if label is None:
                raise ClassMappingError(f"{class_map_source}: {model_name!r} is not a model class; model classes: {list(class_names)}")
            explicit.add(label)
            if target is None:
                continue
            if isinstance(target, int) and not isinstance(target, bool):
                if target not in known_ids:
                    raise ClassMappingError(f"{class_map_source}: category id {target} (for {model_name!r}) is not in the dataset")
                mapping[label] = target
            elif isinstance(target, str) and normalise_name(target) in by_name:
                mapping[label] = by_name[normalise_name(target)]
            else:
                available = [c["name"] for c in dataset_categories]
                raise ClassMappingError(
                    f"{class_map_source}: {target!r} (for {model_name!r}) is not a dataset category; available: {available}"
                )
    for label, name in enumerate(class_names):
        if label not in explicit and normalise_name(name) in by_name:
            mapping[label] = by_name[normalise_name(name)]
    warnings = []
    unmapped_model = [class_names[i] for i in range(len(class_names)) if i not in mapping and i not in explicit]
    if unmapped_model and len(unmapped_model) < len(class_names):
        warnings.append(
            f"{len(unmapped_model)} model classes have no dataset category; their detections are dropped: {unmapped_model[:10]}"
        )
    covered = set(mapping.values())
    names = {c["id"]: c["name"] for c in dataset_categories}
    missing = [names[c] for c in evaluated_category_ids if c not in covered]
    if missing:
        message = (
            f"dataset categories {missing[:10]} have no model class (model classes: {list(class_names)[:20]}). "
            "Pass --class-map FILE (JSON {\"model class\": \"dataset category\"}), restrict the evaluation "
            "with --categories, or add --allow-unmapped to score them as missed."
        )
        if not allow_unmapped or len(missing) == len(evaluated_category_ids):
            raise ClassMappingError(message)
        warnings.append(message)
    return mapping, warnings
