"""OmDet-Turbo with a text prompt (issue 24): predict equals HF's own OmDetTurboProcessor + model +
post_process_grounded_object_detection (top-k, class-wise NMS, clipped boxes), query_index is the
decoder query HF kept, the captured sampled points rebuild the sampling core's output, and the
per-phrase scores equal finite differences in float64. A small random config with a CLIP
tokenizer written by the test (no download)."""
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
from hf_sampled_models import _resnet  # noqa: E402
from test_hf_equivalence import write_images  # noqa: E402

from detection.attention.token_scores import text_token_scores  # noqa: E402
from detection.cli import main  # noqa: E402
from detection.data.preprocess import image_to_input  # noqa: E402
from detection.models.registry import load_model  # noqa: E402

transformers.logging.set_verbosity_error()
PROMPT = "cat. remote control. bicycle."
PHRASES = ("cat", "remote control", "bicycle")
SIZE = 64


def omdet_folder(folder: Path, seed: int = 1) -> Path:
    """A Hub-style OmDet-Turbo folder: a ResNet backbone, a 1-layer CLIP text model, 12 queries, lively
    random weights, a DetrImageProcessor (fixed 64 x 64) and a CLIP tokenizer (77 tokens)."""
    hf_prompted_models.write_clip_tokenizer(folder, 77)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    vocab = len(tokenizer)
    # the text width is the class embedding's; the decoder's differs (HF builds task_project only then)
    text = transformers.CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
                                       hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=77, projection_dim=48)
    config = transformers.OmDetTurboConfig(
        backbone_config=_resnet(), use_timm_backbone=False, text_config=text, apply_layernorm_after_vision_backbone=False,
        image_size=SIZE, text_projection_in_dim=48, text_projection_out_dim=48, task_encoder_hidden_dim=32,
        class_embed_dim=48, num_queries=12, encoder_hidden_dim=32, vision_features_channels=[32, 32, 32],
        encoder_in_channels=[16, 16, 16], encoder_projection_indices=[2], encoder_attention_heads=2,
        encoder_dim_feedforward=32, decoder_hidden_dim=32, decoder_num_heads=2, decoder_num_layers=2,
        decoder_dim_feedforward=32, decoder_num_points=2)
    torch.manual_seed(0)
    model = transformers.OmDetTurboForObjectDetection(config).eval()
    hf_dense_models.liven(model, seed=seed)
    with torch.no_grad():  # wide boxes around the reference points: they overlap, so the class-wise NMS acts
        for head in model.decoder.decoder_bbox_head:
            head.layers[-1].weight.mul_(0.1)
            head.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 1.5, 1.5]))
    model.save_pretrained(folder)
    image_processor = transformers.DetrImageProcessor(size={"height": SIZE, "width": SIZE})
    transformers.OmDetTurboProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def omdet(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("omdet")
    return omdet_folder(root / "model"), write_images(root / "images", sizes=[(70, 90), (100, 61)])


def hf_pipeline(folder: Path, image_path: Path, threshold: float):
    """HF's own path -> (post-processed result, its class logits (Q, C))."""
    model = transformers.OmDetTurboForObjectDetection.from_pretrained(folder).eval()
    processor = transformers.OmDetTurboProcessor.from_pretrained(folder)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    inputs = processor(images=image, text=list(PHRASES), return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    result = processor.post_process_grounded_object_detection(
        outputs, text_labels=list(PHRASES), threshold=threshold, target_sizes=[image.shape[:2]])[0]
    return result, outputs.decoder_class_logits[0]


def _input(model, image_path: Path) -> torch.Tensor:
    return image_to_input(np.asarray(Image.open(image_path).convert("RGB")), model.preprocess_spec)[None]


def test_predict_with_a_prompt_matches_the_hf_pipeline(omdet, tmp_path) -> None:
    folder, images = omdet
    threshold = 0.3  # HF's default
    out = tmp_path / "run"
    assert main(["predict", str(images[0].parent), "--model", str(folder), "--prompt", PROMPT, "--out", str(out),
                 "--score-threshold", str(threshold), "--device", "cpu", "--precision", "fp32", "--workers", "0",
                 "--quiet"]) == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    suppressed = compared = 0
    for image_path in images:
        expected, logits = hf_pipeline(folder, image_path, threshold)
        ours = next(line for line in lines if line["file"].endswith(image_path.name))["detections"]
        probabilities = logits.sigmoid()
        top = probabilities.flatten().topk(logits.shape[0]).values
        suppressed += int((top > threshold).sum()) - len(expected["scores"])  # what NMS removed
        assert len(ours) == len(expected["scores"])
        for mine, score, box, label in zip(ours, expected["scores"], expected["boxes"], expected["labels"]):
            x0, y0, x1, y1 = box.tolist()
            assert abs(mine["score"] - float(score)) <= 1e-4
            assert np.abs(np.array(mine["bbox"]) - np.array([x0, y0, x1 - x0, y1 - y0])).max() <= 0.05
            assert mine["category_id"] == int(label) and mine["class_name"] == PHRASES[int(label)]
            # the query HF kept: the one whose logit for this phrase gave the score
            query = int(torch.argmin((probabilities[:, int(label)] - score).abs()))
            assert mine["query_index"] == query
            compared += 1
    assert compared >= 4 and suppressed >= 1  # the class-wise NMS was exercised
    config = json.loads((out / "run.json").read_text())["fingerprint"]["model_config"]
    assert config["prompt"] == list(PHRASES) and "decoder query" in config["query_meaning"]
    assert config["task"] == "Detect cat, remote control, bicycle."


def test_the_sampled_points_are_hf_s_own_and_rebuild_the_core_output(omdet) -> None:
    from detection.attention.sampled import level_splats

    folder, _ = omdet
    model = load_model(folder, prompt=PHRASES)
    images = torch.rand(1, 3, SIZE, SIZE)
    cores = [layer.cross_attn.attn for layer in model.hf_model.decoder.layers]
    seen: list[dict] = []
    handles = [core.register_forward_hook(lambda _m, args, output: seen.append(dict(value=args[0], output=output)))
               for core in cores]
    with torch.no_grad():
        outputs = model(images, cross_attention=True)
        reference = model.hf_model(pixel_values=images, classes_input_ids=model.classes_input_ids,
                                   classes_attention_mask=model.classes_attention_mask,
                                   tasks_input_ids=model.tasks_input_ids, tasks_attention_mask=model.tasks_attention_mask,
                                   classes_structure=torch.tensor([len(PHRASES)]), output_attentions=True)
    for handle in handles:
        handle.remove()
    sampled = outputs["attention"].decoder_cross_sampled
    assert sampled.level_strides == (8, 16, 32) and sampled.level_sizes == ((8, 8), (4, 4), (2, 2))
    _, image_cross = reference.decoder_attentions
    for layer, weights in enumerate(image_cross):  # HF's (B, Q, heads, levels, points); stored (B, heads, Q, ...)
        assert torch.allclose(sampled.weights[layer].transpose(1, 2), weights, atol=1e-6)
    splats = level_splats(sampled, 0, torch.arange(sampled.num_queries))
    for layer, call in enumerate(seen[:len(cores)]):
        value, output = call["value"].double(), call["output"].double()
        _, _, heads, head_dim = value.shape
        values = value.split([h * w for h, w in sampled.level_sizes], dim=1)
        rebuilt = sum(torch.einsum("hqc,chd->qhd", splat[layer].flatten(-2), level_value[0])
                      for splat, level_value in zip(splats, values))
        assert (rebuilt - output[0].reshape(sampled.num_queries, heads, head_dim)).abs().max() <= 1e-5
    assert outputs["attention"].kind == "sampled"


def test_a_renamed_hf_internal_fails_loudly(omdet, monkeypatch) -> None:
    folder, _ = omdet
    model = load_model(folder, prompt=PHRASES)
    images = torch.rand(1, 3, SIZE, SIZE)
    for layer in model.hf_model.decoder.layers:  # the sampling core called, but no longer an nn.Module
        core = layer.cross_attn.attn
        monkeypatch.delitem(layer.cross_attn._modules, "attn")
        monkeypatch.setattr(layer.cross_attn, "attn", core.forward, raising=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no decoder deformable attention.*internals"):
        model(images, cross_attention=True)
    monkeypatch.undo()
    monkeypatch.delitem(model.hf_model._modules, "decoder")
    with torch.no_grad(), pytest.raises(RuntimeError, match="no 'decoder.layers'.*internals"):
        model(images, cross_attention=True)
    monkeypatch.undo()
    monkeypatch.delattr(model.hf_model, "language_cache_prompt")
    with pytest.raises(RuntimeError, match="language_cache_prompt.*renamed"):
        text_token_scores(model, images, torch.tensor([0]), torch.tensor([0]))


def test_phrase_scores_equal_finite_differences_in_float64_and_batched_equals_one_at_a_time(omdet) -> None:
    folder, images = omdet
    model = load_model(folder, prompt=PHRASES).double()
    inputs = _input(model, images[0]).double()
    queries, labels = torch.tensor([0, 4, 4, 9]), torch.tensor([1, 0, 2, 1])
    together = text_token_scores(model, inputs, queries, labels)
    assert together.tokens == PHRASES and together.token_phrase.tolist() == [0, 1, 2]
    assert "each phrase is one token" in together.token_method

    def logit(query: int, label: int, scale: float) -> float:
        def scaled(_m, _a, output):
            output = output.clone()
            output[label] *= scale
            return output

        handle = model.phrase_embedding.register_forward_hook(scaled)
        try:
            with torch.enable_grad():  # the phrases go through phrase_embedding (HF's cache bypassed)
                return float(model(inputs)["pred_logits"][0, query, label])
        finally:
            handle.remove()

    step = 1e-6
    for n, (query, label) in enumerate(zip(queries.tolist(), labels.tolist())):
        finite = (logit(query, label, 1 + step) - logit(query, label, 1 - step)) / (2 * step)
        assert together.scores[n, label] == pytest.approx(finite, rel=1e-5, abs=1e-9)
        # a detection's logit reads its own phrase's embedding only (the others select queries, a top-k)
        assert not np.delete(together.scores[n], label).any()
        alone = text_token_scores(model, inputs, queries[n:n + 1], labels[n:n + 1])
        assert np.allclose(alone.scores[0], together.scores[n], rtol=1e-6, atol=0)
    assert np.abs(together.scores[np.arange(4), labels.numpy()]).min() > 0
    with torch.no_grad():  # phrase scores: the logits as the model computed them (HF's cached path)
        logits = model(inputs)["pred_logits"][0, queries]
    assert np.allclose(together.phrase_scores, logits.numpy(), atol=1e-6)


def test_phrase_scores_from_the_kept_inputs_equal_the_whole_model_run_again(omdet) -> None:
    """The inference pass keeps the last decoder layer's query features and its class head's phrase
    projections: the phrase scores run the phrase path and the class similarity only (no vision
    backbone), one backward for every detection, and equal the whole model run again within 1e-5."""
    from detection.engine.fast import InferenceModel

    folder, images = omdet
    model = load_model(folder, prompt=PHRASES)
    inputs = _input(model, images[0])
    engine = InferenceModel(model, "cpu", "fp32")
    outputs = engine(inputs, torch.zeros((1, *inputs.shape[-2:]), dtype=torch.bool), cross_attention=True,
                     keep_features=True)
    kept = outputs["attention"].select_image(0).kept_inputs.to("cpu", copy=True)
    queries, labels = torch.tensor([0, 4, 4, 9]), torch.tensor([1, 0, 2, 1])
    vision_calls = []
    engine.model.hf_model.vision_backbone.register_forward_hook(lambda *_: vision_calls.append(1))
    new = text_token_scores(engine.model, None, queries, labels, kept=kept)
    assert vision_calls == []
    old = text_token_scores(model, inputs, queries, labels)
    for name in ("scores", "phrase_scores"):
        reference = getattr(old, name)
        assert np.abs(getattr(new, name) - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max()), name
    assert np.abs(new.scores[np.arange(4), labels.numpy()]).min() > 0
    for n in range(len(queries)):  # one backward for all equals one at a time
        alone = text_token_scores(engine.model, None, queries[n:n + 1], labels[n:n + 1], kept=kept)
        assert np.abs(alone.scores[0] - new.scores[n]).max() <= 1e-6 * max(1.0, np.abs(new.scores).max())
    kept.per_image["class_projected"].add_(1.0)  # not the projections the model computes: fails loudly
    with pytest.raises(RuntimeError, match="phrase projections recomputed"):
        text_token_scores(engine.model, None, queries, labels, kept=kept)
    # in float64 the two paths agree to rounding: the reuse (and the padding it skips) changes nothing
    model64 = load_model(folder, prompt=PHRASES).double()
    inputs64 = inputs.double()
    with torch.no_grad():
        kept64 = model64(inputs64, cross_attention=True, keep_features=True)["attention"].kept_inputs
    new64 = text_token_scores(model64, None, queries, labels, kept=kept64)
    old64 = text_token_scores(model64, inputs64, queries, labels)
    assert np.abs(new64.scores - old64.scores).max() <= 1e-9 * np.abs(old64.scores).max()


def test_predict_saves_maps_and_phrase_scores_report_export_and_explain(omdet, tmp_path, capsys) -> None:
    import detection
    from detection import api
    from detection.attention.methods import applicable_methods
    from detection.runfolder.tokens_npz import load_tokens_npz

    folder, images = omdet
    model = load_model(folder, prompt=PHRASES)
    assert applicable_methods(model) == ["raw", "attn-grad", "drise", "in-box"]
    out = tmp_path / "run"
    prompt = PROMPT + " dog."  # a phrase no detection has (checked below)
    common = ["--model", str(folder), "--prompt", prompt, "--device", "cpu", "--workers", "0", "--quiet"]
    assert main(["predict", str(images[0].parent), "--out", str(out), "--score-threshold", "0.2",
                 "--save-attention", "--explain", "raw,attn-grad", "--overlays", *common]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    record = records[0]
    assert record["detections"] and (out / record["methods"]["attn-grad"]).is_file()
    assert "dog" not in {d["class_name"] for r in records for d in r["detections"]}
    saved, meta = load_tokens_npz(out / record["tokens"])
    assert saved.tokens == (*PHRASES, "dog") and len(saved) == len(record["detections"])
    assert "each phrase is one token" in meta["token_method"]
    expected = text_token_scores(model.with_prompt([*PHRASES, "dog"]), _input(model, images[0]),
                                 torch.tensor([d["query_index"] for d in record["detections"]]),
                                 torch.tensor([d["category_id"] for d in record["detections"]]))
    # from the inference pass's kept inputs: equal to the whole model run again within float32's noise on
    # gradients (5e-5 of the largest; the float64 test above holds the two paths to 1e-9)
    assert np.abs(saved.scores - expected.scores).max() <= 5e-5 * np.abs(expected.scores).max()
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert page.count('class="tok"') == sum(4 * len(r["detections"]) for r in records)
    assert main(["report", str(out), "--viewer"]) == 0 and (out / "report" / "viewer.html").is_file()
    assert main(["export", str(out), "--format", "coco-masks", "--method", "attn-grad", "--out",
                 str(tmp_path / "masks.json")]) == 0
    assert len(json.loads((tmp_path / "masks.json").read_text())) == sum(len(r["detections"]) for r in records)
    # methods that do not apply are refused by name; a phrase beyond the limit names it
    assert main(["predict", str(images[0]), "--out", str(tmp_path / "r2"), "--explain", "rollout", *common]) == 2
    assert "rollout" in capsys.readouterr().err
    long_phrase = " ".join(["cat"] * 80)
    assert main(["predict", str(images[0]), "--out", str(tmp_path / "r3"), "--model", str(folder), "--prompt",
                 long_phrase, "--device", "cpu", "--quiet"]) == 2
    assert "at most 77 tokens per phrase" in capsys.readouterr().err
    api.clear_model_cache()
    explained = detection.explain(str(images[0]), model=str(folder), prompt=prompt, score_threshold=0.2, device="cpu")
    assert np.abs(explained.token_scores.scores - saved.scores).max() <= 5e-5 * np.abs(saved.scores).max()


def test_a_batch_matches_the_hf_batched_pipeline(omdet) -> None:
    """Two images in one batch (the processor's fixed size: no padding) give HF's batched results."""
    from detection.engine.predictor import Predictor, PredictorSettings

    folder, images = omdet
    model = load_model(folder, prompt=PHRASES)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    ours, _ = Predictor(model, PredictorSettings(score_threshold=0.1, batch_size=2, device="cpu",
                                                 precision="fp32")).predict_arrays(arrays)
    processor = transformers.OmDetTurboProcessor.from_pretrained(folder)
    inputs = processor(images=arrays, text=[list(PHRASES)] * 2, return_tensors="pt")
    with torch.no_grad():
        outputs = transformers.OmDetTurboForObjectDetection.from_pretrained(folder).eval()(**inputs)
    expected = processor.post_process_grounded_object_detection(
        outputs, text_labels=[list(PHRASES)] * 2, threshold=0.1, target_sizes=[a.shape[:2] for a in arrays])
    for mine, theirs in zip(ours, expected):
        assert len(mine) == len(theirs["scores"]) > 0
        assert torch.allclose(mine.scores, theirs["scores"], atol=1e-4)
        assert (mine.boxes - theirs["boxes"]).abs().max() <= 0.05
        assert mine.class_names == theirs["text_labels"]


def test_eval_with_the_category_names_as_the_prompt(omdet, tmp_path) -> None:
    """Without --prompt, eval's category names are the prompt (one prompt: each name is encoded apart),
    its detections matched back to the categories by name; with attention metrics too."""
    folder, images = omdet
    names = ["cat", "zebra", "remote control"]
    gt = {"images": [{"id": i + 1, "file_name": p.name, "height": h, "width": w}
                     for i, (p, (h, w)) in enumerate(zip(images, [(70, 90), (100, 61)]))],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 30, 20], "area": 600,
                           "iscrowd": 0}],
          "categories": [{"id": 7 + i, "name": name} for i, name in enumerate(names)]}
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--ann", str(ann), "--images", str(images[0].parent), "--out",
                 str(out), "--device", "cpu", "--precision", "fp32", "--workers", "0", "--score-threshold", "0.2",
                 "--quiet"]) == 0
    found = json.loads((out / "detections.json").read_text())
    model = load_model(folder, prompt=names)
    expected = []
    for image_id, path in enumerate(images, start=1):
        with torch.no_grad():
            outputs = model(_input(model, path))
        scores = outputs["pred_logits"][0].sigmoid()
        # every kept (query, phrase) pair is one of the model's, mapped to its category by name
        expected.append((image_id, scores))
    assert found and {r["category_id"] for r in found} <= {7, 8, 9}
    for r in found:
        scores = dict(expected)[r["image_id"]]
        assert (scores[:, r["category_id"] - 7] - r["score"]).abs().min() <= 1e-4
    assert (out / "metrics.json").is_file()


