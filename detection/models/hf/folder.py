"""Reading a Hugging Face detector folder: config.json, the weights file, preprocessor_config.json.

Everything is checked before a model is built, and every error names the file and the field:
remote code (`auto_map`) is refused, the family comes from `model_type`, the safetensors header
must parse, and the processor's resize rule must be one we reproduce exactly.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from detection.models.contract import PreprocessSpec
from detection.models.hf.families import Family, family_of

CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
COMBINED_PROCESSOR_FILE = "processor_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# PIL resample codes as transformers stores them (PILImageResampling)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {1: "lanczos", 4: "box", 5: "hamming"}
_RESCALE = 1 / 255


class HFFolderError(ValueError):
    """A Hugging Face folder that cannot be used; the message names the file and the field."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class HFFolder:
    """A checked HF detector folder.

    config: config.json as a dict; family: its Family; weights: the safetensors file (or index);
    processor: preprocessor_config.json as a dict, or None when the folder has none (then the
    family's processor defaults apply); preprocess: the PreprocessSpec reproducing that processor.
    """

    path: Path
    config: dict[str, Any]
    family: Family
    weights: Path
    processor: dict[str, Any] | None
    preprocess: PreprocessSpec


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFFolderError(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFFolderError(path, f"not readable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise HFFolderError(path, f"expected a JSON object, got {type(value).__name__}")
    return value


def read_model_type(folder: str | os.PathLike) -> str | None:
    """config.json's model_type (None when absent); refuses configs that carry remote code."""
    path = Path(folder) / CONFIG_FILE
    config = read_json(path)
    if "auto_map" in config:
        raise HFFolderError(path, "field 'auto_map' asks for remote code, which is never run: "
                                  "only transformers' own model classes are supported")
    return config.get("model_type")


def check_weights(folder: Path) -> Path:
    """The folder's safetensors weights, with a header that parses (shards included)."""
    index = folder / WEIGHT_FILES[1]
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFFolderError(index, "field 'weight_map' is missing or empty")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        listed = index
    else:
        files = [folder / WEIGHT_FILES[0]]
        listed = files[0]
    for file in files:
        if not file.is_file():
            raise HFFolderError(file, "missing: the folder needs model.safetensors (or its shards) "
                                      "next to config.json; .bin pickles are not loaded")
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise HFFolderError(file, f"not a valid safetensors file ({exc})") from exc
    return listed


def read_hf_folder(folder: str | os.PathLike) -> HFFolder:
    """Check an HF detector folder of a wrapped family (see families.FAMILIES)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    model_type = read_model_type(folder)
    family = family_of(model_type, str(config_path))
    config = read_json(config_path)
    if not family.prompted and (not isinstance(config.get("id2label"), dict) or not config["id2label"]):
        raise HFFolderError(config_path, "field 'id2label' is missing or empty: class names are needed")
    weights = check_weights(folder)
    processor_path = folder / PROCESSOR_FILE
    processor = read_json(processor_path) if processor_path.is_file() else None
    combined = folder / COMBINED_PROCESSOR_FILE
    if processor is None and combined.is_file():  # transformers 5 saves a multimodal processor's parts in one file
        processor = read_json(combined).get("image_processor")
        if not isinstance(processor, dict):
            raise HFFolderError(combined, "field 'image_processor' is missing or not an object")
        processor_path = combined
    preprocess = processor_spec(processor, family, processor_path)
    return HFFolder(folder, config, family, weights, processor, preprocess)


def _processor_defaults(class_name: str, origin: Path) -> dict[str, Any]:
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise HFFolderError(origin, f"field 'image_processor_type': {class_name!r} is not a transformers "
                                    f"image processor")
    return {key: getattr(cls, key, None) for key in (
        "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
        "image_mean", "image_std", "do_pad", "pad_size", "default_to_square")}


def processor_spec(processor: dict[str, Any] | None, family: Family, origin: Path) -> PreprocessSpec:
    """The PreprocessSpec that reproduces an HF image processor (its torchvision backend): uint8
    resized by torchvision with antialias, except RfDetrImageProcessor (float resize, no antialias).

    processor: preprocessor_config.json as a dict (None: the family's processor defaults).
    Supported: size {shortest_edge, longest_edge} or {height, width}; resample nearest /
    bilinear / bicubic; rescale by 1/255; ImageNet-style mean/std or none; zero padding to the
    batch's largest image. Anything else raises HFFolderError naming the file and the field.
    """
    where = origin if processor is not None else f"{origin.parent} (no {origin.name}: processor defaults)"
    processor = dict(processor or {})
    class_name = processor.get("image_processor_type") or family.processor_class
    class_name = class_name[:-4] if class_name.endswith("Fast") else class_name
    values = _processor_defaults(class_name, origin)
    values.update({k: v for k, v in processor.items() if k in values and v is not None})

    def fail(field: str, problem: str) -> HFFolderError:
        return HFFolderError(where, f"field {field!r}: {problem}")

    resample = values["resample"]
    resample = int(getattr(resample, "value", resample)) if resample is not None else 2
    if resample not in _RESAMPLE:
        name = _RESAMPLE_NAMES.get(resample, "unknown")
        raise fail("resample", f"{resample} ({name}) is not supported; nearest (0), bilinear (2) or bicubic (3)")
    interpolation = _RESAMPLE[resample]
    if values["do_rescale"] is False:
        raise fail("do_rescale", "false is not supported: inputs are uint8 images rescaled by 1/255")
    factor = values["rescale_factor"]
    if factor is not None and abs(float(factor) - _RESCALE) > 1e-12:
        raise fail("rescale_factor", f"{factor} is not supported; only 1/255")
    if class_name.startswith("Owlv2") and values["do_pad"] is False:
        raise fail("do_pad", "false is not supported: OWLv2 inputs are padded to a square "
                             "(Owlv2ImageProcessor's default)")
    if values["pad_size"]:
        raise fail("pad_size", f"{values['pad_size']} (padding to a fixed size) is not supported")
    mean = std = None
    if values["do_normalize"]:
        mean, std = values["image_mean"], values["image_std"]
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise fail("image_mean", f"need 3 RGB values for image_mean and image_std, got {mean} / {std}")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if class_name.startswith("RfDetr"):
        # RfDetrImageProcessor rescales to float first, then resizes without antialias
        if interpolation == "nearest":
            raise fail("resample", "nearest (0) is not supported for RfDetrImageProcessor; bilinear or bicubic")
        options = dict(interpolation=interpolation, antialias=False, backend="torch", mean=mean, std=std)
    else:
        options = dict(interpolation=interpolation, antialias=interpolation != "nearest", backend="torchvision",
                       mean=mean, std=std)
    size = values["size"] or {}
    if not values["do_resize"]:
        raise fail("do_resize", "false is not supported: every family resizes its inputs")
    if isinstance(size, int) and not isinstance(size, bool):  # older folders (google/owlvit-*): transformers'
        # get_size_dict makes an int a square where the processor defaults to squares
        size = {"height": size, "width": size} if values["default_to_square"] else {"shortest_edge": size}
    if not isinstance(size, dict):
        raise fail("size", f"expected a dict, got {size!r}")
    keys = {k for k, v in size.items() if v is not None}
    rounding = "yolos" if class_name.startswith("Yolos") else "hf"
    if keys == {"shortest_edge", "longest_edge"}:
        return PreprocessSpec.shortest_edge(int(size["shortest_edge"]), int(size["longest_edge"]),
                                            size_rounding=rounding, **options)
    if keys == {"height", "width"}:
        return PreprocessSpec.fixed(int(size["height"]), int(size["width"]), **options)
    raise fail("size", f"resize rule {sorted(keys)} is not supported; use "
                       "{shortest_edge, longest_edge} or {height, width}")
