"""Grounding DINO and MM-Grounding-DINO with a text prompt (issue 24): predict equals HF's own
GroundingDinoProcessor + model + post_process_grounded_object_detection for the same prompt (its
box threshold), category_id is the phrase holding the detection's highest-scoring token, query_index
is the decoder query HF kept, and the captured text cross-attention is the one the model used.
Small random configs and a BERT vocab.txt written by the test (no download)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import hf_prompted_models  # noqa: E402
from test_hf_equivalence import write_images  # noqa: E402

from detection.cli import main  # noqa: E402
from detection.models.registry import load_model  # noqa: E402

transformers.logging.set_verbosity_error()
PROMPT = "cat. remote control. bicycle."
PHRASES = ["cat", "remote control", "bicycle"]
FAMILIES = ["grounding-dino", "mm-grounding-dino"]


@pytest.fixture(scope="module", params=FAMILIES)
def grounding(request, tmp_path_factory) -> tuple[str, Path, list[Path]]:
    root = tmp_path_factory.mktemp(request.param)
    folder = hf_prompted_models.grounding_dino_folder(root / "model", model_type=request.param)
    images = write_images(root / "images", sizes=[(70, 90), (100, 61)])
    return request.param, folder, images


def hf_pipeline(family: str, folder: Path, image_path: Path, threshold: float):
    """HF's own path (eager attention) -> (post-processed result, its logits (Q, 256), input_ids (S,))."""
    model_class = (transformers.GroundingDinoForObjectDetection if family == "grounding-dino"
                   else transformers.MMGroundingDinoForObjectDetection)
    model = model_class.from_pretrained(folder, attn_implementation="eager").eval()
    processor = transformers.GroundingDinoProcessor.from_pretrained(folder)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    result = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=threshold, text_threshold=0.25, target_sizes=[image.shape[:2]])[0]
    return result, outputs.logits[0], inputs["input_ids"][0]


def gap_threshold(scores: torch.Tensor) -> float:
    values = np.sort(scores.numpy())[::-1]
    gaps = values[:-1] - values[1:]
    cut = 1 + int(np.argmax(gaps[1:max(2, 2 * len(values) // 3)]))
    assert gaps[cut] > 2e-4
    return float((values[cut] + values[cut + 1]) / 2)


def test_predict_with_a_prompt_matches_the_hf_pipeline(grounding, tmp_path) -> None:
    family, folder, images = grounding
    _, logits, _ = hf_pipeline(family, folder, images[0], 0.0)
    threshold = gap_threshold(logits.sigmoid().max(-1).values)
    out = tmp_path / "run"
    assert main(["predict", str(images[0].parent), "--model", str(folder), "--prompt", PROMPT, "--out", str(out),
                 "--score-threshold", str(threshold), "--device", "cpu", "--precision", "fp32", "--workers", "0",
                 "--quiet"]) == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    model = load_model(folder, prompt=PHRASES)
    phrase_of_token = model.phrase_of_token
    compared = 0
    for image_path in images:
        expected, logits, input_ids = hf_pipeline(family, folder, image_path, threshold)
        ours = next(line for line in lines if line["file"].endswith(image_path.name))["detections"]
        kept = torch.nonzero(logits.sigmoid().max(-1).values > threshold).flatten()  # the queries HF kept
        assert len(ours) == len(expected["scores"]) == len(kept) > 0
        order = torch.argsort(expected["scores"], descending=True, stable=True)
        for rank, k in enumerate(order.tolist()):
            mine = ours[rank]
            x0, y0, x1, y1 = expected["boxes"][k].tolist()
            assert abs(mine["score"] - float(expected["scores"][k])) <= 1e-4
            assert np.abs(np.array(mine["bbox"]) - np.array([x0, y0, x1 - x0, y1 - y0])).max() <= 0.05
            query = int(kept[k])
            assert mine["query_index"] == query
            # the label rule: the phrase holding the query's highest-scoring phrase token
            token_logits = logits[query, : len(input_ids)]
            in_phrase = phrase_of_token >= 0
            best = int(torch.nonzero(in_phrase).flatten()[token_logits[in_phrase].argmax()])
            assert mine["category_id"] == int(phrase_of_token[best]) and mine["class_name"] == PHRASES[mine["category_id"]]
            compared += 1
    assert compared >= 2
    config = json.loads((out / "run.json").read_text())["fingerprint"]["model_config"]
    assert config["prompt"] == PHRASES and "decoder query" in config["query_meaning"]


def test_captured_text_cross_attention_rebuilds_the_layer_output(grounding) -> None:
    """Every decoder layer's text cross-attention weights times the layer's values, through its output
    projection, give the module's output (within 1e-5): the weights the model used."""
    _, folder, _ = grounding
    model = load_model(folder, prompt=PHRASES)
    modules = model.text_cross_attention_modules()
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, kwargs, out: seen.append((mod, kwargs, out[0])),
                                       with_kwargs=True) for m in modules]
    images = torch.rand(1, 3, 64, 82)
    with torch.no_grad():
        outputs = model(images, cross_attention=True)
    for handle in handles:
        handle.remove()
    weights = outputs["text_attention"]  # (L, B, heads, Q, S)
    assert weights.shape[0] == len(modules) and weights.shape[-1] == model.input_ids.shape[1]
    for layer, (module, kwargs, output) in enumerate(seen):
        values = module.value(kwargs["values"]).view(1, -1, module.num_attention_heads, module.attention_head_size)
        context = torch.matmul(weights[layer], values.transpose(1, 2)).permute(0, 2, 1, 3).reshape(output.shape)
        assert torch.allclose(module.out_proj(context), output, atol=1e-5)
    assert outputs["attention"].kind == "sampled"


def test_an_over_long_prompt_names_the_limit(grounding, tmp_path, capsys) -> None:
    _, folder, images = grounding
    assert main(["predict", str(images[0]), "--model", str(folder), "--prompt", "cat. " * 20, "--out",
                 str(tmp_path / "run"), "--device", "cpu", "--quiet"]) == 2
    assert "takes at most 32 tokens" in capsys.readouterr().err


def test_a_renamed_hf_internal_fails_loudly(grounding, monkeypatch) -> None:
    _, folder, _ = grounding
    model = load_model(folder, prompt=PHRASES)
    for layer in model.hf_model.model.decoder.layers:
        monkeypatch.delattr(layer, "encoder_attn_text")
    with pytest.raises(RuntimeError, match="encoder_attn_text.*renamed"):
        model(torch.rand(1, 3, 64, 82), cross_attention=True)
