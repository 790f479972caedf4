"""OWL-ViT with a text prompt (issue 24): predict equals HF's own processor + model + post-processing
for the same prompt, category_id is the phrase's index and query_index the patch token HF kept, the
prompt is in the run's fingerprint, bad prompts are usage errors, and the captured attention is the
one the model used. Small random OWL-ViT and a CLIP tokenizer written by the test (no download)."""
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


@pytest.fixture(scope="module")
def owl(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("owl")
    folder = hf_prompted_models.owlvit_folder(root / "model")
    images = write_images(root / "images", sizes=[(70, 90), (100, 61)])
    return folder, images


def hf_pipeline(folder: Path, image_path: Path, threshold: float) -> tuple[dict, torch.Tensor]:
    """HF's own path: OwlViTProcessor (text + image), the model (eager), the processor's
    post_process_grounded_object_detection; also HF's per-patch scores (to name the kept patches)."""
    model = transformers.OwlViTForObjectDetection.from_pretrained(folder, attn_implementation="eager").eval()
    processor = transformers.OwlViTProcessor.from_pretrained(folder)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    inputs = processor(text=[PHRASES], images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    result = processor.post_process_grounded_object_detection(
        outputs, threshold=threshold, target_sizes=[image.shape[:2]], text_labels=[PHRASES])[0]
    return result, outputs.logits[0].max(-1).values.sigmoid()


def gap_threshold(scores: torch.Tensor) -> float:
    """A threshold in the widest gap between consecutive scores among the top 2 .. 2/3."""
    values = np.sort(scores.numpy())[::-1]
    gaps = values[:-1] - values[1:]
    cut = 1 + int(np.argmax(gaps[1:max(2, 2 * len(values) // 3)]))
    assert gaps[cut] > 2e-4
    return float((values[cut] + values[cut + 1]) / 2)


def predict(folder: Path, images: Path, out: Path, *extra: str) -> int:
    return main(["predict", str(images), "--model", str(folder), "--out", str(out), "--device", "cpu",
                 "--precision", "fp32", "--workers", "0", "--quiet", *extra])


def test_predict_with_a_prompt_matches_the_hf_pipeline(owl, tmp_path) -> None:
    folder, images = owl
    threshold = gap_threshold(hf_pipeline(folder, images[0], 0.0)[1])
    out = tmp_path / "run"
    assert predict(folder, images[0].parent, out, "--prompt", PROMPT, "--score-threshold", str(threshold)) == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    compared = 0
    for image_path in images:
        expected, patch_scores = hf_pipeline(folder, image_path, threshold)
        ours = next(line for line in lines if line["file"].endswith(image_path.name))["detections"]
        kept = torch.nonzero(patch_scores > threshold).flatten()  # the patches HF's post-processing kept
        assert len(ours) == len(expected["scores"]) == len(kept)  # an image may have none: then HF has none
        order = torch.argsort(expected["scores"], descending=True, stable=True)
        for rank, k in enumerate(order.tolist()):
            mine = ours[rank]
            x0, y0, x1, y1 = expected["boxes"][k].tolist()
            assert abs(mine["score"] - float(expected["scores"][k])) <= 1e-4
            assert mine["category_id"] == int(expected["labels"][k])  # the phrase's index in the prompt
            assert mine["class_name"] == expected["text_labels"][k] == PHRASES[mine["category_id"]]
            assert mine["query_index"] == int(kept[k])
            assert np.abs(np.array(mine["bbox"]) - np.array([x0, y0, x1 - x0, y1 - y0])).max() <= 0.05
            compared += 1
    assert compared >= 2
    run = json.loads((out / "run.json").read_text())
    config = run["fingerprint"]["model_config"]
    assert run["fingerprint"]["prompt"] == config["prompt"] == config["class_names"] == PHRASES
    assert "patch token" in config["query_meaning"]
    # another prompt is another run: resuming into the folder is refused
    assert predict(folder, images[0].parent, out, "--prompt", "cat. dog.", "--score-threshold", str(threshold)) == 2


def test_prompt_file_gives_the_same_phrases(owl, tmp_path) -> None:
    folder, images = owl
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("cat\n\n  remote   control \nbicycle\n", encoding="utf-8")
    assert predict(folder, images[0], tmp_path / "a", "--prompt", PROMPT, "--score-threshold", "0.3") == 0
    assert predict(folder, images[0], tmp_path / "b", "--prompt-file", str(prompt_file), "--score-threshold", "0.3") == 0
    first, second = ((tmp_path / name / "predictions.jsonl").read_text() for name in ("a", "b"))
    assert first == second


@pytest.mark.parametrize("options, message", [
    (["--prompt", " . . "], "has no phrase"),
    (["--prompt", "cat " * 20], "at most 16 tokens per phrase"),
    ([], "open-vocabulary detector: give the classes as a prompt"),
])
def test_bad_prompts_are_usage_errors(owl, tmp_path, capsys, options, message) -> None:
    folder, images = owl
    out = tmp_path / "run"
    assert predict(folder, images[0], out, *options) == 2
    assert message in capsys.readouterr().err
    assert not (out / "predictions.jsonl").exists()


def test_a_prompt_for_a_closed_set_model_is_refused(tmp_path, capsys) -> None:
    image = write_images(tmp_path / "images", sizes=[(40, 50)])[0]
    assert main(["predict", str(image), "--model", "demo", "--prompt", "cat.", "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--quiet"]) == 2
    assert "a prompt applies to open-vocabulary" in capsys.readouterr().err


def test_captured_attention_rebuilds_the_last_vision_layer(owl) -> None:
    """The record's rows (+ the [CLS] column the record leaves out) times the layer's values, through
    its output projection, give the layer's attention output: the weights the model used."""
    folder, _ = owl
    model = load_model(folder, prompt=PHRASES)
    attention = model.last_vision_attention()
    seen = {}
    hook = attention.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=kwargs.get("hidden_states", args[0] if args else None), out=out[0]), with_kwargs=True)
    images = torch.randn(2, 3, hf_prompted_models.IMAGE_SIZE, hf_prompted_models.IMAGE_SIZE)
    with torch.no_grad():
        outputs = model(images, cross_attention=True, keep_graph=False)
    hook.remove()
    record = outputs["attention"]
    weights = outputs_graph_weights(model, images)
    assert torch.equal(record.decoder_cross[0].flatten(-2), weights[:, :, 1:, 1:])
    hidden = seen["x"]
    batch, tokens, width = hidden.shape
    heads = attention.num_heads
    values = attention.v_proj(hidden).view(batch, tokens, heads, -1).transpose(1, 2)
    rebuilt = attention.out_proj(torch.matmul(weights, values).transpose(1, 2).reshape(batch, tokens, width))
    assert torch.allclose(rebuilt, seen["out"], atol=1e-5)
    assert record.feature_stride == hf_prompted_models.PATCH and tuple(record.input_size) == images.shape[-2:]


def outputs_graph_weights(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        graph = model(images, cross_attention=True, keep_graph=True)["attention_graph"]
    weights = graph.tokens[-1]  # every vision layer; the record holds the last
    assert graph.detection_tokens == weights.shape[-1] - 1
    return weights


def test_a_renamed_hf_internal_fails_loudly(owl, monkeypatch) -> None:
    folder, _ = owl
    model = load_model(folder, prompt=PHRASES)
    monkeypatch.delattr(type(model.hf_model.owlvit.vision_model), "encoder", raising=False)
    monkeypatch.setattr(model.hf_model.owlvit.vision_model, "encoder", None, raising=False)
    with pytest.raises(RuntimeError, match="vision_model.encoder.layers.*renamed"):
        model(torch.zeros(1, 3, 64, 64), cross_attention=True)


def test_image_maps_raw_and_attn_grad_are_the_patch_token_s_row(owl) -> None:
    """raw: the head mean of the detection's patch row of the last vision layer over the patches;
    attn-grad: the head mean of (dlogit/dA * A)+ on that row (target: the detection's phrase logit);
    rollout (every layer's raw attention) is refused by name (relevance: tests/test_owl_relevance.py)."""
    import detection
    from detection import api
    from detection.attention.methods import MethodNotApplicable, applicable_methods

    folder, images = owl
    api.clear_model_cache()
    model = load_model(folder, prompt=PHRASES)
    assert applicable_methods(model) == ["raw", "attn-grad", "relevance", "drise", "in-box"]
    grid = model.patch_grid()
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    from detection.data.preprocess import image_to_input

    pixels = image_to_input(rgb, model.preprocess_spec)[None]
    with torch.enable_grad():
        outputs = model(pixels, cross_attention=True, keep_graph=True)
    weights = outputs["attention_graph"].tokens[-1]
    for method in ("raw", "attn-grad"):
        explained = detection.explain(str(images[0]), model=str(folder), prompt=PROMPT, method=method,
                                      score_threshold=0.3, device="cpu")
        found = explained.detections
        assert len(found) > 0
        for k, (query, label) in enumerate(zip(found.query_index.tolist(), found.labels.tolist())):
            if method == "raw":
                expected = weights.detach()[0, :, 1 + query, 1:].mean(0)
            else:
                (gradient,) = torch.autograd.grad(outputs["pred_logits"][0, query, label], weights, retain_graph=True)
                expected = (gradient * weights.detach())[0, :, 1 + query, 1:].clamp(min=0).mean(0)
            values = explained.method_maps.values[k] if explained.method_maps is not None else None
            if values is None:  # raw's maps come straight from the record
                values = explained.attention.decoder_cross[-1, 0, :, query].mean(0)
            assert torch.allclose(values.reshape(-1), expected.reshape(-1), atol=1e-6), (method, k)
            assert tuple(values.shape[-2:]) == grid
    # in-box: the raw row (its peak scaled to 1) to the power 0.35 inside each detection's box, 0 outside
    from detection.attention.methods.in_box import box_cell_coverage

    boxed = detection.explain(str(images[0]), model=str(folder), prompt=PROMPT, method="in-box",
                              score_threshold=0.3, device="cpu")
    maps = boxed.method_maps
    coverage = box_cell_coverage(boxed.detections.boxes, boxed.detections.image_size, maps.input_size, maps.stride,
                                 tuple(maps.values.shape[-2:]))
    for k, query in enumerate(boxed.detections.query_index.tolist()):
        row = weights.detach()[0, :, 1 + query, 1:].mean(0).reshape(grid)
        expected = (row / row.max()) ** 0.35 * coverage[k]
        assert torch.allclose(maps.values[k], expected.float(), atol=1e-5), k
    with pytest.raises(MethodNotApplicable, match="'rollout' does not apply to the OWL-ViT family.*every layer"):
        detection.explain(str(images[0]), model=str(folder), prompt=PROMPT, method="rollout", device="cpu")


def test_saved_token_scores_round_trip_and_the_run_folder_serves_report_and_export(owl, tmp_path) -> None:
    """predict --save-attention writes attention/tokens/<key>.npz (versioned) equal to the scores
    computed directly; report, the viewer and export read the folder as for any family."""
    from detection.attention.token_scores import text_token_scores
    from detection.data.preprocess import image_to_input
    from detection.runfolder.tokens_npz import load_tokens_npz
    from detection.runfolder.versions import TOKENS_NPZ_FORMAT

    folder, images = owl
    out = tmp_path / "run"
    assert predict(folder, images[0].parent, out, "--prompt", PROMPT + " zebra.", "--score-threshold", "0.3",
                   "--save-attention", "--overlays") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"]["tokens_format"] == TOKENS_NPZ_FORMAT
    model = load_model(folder, prompt=PHRASES + ["zebra"])
    for line in (out / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        scores, meta = load_tokens_npz(out / record["tokens"])
        assert meta["format"] == TOKENS_NPZ_FORMAT and meta["key"] == record["key"]
        assert scores.phrases == tuple(PHRASES + ["zebra"]) and len(scores) == len(record["detections"])
        rgb = np.asarray(Image.open(record["file"]).convert("RGB"))
        queries = torch.tensor([d["query_index"] for d in record["detections"]], dtype=torch.int64)
        labels = torch.tensor([d["category_id"] for d in record["detections"]], dtype=torch.int64)
        expected = text_token_scores(model, image_to_input(rgb, model.preprocess_spec)[None], queries, labels)
        assert np.allclose(scores.scores, expected.scores, atol=1e-6)
        assert np.allclose(scores.phrase_scores, expected.phrase_scores, atol=1e-5)
    assert main(["report", str(out)]) == 0 and main(["report", str(out), "--viewer"]) == 0
    assert "remote control" in (out / "report" / "viewer.html").read_text(encoding="utf-8")
    assert main(["export", str(out), "--format", "coco-masks", "--out", str(tmp_path / "masks.json")]) == 0
    exported = json.loads((tmp_path / "masks.json").read_text())
    assert len(exported) == run_detections(out) and {r["category_id"] for r in exported} <= {0, 1, 2, 3}
    assert all(r["segmentation"]["counts"] for r in exported)


def run_detections(out: Path) -> int:
    return sum(len(json.loads(line)["detections"]) for line in (out / "predictions.jsonl").read_text().splitlines())


def test_eval_takes_the_category_names_as_the_prompt(owl, tmp_path) -> None:
    """eval on a COCO-format set with an open-vocabulary model and no --prompt: the prompt is the
    categories' names, matched back to the categories by name (ids 7, 3, 11 here, not 0 .. 2)."""
    folder, images = owl
    categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "remote control"}, {"id": 11, "name": "bicycle"}]
    gt = {"images": [{"id": i + 1, "file_name": p.name, "height": h, "width": w}
                     for i, (p, (h, w)) in enumerate(zip(images, [(70, 90), (100, 61)]))],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 11, "bbox": [5, 30, 40, 50], "area": 2000, "iscrowd": 0}],
          "categories": categories}
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--ann", str(ann), "--images", str(images[0].parent), "--out", str(out),
                 "--device", "cpu", "--precision", "fp32", "--workers", "0", "--score-threshold", "0.3",
                 "--no-attention", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "bbox" in json.dumps(metrics).lower()
    predicted = _eval_detections(out)
    assert predicted and {d["category_id"] for d in predicted} <= {7, 3, 11}
    # an explicit prompt naming no category is refused by the name matching (exit 2)
    assert main(["eval", "--model", str(folder), "--prompt", "zebra.", "--ann", str(ann), "--images",
                 str(images[0].parent), "--out", str(tmp_path / "eval2"), "--device", "cpu", "--workers", "0",
                 "--no-attention", "--quiet"]) == 2


def _eval_detections(out: Path) -> list[dict]:
    return json.loads((out / "detections.json").read_text())


def test_an_int_size_in_an_older_preprocessor_config_is_a_square(tmp_path) -> None:
    """google/owlvit-* folders say "size": 768 (transformers makes it a square): the input equals
    the processor's own."""
    from detection.data.preprocess import image_to_input
    from detection.models.hf.families import FAMILIES
    from detection.models.hf.folder import processor_spec

    saved = {"image_processor_type": "OwlViTImageProcessor", "size": 48, "crop_size": 48, "do_center_crop": True}
    spec = processor_spec(saved, FAMILIES["owlvit"], tmp_path / "preprocessor_config.json")
    assert (spec.resize, spec.fixed_size, spec.interpolation) == ("fixed", (48, 48), "bicubic")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    image = np.random.default_rng(0).integers(0, 256, (61, 83, 3), dtype=np.uint8)
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(image_to_input(image, spec), expected, atol=1e-5)
