"""OWLv2 with a text prompt (issue 24): on NON-square images (the processor pads each to a square)
predict equals HF's own Owlv2Processor + model + post_process_grounded_object_detection in original
pixels, query_index is the patch HF kept, a padded batch gives each image what it gets alone, the
captured attention is the one the model used, a renamed HF internal fails loudly, and a CLI predict
-> report / viewer / export round trip. Small random OWLv2 and a CLIP tokenizer written by the test."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import hf_dense_models  # noqa: E402
import hf_prompted_models  # noqa: E402
from test_hf_equivalence import write_images  # noqa: E402
from test_prompted_owl import gap_threshold, predict  # noqa: E402

from detection.cli import main  # noqa: E402
from detection.data.preprocess import image_to_input, pad_batch  # noqa: E402
from detection.models.hf.owlv2 import square_inputs  # noqa: E402
from detection.models.registry import load_model  # noqa: E402

transformers.logging.set_verbosity_error()
PROMPT = "cat. remote control. bicycle."
PHRASES = ["cat", "remote control", "bicycle"]
SIZE, PATCH = hf_prompted_models.IMAGE_SIZE, hf_prompted_models.PATCH
# wide and tall, larger than the square (blurred) and smaller (no blur: the processor upsamples)
IMAGE_SIZES = [(70, 90), (100, 61), (40, 52)]


def owlv2_folder(folder: Path, seed: int = 2, max_length: int = 16) -> Path:
    """A Hub-style OWLv2 folder: lively random weights, Owlv2Processor (SIZE x SIZE squares) and the
    tokenizer files (as hf_prompted_models.owlvit_folder)."""
    hf_prompted_models.write_clip_tokenizer(folder, max_length)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    owlvit = hf_prompted_models.owlvit_config(len(tokenizer), max_length)
    config = transformers.Owlv2Config(text_config=owlvit.text_config.to_dict(),
                                      vision_config=owlvit.vision_config.to_dict(), projection_dim=32)
    torch.manual_seed(0)
    model = transformers.Owlv2ForObjectDetection(config).eval()
    hf_dense_models.liven(model, seed=seed)
    with torch.no_grad():  # boxes of a few patches' size; scores spread in (0, 1)
        model.box_head.dense2.weight.mul_(0.02)
        model.box_head.dense2.bias.zero_()
        for head, bias in ((model.class_head.logit_shift, 0.0), (model.class_head.logit_scale, 2.0)):
            head.weight.mul_(0.05)
            head.bias.fill_(bias)
    model.save_pretrained(folder)
    image_processor = transformers.Owlv2ImageProcessor(size={"height": SIZE, "width": SIZE})
    transformers.Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def owlv2(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("owlv2")
    return owlv2_folder(root / "model"), write_images(root / "images", sizes=IMAGE_SIZES)


@pytest.fixture(scope="module")
def hf_model(owlv2):
    return transformers.Owlv2ForObjectDetection.from_pretrained(owlv2[0], attn_implementation="eager").eval()


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def hf_pipeline(folder: Path, model, image_path: Path, threshold: float) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """HF's own path: Owlv2Processor (text + image), the model (eager), the processor's
    post_process_grounded_object_detection (boxes in original pixels); also HF's per-patch scores
    and its pixel values."""
    processor = transformers.Owlv2Processor.from_pretrained(folder)
    image = rgb(image_path)
    inputs = processor(text=[PHRASES], images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    result = processor.post_process_grounded_object_detection(
        outputs, threshold=threshold, target_sizes=[image.shape[:2]], text_labels=[PHRASES])[0]
    result["objectness_logits"] = outputs.objectness_logits[0]
    return result, outputs.logits[0].max(-1).values.sigmoid(), inputs["pixel_values"][0]


def test_the_square_inputs_equal_the_processor_s(owlv2, hf_model) -> None:
    """Each image at its own size (our spec), padded to a square, blurred and resized inside the
    model, equals Owlv2Processor's pixel values -- in a padded batch of different sizes too."""
    folder, images = owlv2
    model = load_model(folder, prompt=PHRASES)
    assert model.preprocess_spec.resize == "none" and model.supports_padding
    inputs = [image_to_input(rgb(path), model.preprocess_spec) for path in images]
    batch, mask = pad_batch(inputs)
    from detection.models.hf.detector import image_sizes_from_mask

    squares = square_inputs(batch, image_sizes_from_mask(mask), SIZE, model._pad_value())
    for index, path in enumerate(images):
        expected = hf_pipeline(folder, hf_model, path, 0.5)[2]
        assert torch.allclose(squares[index], expected, atol=1e-5), path.name


