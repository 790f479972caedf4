"""relevance for OWL-ViT and OWLv2 (issue 24, "relevance where the attention is dense"): equal to a
hand transcription of Chefer et al.'s ViT rule from HF's own `output_attentions` + autograd on HF's
processor inputs (OWLv2: cut to the image's patches inside the square), batched equal to one
detection at a time, written by `predict --explain relevance`; plain inference still records one
layer. Small random OWL models and a CLIP tokenizer written by the test (no download)."""
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
from test_prompted_owl import predict  # noqa: E402
from test_prompted_owlv2 import owlv2_folder  # noqa: E402

from detection.attention.gradients import relevance  # noqa: E402
from detection.data.preprocess import image_to_input  # noqa: E402
from detection.models.registry import load_model  # noqa: E402
from detection.runfolder.maps_npz import load_maps_npz  # noqa: E402

transformers.logging.set_verbosity_error()
PROMPT = "cat. remote control. bicycle."
PHRASES = ["cat", "remote control", "bicycle"]
SIZE, PATCH = hf_prompted_models.IMAGE_SIZE, hf_prompted_models.PATCH
GRID = SIZE // PATCH


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("owlrel")
    images = write_images(root / "images", sizes=[(100, 61), (40, 90)])  # tall, wide: OWLv2 pads both
    return {"owlvit": (hf_prompted_models.owlvit_folder(root / "owlvit"), images),
            "owlv2": (owlv2_folder(root / "owlv2"), images)}


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def hand_relevance(family: str, folder: Path, image: Path, queries: list[int], labels: list[int]) -> torch.Tensor:
    """The rule written out on HF's own model, inputs and attentions: per detection, Ā_l =
    E_h[(∂logit/∂A_l ⊙ A_l)⁺] over all 1 + P tokens, R = I, R ← R + Ā_l·R for l = 1 .. L (float64),
    the map = R[1 + q, 1:] over the patch grid (GRID, GRID)."""
    names = {"owlvit": ("OwlViTForObjectDetection", "OwlViTProcessor"),
             "owlv2": ("Owlv2ForObjectDetection", "Owlv2Processor")}[family]
    model = getattr(transformers, names[0]).from_pretrained(folder, attn_implementation="eager").eval()
    processor = getattr(transformers, names[1]).from_pretrained(folder)
    inputs = processor(text=[PHRASES], images=rgb(image), return_tensors="pt")
    outputs = model(**inputs, output_attentions=True)
    attentions = outputs.vision_model_output.attentions
    assert len(attentions) == model.config.vision_config.num_hidden_layers
    maps = []
    for query, label in zip(queries, labels):
        grads = torch.autograd.grad(outputs.logits[0, query, label], attentions, retain_graph=True)
        relevance_matrix = torch.eye(attentions[0].shape[-1], dtype=torch.float64)
        for attention, grad in zip(attentions, grads):
            weighted = (grad * attention.detach())[0].clamp(min=0).mean(0).double()
            relevance_matrix = relevance_matrix + weighted @ relevance_matrix
        maps.append(relevance_matrix[1 + query, 1:].reshape(GRID, GRID))
    return torch.stack(maps)


def our_input(model, image: Path) -> torch.Tensor:
    return image_to_input(rgb(image), model.preprocess_spec)[None]


def top_patches(model, pixels: torch.Tensor, count: int) -> tuple[list[int], list[int]]:
    """The `count` patches with the highest logits, and their best phrase (as detections would be)."""
    with torch.no_grad():
        logits = model(pixels)["pred_logits"][0]
    best, phrase = logits.max(dim=-1)
    queries = best.topk(count).indices
    return queries.tolist(), phrase[queries].tolist()


@pytest.mark.parametrize("family", ["owlvit", "owlv2"])
def test_relevance_equals_the_rule_on_hf_s_own_attentions(folders, family) -> None:
    """Batched relevance of three detections equals the hand transcription on HF's processor inputs
    and attentions (within 1e-5), cut to the image's patches (OWLv2: its extent inside the square),
    and equals each detection explained alone."""
    folder, images = folders[family]
    model = load_model(folder, prompt=PHRASES)
    for image in images:
        pixels = our_input(model, image)
        queries, labels = top_patches(model, pixels, 3)
        explained = relevance(model, pixels, None, 0, queries, labels)
        height, width = rgb(image).shape[:2]
        if family == "owlv2":  # the patches holding the image inside its square
            side = max(height, width)
            rows, cols = (int(np.ceil(v * SIZE / side / PATCH)) for v in (height, width))
            assert (rows, cols) != (GRID, GRID)
            assert tuple(explained.input_size) == (round(height * SIZE / side), round(width * SIZE / side))
        else:
            rows, cols = GRID, GRID
            assert tuple(explained.input_size) == (SIZE, SIZE)
        assert explained.stride == PATCH and explained.values.shape == (3, rows, cols)
        full = hand_relevance(family, folder, image, queries, labels)  # (3, GRID, GRID)
        expected = full[:, :rows, :cols]
        others = full.clone().flatten(1)
        others[range(3), queries] = 0  # R's identity term: the patch's own column
        assert float(others.reshape(3, GRID, GRID)[:, :rows, :cols].max()) > 1e-3  # the maps spread over other patches
        assert torch.allclose(explained.values.double(), expected, atol=1e-5), (family, image.name)
        for k, (query, label) in enumerate(zip(queries, labels)):
            alone = relevance(model, pixels, None, 0, [query], [label]).values
            assert torch.allclose(alone[0], explained.values[k], atol=1e-6), (family, k)


