"""Build an HFDetector from a checked folder: transformers' own class and loader, every key matched."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from detection.models.hf.detector import HFDetector, HFDetectorConfig
from detection.models.hf.folder import CONFIG_FILE, HFFolderError, read_hf_folder
from detection.models.hf.prompted import build_prompted

logger = logging.getLogger(__name__)


def identical_key_value_layers(hf_model: nn.Module) -> list[int]:
    """The decoder layers whose self-attention has k_proj equal to v_proj (weight and bias).

    D-FINE folders converted before transformers PR #40257 have exactly that (issue #40253: the
    conversion script sliced the key rows of the original in_proj where the value rows are), so
    every decoder self-attention uses its values as keys. Trained or random weights never agree
    bit for bit."""
    layers = []
    for index, layer in enumerate(hf_model.model.decoder.layers):
        attention = layer.self_attn
        key, value = attention.k_proj, attention.v_proj
        if torch.equal(key.weight, value.weight) and (key.bias is None) == (value.bias is None) and (
                key.bias is None or torch.equal(key.bias, value.bias)):
            layers.append(index)
    return layers


def warn_known_bad_checkpoint(hf_model: nn.Module, model_type: str, origin: str) -> None:
    """Log a warning, naming the fix, for a folder with a known conversion bug (D-FINE: see
    `identical_key_value_layers`); nothing for any other folder."""
    if model_type != "d_fine":
        return
    layers = identical_key_value_layers(hf_model)
    if layers:
        logger.warning(
            "%s: D-FINE decoder self-attention has identical k_proj and v_proj weights in layers %s of %d: it was "
            "converted before transformers PR #40257 (issue #40253), whose conversion script copied the value rows "
            "of the original in_proj_weight into k_proj, so its detections are not the original model's. Fix: "
            "convert the original D-FINE checkpoint again with transformers' D-FINE conversion script as fixed by "
            "PR #40257 (k_proj = in_proj_weight[d_model:2*d_model]), or use a revision of the checkpoint converted "
            "after that fix", origin, layers, len(hf_model.model.decoder.layers))


def load_hf_detector(folder: str | os.PathLike, source: str | None = None,
                     prompt: Sequence[str] | None = None) -> HFDetector:
    """An HF detector folder -> HFDetector in eval mode (CPU).

    source: what run.json records as the weights' origin (default: the folder's path; the Hub
    loader passes "hf:ORG/NAME@COMMIT"). The folder is checked first (hf.folder.read_hf_folder);
    weights that do not fit config.json (missing, unexpected or mis-shaped tensors) raise
    HFFolderError naming the weights file. The model is built with attn_implementation
    "eager" (the attention captures read eager attention modules) and with
    use_pretrained_backbone off: every tensor comes from the folder, nothing is downloaded. A
    folder with a known conversion bug loads with a warning naming the fix (warn_known_bad_checkpoint).
    prompt: the phrases of a prompted (open-vocabulary) family, required there and refused
    elsewhere (ValueError); the folder's tokenizer files tokenize it (hf.prompted).
    """
    import transformers

    checked = read_hf_folder(folder)
    family = checked.family
    if family.prompted and prompt is None:
        raise ValueError(f"{checked.path}: {family.title} is an open-vocabulary detector: give the classes as a "
                         'prompt (--prompt "cat. remote control." or --prompt-file FILE; prompt= in the API)')
    if not family.prompted and prompt is not None:
        raise ValueError(f"{checked.path}: a prompt applies to open-vocabulary detectors only; {family.title} "
                         "has the fixed classes of its config.json")
    config = transformers.AutoConfig.from_pretrained(str(checked.path), local_files_only=True)
    if getattr(config, "use_pretrained_backbone", False):
        config.use_pretrained_backbone = False
    model_class = getattr(transformers, family.model_class)
    try:
        model, info = model_class.from_pretrained(
            str(checked.path), config=config, local_files_only=True, attn_implementation="eager",
            output_loading_info=True)
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise HFFolderError(checked.weights, f"cannot be loaded into {family.model_class} as "
                                             f"{checked.path / CONFIG_FILE} describes it ({exc})") from exc
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        entries = sorted(str(e) for e in info.get(kind, []) or [])
        if entries:
            shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} in all)" if len(entries) > 8 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        raise HFFolderError(checked.weights, f"does not match {checked.path / CONFIG_FILE} "
                                             f"({family.model_class}): " + "; ".join(problems))
    warn_known_bad_checkpoint(model, family.model_type, source or str(checked.path))
    if family.prompted:
        return build_prompted(model.eval(), family, checked, prompt, source or str(Path(checked.path).resolve()))
    id2label = {int(k): str(v) for k, v in checked.config["id2label"].items()}
    label_ids = sorted(id2label)
    num_queries = int(getattr(config, "num_queries", None) or getattr(config, "num_detection_tokens", 0))
    detector_config = HFDetectorConfig(
        name=Path(checked.path).name, model_type=family.model_type,
        class_names=tuple(id2label[i] for i in label_ids), category_ids=tuple(label_ids),
        num_queries=num_queries, source=source or str(Path(checked.path).resolve()))
    return HFDetector(model.eval(), family, checked.preprocess, detector_config)