def test_predict_matches_the_hf_pipeline_in_original_pixels(owlv2, hf_model, tmp_path) -> None:
    folder, images = owlv2
    threshold = gap_threshold(hf_pipeline(folder, hf_model, images[0], 0.0)[1])
    out = tmp_path / "run"
    assert predict(folder, images[0].parent, out, "--prompt", PROMPT, "--score-threshold", str(threshold)) == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    compared = 0
    for image_path in images:
        expected, patch_scores, _ = hf_pipeline(folder, hf_model, image_path, threshold)
        ours = next(line for line in lines if line["file"].endswith(image_path.name))["detections"]
        kept = torch.nonzero(patch_scores > threshold).flatten()  # the patches HF's post-processing kept
        assert len(ours) == len(expected["scores"]) == len(kept)
        order = torch.argsort(expected["scores"], descending=True, stable=True)
        for rank, k in enumerate(order.tolist()):
            mine = ours[rank]
            x0, y0, x1, y1 = expected["boxes"][k].tolist()
            assert abs(mine["score"] - float(expected["scores"][k])) <= 1e-4
            assert mine["category_id"] == int(expected["labels"][k])
            assert mine["class_name"] == expected["text_labels"][k] == PHRASES[mine["category_id"]]
            assert mine["query_index"] == int(kept[k])
            assert np.abs(np.array(mine["bbox"]) - np.array([x0, y0, x1 - x0, y1 - y0])).max() <= 0.05
            # HF's objectness of the patch, kept (relative bound: see the padded-batch test)
            hf_objectness = float(expected["objectness_logits"][kept[k]])
            assert abs(mine["objectness_logit"] - hf_objectness) <= 1e-3 + 2e-5 * abs(hf_objectness)
            compared += 1
    assert compared >= 3
    config = json.loads((out / "run.json").read_text())["fingerprint"]["model_config"]
    assert config["model_type"] == "owlv2" and config["prompt"] == PHRASES and "patch token" in config["query_meaning"]


def test_a_padded_batch_gives_each_image_what_it_gets_alone(owlv2, hf_model) -> None:
    """The model crops each image out of the batch before its square: logits, boxes (relative to each
    image) and objectness equal the image alone; objectness equals HF's."""
    folder, images = owlv2
    model = load_model(folder, prompt=PHRASES)
    inputs = [image_to_input(rgb(path), model.preprocess_spec) for path in images]
    batch, mask = pad_batch(inputs)
    with torch.no_grad():
        together = model(batch, mask)
        for index, (single, path) in enumerate(zip(inputs, images)):
            alone = model(single[None])
            for key in ("pred_logits", "pred_boxes", "objectness_logits"):
                assert torch.allclose(together[key][index], alone[key][0], atol=1e-5), (key, index)
            pixels = hf_pipeline(folder, hf_model, path, 0.5)[2]
            hf = hf_model(pixel_values=pixels[None], **model.text_inputs(1))
            # this random objectness head turns 1e-6 of input rounding (normalised before the square,
            # the processor after) into about 1e-4 on logits of size 100: a relative bound
            assert torch.allclose(alone["objectness_logits"][0], hf.objectness_logits[0], rtol=2e-5, atol=1e-3)


