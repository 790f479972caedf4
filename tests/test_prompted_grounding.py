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
        assert len(ours) == len(expected["scores"]) == len(kept)  # an image may have none: then HF has none
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
            assert mine["hf_label"] == expected["text_labels"][k]  # HF's own label, kept in its own field
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


def _hf_attentions(folder: Path, model, images: torch.Tensor):
    """HF's own output_attentions of the same model and prompt (its decoder_attentions: self,
    text cross, image cross per layer)."""
    hf = type(model.hf_model).from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(pixel_values=images, input_ids=model.input_ids, token_type_ids=model.token_type_ids,
                  attention_mask=model.text_attention_mask, output_attentions=True)


def test_image_and_text_attention_are_hf_s_own_and_the_sampled_points_rebuild_the_core_output(grounding) -> None:
    from detection.attention.sampled import level_splats

    _, folder, _ = grounding
    model = load_model(folder, prompt=PHRASES)
    images = torch.rand(1, 3, 64, 82)
    core = model.hf_model.model.decoder.layers[-1].encoder_attn.attn
    seen = {}
    handle = core.register_forward_hook(lambda _m, args, output: seen.update(value=args[0], output=output))
    with torch.no_grad():
        outputs = model(images, cross_attention=True)
    handle.remove()
    reference = _hf_attentions(folder, model, images)
    _, text_cross, image_cross = reference.decoder_attentions
    assert torch.allclose(outputs["text_attention"], torch.stack(text_cross).float(), atol=1e-6)
    sampled = outputs["attention"].decoder_cross_sampled
    assert torch.allclose(sampled.weights[-1].transpose(1, 2), image_cross[-1], atol=1e-6)  # (B, heads, Q, ...) stored
    value, output = seen["value"].double(), seen["output"].double()
    _, _, heads, head_dim = value.shape
    values = value.split([h * w for h, w in sampled.level_sizes], dim=1)
    splats = level_splats(sampled, 0, torch.arange(sampled.num_queries))
    rebuilt = sum(torch.einsum("hqc,chd->qhd", splat[-1].flatten(-2), level_value[0])
                  for splat, level_value in zip(splats, values))
    assert (rebuilt - output[0].reshape(sampled.num_queries, heads, head_dim)).abs().max() <= 1e-5