def test_a_hub_name_fetches_the_tokenizer_files(omdet, tmp_path, monkeypatch) -> None:
    """hf:ORG/NAME of a prompted family: the snapshot's file patterns include the processor and
    tokenizer files (a stand-in snapshot_download copies only the files the patterns allow)."""
    import fnmatch
    import shutil

    import huggingface_hub

    from detection.models.hf import hub

    folder, images = omdet
    snapshot = tmp_path / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)

    def hf_hub_download(repo, filename, **_):
        shutil.copy(folder / filename, snapshot / filename)
        return str(snapshot / filename)

    def snapshot_download(repo, allow_patterns, **_):
        for path in folder.iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, snapshot / path.name)
        return str(snapshot)

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = load_model("hf:tiny-org/omdet-turbo", prompt=PHRASES)
    assert model.config.source == f"hf:tiny-org/omdet-turbo@{snapshot.name}"
    with torch.no_grad():
        ours = model(_input(model, images[0]))["pred_logits"]
        theirs = load_model(folder, prompt=PHRASES)(_input(model, images[0]))["pred_logits"]
    assert torch.equal(ours, theirs)


def test_a_task_prompt_beyond_77_tokens_is_truncated_as_hf_s_processor_does(omdet) -> None:
    folder, images = omdet
    phrases = [f"{word} {letter}" for word in ("cat", "dog", "red car", "bicycle") for letter in "abcdefgh"]
    model = load_model(folder, prompt=phrases)
    assert len(model.tokenizer(model.config.task)["input_ids"]) > 77 and int(model.tasks_attention_mask.sum()) == 77
    processor = transformers.OmDetTurboProcessor.from_pretrained(folder)
    image = np.asarray(Image.open(images[0]).convert("RGB"))
    inputs = processor(images=image, text=phrases, return_tensors="pt")
    assert torch.equal(inputs["tasks_input_ids"], model.tasks_input_ids)
    assert torch.equal(inputs["classes_input_ids"], model.classes_input_ids)
    with torch.no_grad():
        theirs = transformers.OmDetTurboForObjectDetection.from_pretrained(folder).eval()(**inputs)
        ours = model(_input(model, images[0]))
    assert torch.allclose(ours["pred_logits"], theirs.decoder_class_logits, atol=1e-4)


def test_a_folder_without_tokenizer_files_is_refused_naming_them(omdet, tmp_path) -> None:
    """AutoTokenizer alone would build an empty-vocabulary tokenizer from such a folder."""
    import shutil

    from detection.models.hf.folder import HFFolderError

    folder, _ = omdet
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        shutil.copy(folder / name, bare / name)
    with pytest.raises(HFFolderError, match="no tokenizer files.*vocab.json \\+ merges.txt"):
        load_model(bare, prompt=PHRASES)