def test_plain_inference_records_one_layer_and_the_gradient_graph_every_layer(folders) -> None:
    """Plain inference's record (and the hooks behind it) hold the last vision layer only; the
    gradient graph holds every layer, its last the record's layer; attn-grad still weights the
    last layer (the layer raw shows)."""
    from detection.attention.gradients import attn_grad

    folder, images = folders["owlvit"]
    model = load_model(folder, prompt=PHRASES)
    layers = model.vision_attentions()
    assert len(layers) == 2 and layers[-1] is model.last_vision_attention()
    pixels = our_input(model, images[0])
    seen: dict[int, int] = {}  # layer -> forward hooks on it while it ran (the test's own included)
    handles = [layer.register_forward_hook(lambda module, *_, i=i: seen.__setitem__(i, len(module._forward_hooks)))
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            plain = model(pixels, cross_attention=True)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {0: 1, 1: 2}  # the model hooks the last layer only
    assert plain["attention"].decoder_cross.shape[0] == 1 and "attention_graph" not in plain
    with torch.enable_grad():
        graphed = model(pixels, cross_attention=True, keep_graph=True)
    tokens = graphed["attention_graph"].tokens
    assert len(tokens) == 2 and graphed["attention_graph"].detection_tokens == GRID * GRID
    assert torch.equal(plain["attention"].decoder_cross[0].flatten(-2), tokens[-1].detach()[:, :, 1:, 1:])
    queries, labels = top_patches(model, pixels, 2)
    for k, (query, label) in enumerate(zip(queries, labels)):
        (gradient,) = torch.autograd.grad(graphed["pred_logits"][0, query, label], tokens[-1], retain_graph=True)
        expected = (gradient * tokens[-1].detach())[0, :, 1 + query, 1:].clamp(min=0).mean(0).reshape(GRID, GRID)
        for choice in ("last", "mean"):  # the record holds one layer: mean = last, as for raw
            values = attn_grad(model, pixels, None, 0, queries, labels, layers=choice).values
            assert torch.allclose(values[k], expected, atol=1e-6), (choice, k)


def test_cli_predict_explain_relevance_writes_the_maps(folders, tmp_path) -> None:
    """predict --explain relevance (OWLv2, non-square images): a maps file per image at the image's
    size, one map per detection, whose stored cells are `relevance`'s for the saved detections."""
    folder, images = folders["owlv2"]
    out = tmp_path / "run"
    assert predict(folder, images[0].parent, out, "--prompt", PROMPT, "--score-threshold", "0.3",
                   "--save-attention", "--explain", "relevance") == 0
    model = load_model(folder, prompt=PHRASES)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sum(len(r["detections"]) for r in records) >= 2
    for record in records:
        if not record["detections"]:
            continue
        maps, meta = load_maps_npz(out / record["methods"]["relevance"])
        queries = [d["query_index"] for d in record["detections"]]
        labels = [d["category_id"] for d in record["detections"]]
        assert maps.shape == (len(queries), record["height"], record["width"]) and meta["query_index"] == queries
        cells = relevance(model, our_input(model, Path(record["file"])), None, 0, queries, labels)
        stored, _ = load_maps_npz(out / record["methods"]["relevance"], size=None)  # the un-normalised cells
        assert np.allclose(stored, cells.values.numpy(), atol=1e-6)


def test_explain_api_returns_the_relevance_cells(folders) -> None:
    """detection.explain(..., method="relevance") (OWL-ViT): its cells are `relevance`'s for its detections."""
    import detection
    from detection import api

    folder, images = folders["owlvit"]
    api.clear_model_cache()
    explained = detection.explain(str(images[0]), model=str(folder), prompt=PROMPT, method="relevance",
                                  score_threshold=0.3, device="cpu")
    found = explained.detections
    assert len(found) > 0 and explained.maps.shape[0] == len(found)
    model = load_model(folder, prompt=PHRASES)
    cells = relevance(model, our_input(model, images[0]), None, 0, found.query_index, found.labels)
    assert torch.allclose(torch.as_tensor(explained.method_maps.values), cells.values, atol=1e-6)