def test_token_scores_are_the_query_s_text_attention_raw_and_gradient_weighted(grounding) -> None:
    """raw: head mean of HF's last-layer text cross-attention row of the query at the phrase tokens;
    scores: head mean of (dlogit/dA * A)+ with logit = the phrase's maximum token logit; batched
    equals one detection at a time."""
    from detection.attention.token_scores import text_token_scores

    _, folder, _ = grounding
    model = load_model(folder, prompt=PHRASES)
    images = torch.rand(1, 3, 64, 82)
    queries, labels = torch.tensor([0, 4, 4, 9]), torch.tensor([1, 0, 2, 1])
    together = text_token_scores(model, images, queries, labels)
    positions = [p for pieces in model.prompt_layout() for p, _ in pieces]
    assert together.tokens == ("cat", "remote", "control", "bicycle") and together.token_phrase.tolist() == [0, 1, 1, 2]
    _, text_cross, _ = _hf_attentions(folder, model, images).decoder_attentions
    expected_raw = text_cross[-1][0].mean(0)[queries][:, positions]
    assert np.allclose(together.raw_scores, expected_raw.numpy(), atol=1e-6)
    with torch.enable_grad():
        outputs = model(images.requires_grad_(True), cross_attention=True, keep_graph=True)
    weights = outputs["text_attention_graph"][-1]
    for n, (query, label) in enumerate(zip(queries.tolist(), labels.tolist())):
        token_logits = outputs["token_logits"][0, query]
        phrase_logit = token_logits[[p for p, _ in model.prompt_layout()[label]]].max()
        (gradient,) = torch.autograd.grad(phrase_logit, weights, retain_graph=True)
        expected = (gradient * weights.detach())[0, :, query, positions].clamp(min=0).mean(0)
        assert np.allclose(together.scores[n], expected.numpy(), atol=1e-7)
        alone = text_token_scores(model, images, queries[n:n + 1], labels[n:n + 1])
        assert np.allclose(alone.scores[0], together.scores[n], atol=1e-7)
        assert np.allclose(alone.raw_scores[0], together.raw_scores[n], atol=1e-7)
    assert together.scores.any()
    empty = text_token_scores(model, images, torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    assert empty.scores.shape == (0, 4) and empty.phrase_scores.shape == (0, 3)
    assert np.allclose(together.phrase_scores, outputs["pred_logits"].detach()[0, queries].numpy(), atol=1e-6)


def test_token_scores_from_the_kept_inputs_equal_the_whole_model_run_again(grounding) -> None:
    """The inference pass keeps the last decoder layer's inputs: the token scores replay that layer
    and the class head only (no backbone, no encoder), one backward for the detections of distinct
    queries, and equal the scores of the whole model run again within 1e-5."""
    from detection.attention.token_scores import text_token_scores
    from detection.engine.fast import InferenceModel

    _, folder, _ = grounding
    model = load_model(folder, prompt=PHRASES)
    images = torch.rand(1, 3, 64, 82, generator=torch.Generator().manual_seed(3))
    engine = InferenceModel(model, "cpu", "fp32")
    outputs = engine(images, torch.zeros((1, 64, 82), dtype=torch.bool), cross_attention=True, keep_features=True)
    kept = outputs["attention"].select_image(0).kept_inputs.to("cpu", copy=True)
    queries, labels = torch.tensor([0, 4, 4, 9, 11]), torch.tensor([1, 0, 2, 1, 1])  # query 4 twice
    encoder_calls = []
    engine.model.hf_model.model.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    new = text_token_scores(engine.model, None, queries, labels, kept=kept)
    assert encoder_calls == []
    old = text_token_scores(model, images, queries, labels)
    for name in ("scores", "raw_scores", "phrase_scores"):
        reference = getattr(old, name)
        assert np.abs(getattr(new, name) - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max()), name
    assert new.scores.any()
    for n in range(len(queries)):  # batched (two backward passes here: query 4 twice) equals one at a time
        alone = text_token_scores(engine.model, None, queries[n:n + 1], labels[n:n + 1], kept=kept)
        assert np.abs(alone.scores[0] - new.scores[n]).max() <= 1e-7 * max(1.0, np.abs(new.scores).max())
        assert np.array_equal(alone.raw_scores[0], new.raw_scores[n])
    # a replay that does not give the inference pass's logits (a changed HF internal) fails loudly
    kept.per_image["layer.hidden_states"].add_(1.0)
    with pytest.raises(RuntimeError, match="replay does not give the inference pass's logits"):
        text_token_scores(engine.model, None, queries, labels, kept=kept)


def test_predict_saves_maps_and_token_scores_and_explain_returns_them(grounding, tmp_path) -> None:
    from detection import api
    from detection.attention.methods import applicable_methods
    from detection.runfolder.tokens_npz import load_tokens_npz
    import detection

    family, folder, images = grounding
    model = load_model(folder, prompt=PHRASES)
    assert applicable_methods(model) == ["raw", "attn-grad", "drise", "in-box"]
    out = tmp_path / "run"
    assert main(["predict", str(images[0].parent), "--model", str(folder), "--prompt", PROMPT, "--out", str(out),
                 "--score-threshold", "0.0", "--device", "cpu", "--workers", "0", "--quiet", "--save-attention",
                 "--explain", "raw,attn-grad", "--overlays"]) == 0
    record = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert record["detections"] and (out / record["attention"]).is_file() and (out / record["methods"]["attn-grad"]).is_file()
    saved, meta = load_tokens_npz(out / record["tokens"])
    assert saved.raw_scores is not None and len(saved) == len(record["detections"])
    assert "cross-attention" in meta["token_method"]
    assert main(["report", str(out)]) == 0  # the token view: every detection's prompt, each token shaded
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert page.count('class="tok"') == sum(4 * len(json.loads(line)["detections"])
                                            for line in (out / "predictions.jsonl").read_text().splitlines())
    assert "gradient-weighted text cross-attention" in page
    assert main(["report", str(out), "--viewer"]) == 0 and (out / "report" / "viewer.html").is_file()
    assert main(["export", str(out), "--format", "coco-masks", "--method", "attn-grad", "--out",
                 str(tmp_path / "masks.json")]) == 0
    exported = json.loads((tmp_path / "masks.json").read_text())
    assert len(exported) == sum(len(json.loads(line)["detections"])
                                for line in (out / "predictions.jsonl").read_text().splitlines())
    api.clear_model_cache()
    explained = detection.explain(str(images[0]), model=str(folder), prompt=PROMPT, score_threshold=0.0, device="cpu")
    assert np.allclose(explained.token_scores.scores, saved.scores, atol=1e-6)
    assert np.allclose(explained.token_scores.raw_scores, saved.raw_scores, atol=1e-6)


def test_padded_batches_match_the_hf_batched_pipeline(grounding) -> None:
    """Two sizes in one padded batch run as HF's processor batches them (zero padding + pixel_mask)."""
    from detection.engine.predictor import Predictor, PredictorSettings

    family, folder, images = grounding
    model = load_model(folder, prompt=PHRASES)
    assert model.supports_padding
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    ours, _ = Predictor(model, PredictorSettings(score_threshold=0.0, batching="padded", batch_size=2,
                                                 device="cpu", precision="fp32")).predict_arrays(arrays)
    processor = transformers.GroundingDinoProcessor.from_pretrained(folder)
    inputs = processor(images=arrays, text=[PROMPT, PROMPT], return_tensors="pt")
    assert inputs["pixel_mask"].float().mean() < 1  # really padded
    with torch.no_grad():
        outputs = type(model.hf_model).from_pretrained(folder, attn_implementation="eager").eval()(**inputs)
    expected = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.25, target_sizes=[a.shape[:2] for a in arrays])
    for mine, theirs in zip(ours, expected):
        order = torch.argsort(theirs["scores"], descending=True, stable=True)
        assert torch.allclose(mine.scores, theirs["scores"][order], atol=1e-4)
        assert (mine.boxes - theirs["boxes"][order]).abs().max() <= 0.05
        assert mine.hf_label == [theirs["text_labels"][k] for k in order.tolist()]


