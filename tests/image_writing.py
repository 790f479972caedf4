"""Write one predicted image's files exactly as a predict run does (its methods built once per model)."""
from __future__ import annotations

from detection.engine.fast import PreparedModels
from detection.engine.image_files import OutputOptions, write_image_files
from detection.engine.predict_methods import build_predict_methods, image_maps

_RUNNERS: dict[tuple[int, str], object] = {}


def write_like_predict(folder, result, options: OutputOptions, model) -> dict:
    """`write_image_files` with the maps predict makes for `options` (no --explain); returns the record."""
    key = (id(model), repr(options))
    if key not in _RUNNERS:
        _RUNNERS[key] = build_predict_methods(model, None, options, "cpu", PreparedModels(model))
    return write_image_files(folder, result, image_maps(_RUNNERS[key], result), options, model.config.category_ids)