def test_captured_attention_rebuilds_the_last_vision_layer(owlv2) -> None:
    """On a padded batch of non-square images: the record's rows are the weights the last vision layer
    multiplied its values with (its output rebuilt within 1e-5); image_sizes is each image's extent
    inside the square, the patches wholly outside it are marked as padding."""
    folder, images = owlv2
    model = load_model(folder, prompt=PHRASES)
    attention = model.last_vision_attention()
    seen = {}
    hook = attention.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(x=kwargs.get("hidden_states", args[0] if args else None), out=out[0]),
        with_kwargs=True)
    batch, mask = pad_batch([image_to_input(rgb(path), model.preprocess_spec) for path in images])
    with torch.no_grad():
        outputs = model(batch, mask, cross_attention=True, keep_graph=True)
    hook.remove()
    record = outputs["attention"]
    weights = outputs["attention_graph"].tokens[-1]
    assert torch.equal(record.decoder_cross[0].flatten(-2), weights[:, :, 1:, 1:])
    hidden = seen["x"]
    count, tokens, width = hidden.shape
    values = attention.v_proj(hidden).view(count, tokens, attention.num_heads, -1).transpose(1, 2)
    rebuilt = attention.out_proj(torch.matmul(weights, values).transpose(1, 2).reshape(count, tokens, width))
    assert torch.allclose(rebuilt, seen["out"], atol=1e-5)
    assert tuple(record.input_size) == (SIZE, SIZE) and record.feature_stride == PATCH
    for index, (height, width) in enumerate(IMAGE_SIZES):
        side = max(height, width)
        inside = (round(height * SIZE / side), round(width * SIZE / side))
        assert tuple(record.image_sizes[index].tolist()) == inside
        rows, cols = (int(np.ceil(v * SIZE / side / PATCH)) for v in (height, width))
        expected = torch.ones(SIZE // PATCH, SIZE // PATCH, dtype=torch.bool)
        expected[:rows, :cols] = False
        assert torch.equal(record.feature_padding_mask[index], expected)


def test_a_renamed_hf_internal_fails_loudly(owlv2, monkeypatch) -> None:
    folder, _ = owlv2
    model = load_model(folder, prompt=PHRASES)
    monkeypatch.setattr(model.hf_model.owlv2.vision_model, "encoder", None, raising=False)
    with pytest.raises(RuntimeError, match="vision_model.encoder.layers.*renamed"):
        model(torch.zeros(1, 3, 50, 70), cross_attention=True)


def test_cli_predict_report_viewer_export_round_trip(owlv2, tmp_path) -> None:
    """predict --save-attention with raw and attn-grad maps and a phrase absent from the image: token
    scores saved equal the direct computation (gradient x input; other phrases' tokens 0); the maps
    cover each image's extent only; report, the viewer and export read the run."""
    from detection.attention.token_scores import text_token_scores
    from detection.runfolder.maps_npz import load_maps_npz
    from detection.runfolder.tokens_npz import load_tokens_npz

    folder, images = owlv2
    out = tmp_path / "run"
    assert predict(folder, images[0].parent, out, "--prompt", PROMPT + " zebra.", "--score-threshold", "0.3",
                   "--save-attention", "--overlays", "--explain", "raw,attn-grad,drise", "--drise-masks", "16") == 0
    model = load_model(folder, prompt=PHRASES + ["zebra"])
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sum(len(r["detections"]) for r in records) >= 2
    for record in records:
        scores, _ = load_tokens_npz(out / record["tokens"])
        queries = torch.tensor([d["query_index"] for d in record["detections"]], dtype=torch.int64)
        labels = torch.tensor([d["category_id"] for d in record["detections"]], dtype=torch.int64)
        expected = text_token_scores(model, image_to_input(rgb(Path(record["file"])), model.preprocess_spec)[None],
                                     queries, labels)
        assert np.allclose(scores.scores, expected.scores, atol=1e-6)
        assert np.allclose(scores.phrase_scores, expected.phrase_scores, atol=1e-5)
        assert set(record["methods"]) == {"attn-grad", "drise"}  # raw's maps are the record's
        for method, path in record["methods"].items():  # at the ORIGINAL image's size, each detection's
            maps, meta = load_maps_npz(out / path)
            assert maps.shape == (len(queries), record["height"], record["width"]) and meta["query_index"] == queries.tolist()
        for k, label in enumerate(labels.tolist()):  # the logits of the square's patch: HF's score
            assert abs(1 / (1 + np.exp(-scores.phrase_scores[k, label])) - record["detections"][k]["score"]) <= 1e-4
            other = scores.token_phrase != label
            assert np.all(scores.scores[k, other] == 0) and np.any(scores.scores[k, ~other] != 0)
    assert main(["report", str(out)]) == 0 and main(["report", str(out), "--viewer"]) == 0
    assert "remote control" in (out / "report" / "viewer.html").read_text(encoding="utf-8")
    assert main(["export", str(out), "--format", "coco-masks", "--out", str(tmp_path / "masks.json")]) == 0
    exported = json.loads((tmp_path / "masks.json").read_text())
    assert len(exported) == sum(len(r["detections"]) for r in records)
    assert {r["category_id"] for r in exported} <= {0, 1, 2, 3}


def test_maps_are_the_patch_row_over_the_square_cropped_to_the_image(owlv2) -> None:
    """raw: the head mean of the detection's patch row over the patches; attn-grad: the head mean of
    (dlogit/dA * A)+ on it; both on the square's valid patches only, drawn over the image's extent
    inside the square (image_sizes), not the whole square."""
    import detection
    from detection import api
    from detection.attention.maps import maps_from_cells

    folder, images = owlv2
    api.clear_model_cache()
    model = load_model(folder, prompt=PHRASES)
    path = images[1]  # tall: the square's right part is padding
    height, width = IMAGE_SIZES[1]
    pixels = image_to_input(rgb(path), model.preprocess_spec)[None]
    with torch.enable_grad():
        outputs = model(pixels, cross_attention=True, keep_graph=True)
    weights = outputs["attention_graph"].tokens[-1]
    grid = SIZE // PATCH
    cols = int(np.ceil(width * SIZE / height / PATCH))
    inside = (SIZE, round(width * SIZE / height))
    assert cols < grid
    for method in ("raw", "attn-grad"):
        explained = detection.explain(str(path), model=str(folder), prompt=PROMPT, method=method,
                                      score_threshold=0.3, device="cpu")
        found = explained.detections
        assert len(found) > 0
        assert explained.maps.shape == (len(found), height, width)
        cells = explained.method_maps  # made with the maps
        assert tuple(cells.input_size) == inside and cells.values.shape[-2:] == (grid, cols)
        for k, (query, label) in enumerate(zip(found.query_index.tolist(), found.labels.tolist())):
            if method == "raw":
                expected = weights.detach()[0, :, 1 + query, 1:].mean(0)
            else:
                (gradient,) = torch.autograd.grad(outputs["pred_logits"][0, query, label], weights, retain_graph=True)
                expected = (gradient * weights.detach())[0, :, 1 + query, 1:].clamp(min=0).mean(0)
            expected = expected.reshape(grid, grid)[:, :cols]
            assert torch.allclose(torch.as_tensor(cells.values[k]), expected, atol=1e-6), (method, k)
            drawn = maps_from_cells(expected[None].numpy(), PATCH, inside, (height, width), explained.normalize)
            assert np.allclose(explained.maps[k], drawn[0], atol=1e-5), (method, k)


@pytest.mark.parametrize("options, message", [
    (["--prompt", " . "], "has no phrase"),
    (["--prompt", "cat " * 20], "OWLv2's text encoder takes at most 16 tokens per phrase"),
])
def test_bad_prompts_are_usage_errors(owlv2, tmp_path, capsys, options, message) -> None:
    folder, images = owlv2
    assert predict(folder, images[0], tmp_path / "run", *options) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "predictions.jsonl").exists()