def test_eval_splits_category_names_that_exceed_the_text_encoder_into_prompts_and_merges(grounding, tmp_path) -> None:
    """The zero-shot protocol: names beyond the limit (32 tokens here) run as several prompts that fit;
    the merged detections are each prompt's own (mapped to its categories by name), nothing else.
    Outside eval the same prompt is refused naming the limit."""
    from detection.engine.predictor import Predictor, PredictorSettings

    family, folder, images = grounding
    names = ["cat", "zebra", "remote control", "giraffe", "bicycle", "horse", "sheep", "red car", "elephant"]
    categories = [{"id": 100 + i, "name": name} for i, name in enumerate(names)]
    gt = {"images": [{"id": i + 1, "file_name": p.name, "height": h, "width": w}
                     for i, (p, (h, w)) in enumerate(zip(images, [(70, 90), (100, 61)]))],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 100, "bbox": [10, 10, 30, 20], "area": 600,
                           "iscrowd": 0}],
          "categories": categories}
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    model = load_model(folder, prompt=names[:1])
    chunks = model.prompt_chunks(names)
    assert len(chunks) > 1 and [n for chunk in chunks for n in chunk] == names
    assert all(model._fits(chunk) for chunk in chunks)
    out = tmp_path / "eval"
    common = ["--ann", str(ann), "--images", str(images[0].parent), "--device", "cpu", "--precision", "fp32",
              "--workers", "0", "--score-threshold", "0.0", "--quiet"]
    assert main(["eval", "--model", str(folder), "--out", str(out), "--no-attention", *common]) == 0
    merged = json.loads((out / "detections.json").read_text())
    expected = []
    for chunk in chunks:
        chunk_model = model.with_prompt(chunk)
        predictor = Predictor(chunk_model, PredictorSettings(score_threshold=0.0, device="cpu", precision="fp32"))
        for image_id, path in enumerate(images, start=1):
            found, _ = predictor.predict_arrays([np.asarray(Image.open(path).convert("RGB"))])
            expected += [(image_id, 100 + names.index(chunk[int(label)]), round(float(score), 4))
                         for label, score in zip(found[0].labels, found[0].scores)]
    assert sorted((r["image_id"], r["category_id"], round(r["score"], 4)) for r in merged) == sorted(expected)
    assert len({r["category_id"] for r in merged}) > 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["prompt_chunks"] == [list(chunk) for chunk in chunks]
    # with attention metrics asked for, several prompts are refused (not merged yet)
    assert main(["eval", "--model", str(folder), "--out", str(tmp_path / "eval2"), *common]) == 2


def test_a_swin_backbone_s_level_strides(tmp_path) -> None:
    """The published Grounding DINO models use a Swin backbone: its levels' strides come from its
    config (patch size 4, x2 per stage), and the record's geometry is checked against the input."""
    swin = transformers.SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   out_features=["stage2", "stage3", "stage4"])
    hf_prompted_models.write_bert_tokenizer(tmp_path)
    tokenizer = transformers.BertTokenizer.from_pretrained(tmp_path)
    config = hf_prompted_models.grounding_dino_config(len(tokenizer))
    config.backbone_config = swin
    torch.manual_seed(0)
    model = transformers.GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(tmp_path)
    transformers.GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(tmp_path)
    detector = load_model(tmp_path, prompt=PHRASES)
    with torch.no_grad():
        record = detector(torch.rand(1, 3, 64, 96), cross_attention=True)["attention"]
    sampled = record.decoder_cross_sampled
    assert sampled.level_strides == (8, 16, 32, 64)
    assert sampled.level_sizes[:3] == ((8, 12), (4, 6), (2, 3))