def test_processors_that_do_not_pad_to_the_model_s_square_are_refused(owlv2, tmp_path) -> None:
    """do_pad false (a stretched image) is not OWLv2's geometry: the folder is refused naming the field;
    a square other than the vision model's image size is refused naming both."""
    from detection.models.hf.families import FAMILIES
    from detection.models.hf.folder import HFFolderError, processor_spec
    from detection.models.hf.owlv2 import build_owlv2_detector

    saved = {"image_processor_type": "Owlv2ImageProcessor", "do_pad": False, "size": {"height": SIZE, "width": SIZE}}
    with pytest.raises(HFFolderError, match="preprocessor_config.json: field 'do_pad'"):
        processor_spec(saved, FAMILIES["owlv2"], tmp_path / "preprocessor_config.json")
    saved.update(do_pad=True, size={"height": 2 * SIZE, "width": 2 * SIZE})
    spec = processor_spec(saved, FAMILIES["owlv2"], tmp_path / "preprocessor_config.json")
    model = load_model(owlv2[0], prompt=PHRASES)
    with pytest.raises(ValueError, match=f"resizes to \\({2 * SIZE}, {2 * SIZE}\\).*{SIZE}x{SIZE}"):
        build_owlv2_detector(model.hf_model, FAMILIES["owlv2"], spec, model.tokenizer, PHRASES, "x", "x")


def test_eval_takes_the_category_names_as_the_prompt(owlv2, tmp_path) -> None:
    """eval on a COCO-format set of non-square images, the category names as the prompt, with the
    attention metrics (maps cut to each image's extent in the square)."""
    folder, images = owlv2
    categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "remote control"}, {"id": 11, "name": "bicycle"}]
    gt = {"images": [{"id": i + 1, "file_name": p.name, "height": h, "width": w}
                     for i, (p, (h, w)) in enumerate(zip(images, IMAGE_SIZES))],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 11, "bbox": [5, 30, 40, 50], "area": 2000, "iscrowd": 0}],
          "categories": categories}
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--ann", str(ann), "--images", str(images[0].parent), "--out", str(out),
                 "--device", "cpu", "--precision", "fp32", "--workers", "0", "--score-threshold", "0.3", "--quiet"]) == 0
    predicted = json.loads((out / "detections.json").read_text())
    assert predicted and {d["category_id"] for d in predicted} <= {7, 3, 11}
    metrics = json.loads((out / "metrics.json").read_text())
    counted = {row["category_id"]: row["num_detections"] for row in metrics["per_category"]}
    assert counted == {c: sum(d["category_id"] == c for d in predicted) for c in (7, 3, 11)}
    assert metrics["attention"]["last/mean"]["num_detections"] > 0
