"""Text-side attribution (issue 24, item 3): gradient x input on token embeddings finds the one token
a toy detector's logit depends on, equals finite differences on a float64 OWL-ViT, and is the same
batched as one detection at a time; the scores from the inference pass's kept inputs (the text
tower alone runs again, one backward) equal the whole model run again; explain(..., prompt=)
returns them with the maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import hf_prompted_models  # noqa: E402
from test_hf_equivalence import write_images  # noqa: E402

import detection  # noqa: E402
from detection import api  # noqa: E402
from detection.attention.token_scores import (TokenScores, distinct_query_groups, gradient_x_input,  # noqa: E402
                                              summed_gradient_x_input, text_token_scores)
from detection.engine.fast import InferenceModel  # noqa: E402
from detection.data.preprocess import image_to_input  # noqa: E402
from detection.models.registry import load_model  # noqa: E402

transformers.logging.set_verbosity_error()
PHRASES = ("red car", "remote control", "cat")


class ToyTextDetector(nn.Module):
    """Q queries, one text row per phrase; logit[0, q, c] = <query q, embedding of token KEY of row c>
    + a bias: only that one token of each phrase matters."""

    KEY = 2

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embedding = nn.Embedding(20, 8)
        self.queries = nn.Parameter(torch.randn(5, 8, generator=generator))
        self.ids = torch.tensor([[1, 4, 7, 9, 0], [2, 3, 5, 11, 0]])
        self.config = type("Config", (), {"prompt": ("a b c d", "e f g h")})()

    def token_embedding(self) -> nn.Module:
        return self.embedding

    def prompt_layout(self):
        return tuple(tuple((position, f"t{row}{position}") for position in range(4)) for row in range(2))

    def forward(self, images: torch.Tensor) -> dict:
        embeddings = self.embedding(self.ids)  # (C, S, D)
        key = embeddings[:, self.KEY] * 1.5 + embeddings[:, 0].detach()  # token 0 enters without a gradient path
        return {"pred_logits": (self.queries @ key.T)[None] + 0.25}


def test_a_toy_detector_s_logit_is_attributed_to_its_one_token() -> None:
    model = ToyTextDetector()
    scores = text_token_scores(model, torch.zeros(1, 3, 4, 4), torch.tensor([0, 3, 4]), torch.tensor([1, 0, 1]))
    assert scores.tokens[:4] == ("t00", "t01", "t02", "t03") and scores.token_phrase.tolist() == [0] * 4 + [1] * 4
    for n, phrase in enumerate([1, 0, 1]):
        found = np.flatnonzero(scores.scores[n])
        assert found.tolist() == [4 * phrase + ToyTextDetector.KEY]
    # the score is the logit's part that the token's embedding carries (linear here: exact)
    logits = model(None)["pred_logits"][0].detach()
    embeddings = model.embedding(model.ids).detach()
    expected = (model.queries[3].detach() @ embeddings[0, ToyTextDetector.KEY]) * 1.5
    assert scores.scores[1, ToyTextDetector.KEY] == pytest.approx(float(expected), rel=1e-5)
    assert np.allclose(scores.phrase_scores, logits[[0, 3, 4]].numpy())


@pytest.fixture(scope="module")
def owl(tmp_path_factory):
    root = tmp_path_factory.mktemp("owl_tokens")
    folder = hf_prompted_models.owlvit_folder(root / "model")
    image = write_images(root / "images", sizes=[(70, 90)])[0]
    return folder, image


def _input(model, image_path) -> torch.Tensor:
    from PIL import Image

    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    return image_to_input(rgb, model.preprocess_spec)[None]


def test_owl_gradient_x_input_equals_finite_differences_in_float64(owl) -> None:
    folder, image = owl
    model = load_model(folder, prompt=PHRASES).double()
    images = _input(model, image).double()
    # HF's class head casts its logits to float32 when given a query mask: without one (every phrase
    # here is real, so nothing is masked) they stay float64
    model.hf_model.class_head.register_forward_pre_hook(lambda _m, args: (*args[:2], None))
    query, label = 5, 1
    scores = text_token_scores(model, images, torch.tensor([query]), torch.tensor([label]))
    assert model(images)["pred_logits"].dtype == torch.float64
    embedding = model.token_embedding()
    for column in np.flatnonzero(scores.token_phrase == label):
        position = model.prompt_layout()[label][list(scores.phrase_tokens(label)).index(column)][0]

        def logit(scale: float) -> float:
            def scaled(_m, _a, output):
                output = output.clone()
                output[label, position] *= scale
                return output
            handle = embedding.register_forward_hook(scaled)
            try:
                with torch.no_grad():
                    return float(model(images)["pred_logits"][0, query, label])
            finally:
                handle.remove()

        step = 1e-6
        finite = (logit(1 + step) - logit(1 - step)) / (2 * step)
        assert scores.scores[0, column] == pytest.approx(finite, rel=1e-6, abs=1e-9)
    # tokens of the other phrases do not reach this logit
    assert not scores.scores[0, scores.token_phrase != label].any()


def test_batched_equals_one_detection_at_a_time(owl) -> None:
    folder, image = owl
    model = load_model(folder, prompt=PHRASES)
    images = _input(model, image)
    queries, labels = torch.tensor([3, 5, 5, 9]), torch.tensor([0, 1, 2, 0])
    together = text_token_scores(model, images, queries, labels)
    for n in range(len(queries)):
        alone = text_token_scores(model, images, queries[n:n + 1], labels[n:n + 1])
        assert np.array_equal(alone.scores[0], together.scores[n])
        assert np.array_equal(alone.phrase_scores[0], together.phrase_scores[n])
    assert together.tokens == tuple(text for phrase in model.prompt_layout() for _, text in phrase)
    assert together.tokens[:2] == ("red", "car")


def _kept_inputs(model, images: torch.Tensor):
    """The inference pass's kept inputs of one image (InferenceModel: inference mode, a prepared copy)."""
    engine = InferenceModel(model, "cpu", "fp32")
    mask = torch.zeros((1, *images.shape[-2:]), dtype=torch.bool)
    outputs = engine(images, mask, cross_attention=True, keep_features=True)
    return engine, outputs, outputs["attention"].select_image(0).kept_inputs.to("cpu", copy=True)


def test_scores_from_the_kept_inputs_equal_the_whole_model_run_again_without_the_vision_tower(owl) -> None:
    folder, image = owl
    model = load_model(folder, prompt=PHRASES)
    images = _input(model, image)
    engine, outputs, kept = _kept_inputs(model, images)
    assert kept.per_image["image_feats"].shape[:2] == outputs["pred_logits"].shape[:2]  # (1, patches)
    queries, labels = torch.tensor([3, 5, 5, 9, 15]), torch.tensor([0, 1, 2, 0, 0])  # phrase 0 twice, patch 5 twice
    vision_calls, text_rows = [], []
    engine.model.hf_model.owlvit.vision_model.register_forward_hook(lambda *_: vision_calls.append(1))
    engine.model.token_embedding().register_forward_hook(lambda _m, _a, out: text_rows.append(tuple(out.shape[:2])))
    new = text_token_scores(engine.model, None, queries, labels, kept=kept)
    assert vision_calls == []  # the vision tower does not run again
    longest = int(model.text_attention_mask.sum(-1).max())  # the text tower runs one row per detection, no padding
    assert text_rows == [(len(queries), longest)] and longest < model.input_ids.shape[1]
    old = text_token_scores(model, images, queries, labels)
    assert np.abs(new.scores - old.scores).max() <= 1e-5 * max(1.0, np.abs(old.scores).max())
    assert np.abs(new.phrase_scores - old.phrase_scores).max() <= 1e-5 * max(1.0, np.abs(old.phrase_scores).max())
    assert np.allclose(new.phrase_scores, outputs["pred_logits"][0, queries].numpy(), atol=1e-5)
    assert new.scores[:, new.token_phrase == 0][[1, 2]].sum() == 0 and new.scores[0].any()  # other phrases: 0
    # one backward for all equals one detection at a time: exactly up to rounding, so in float64 (in
    # float32 the text tower's matrix products over 1 or N rows round differently, ~1e-6 relative)
    model64 = model.double()
    with torch.no_grad():
        kept64 = model64(images.double(), cross_attention=True, keep_features=True)["attention"].kept_inputs
    together = text_token_scores(model64, None, queries, labels, kept=kept64)
    assert np.allclose(together.scores, new.scores, rtol=1e-5, atol=1e-6)
    for n in range(len(queries)):
        alone = text_token_scores(model64, None, queries[n:n + 1], labels[n:n + 1], kept=kept64)
        assert np.abs(alone.scores[0] - together.scores[n]).max() <= 1e-12
        assert np.array_equal(alone.phrase_scores[0], together.phrase_scores[n])
    empty = text_token_scores(engine.model, None, torch.tensor([], dtype=torch.int64),
                              torch.tensor([], dtype=torch.int64), kept=kept)
    assert empty.scores.shape == (0, len(new.tokens)) and empty.phrase_scores.shape == (0, 3)


def test_kept_inputs_that_are_not_the_model_s_fail_loudly(owl) -> None:
    folder, image = owl
    model = load_model(folder, prompt=PHRASES)
    _, _, kept = _kept_inputs(model, _input(model, image))
    kept.per_image["query_embeds"].mul_(-1)  # as if HF had changed how it embeds the text
    with pytest.raises(RuntimeError, match="text embeddings recomputed .* differ .* needs updating"):
        text_token_scores(model, None, torch.tensor([3]), torch.tensor([1]), kept=kept)
    with pytest.raises(ValueError, match="model input or the inference pass's kept inputs"):
        text_token_scores(model, None, torch.tensor([3]), torch.tensor([1]))


def test_one_backward_of_a_sum_equals_one_backward_per_output_where_they_do_not_share_rows() -> None:
    embedding = nn.Embedding(10, 4)
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[1, 2], [3, 4], [1, 5]])  # rows share token 1's vector, but not an embedding output

    def run() -> torch.Tensor:
        rows = embedding(ids)  # (3, 2, 4)
        return (torch.tanh(rows) * weights[:, None]).sum((1, 2))  # output n reads row n only

    summed = summed_gradient_x_input(run, embedding)
    one_by_one = gradient_x_input(run, embedding, [(n,) for n in range(3)])
    assert torch.allclose(summed, one_by_one[torch.arange(3), torch.arange(3)], atol=1e-7)
    assert summed.shape == (3, 2) and summed.abs().min() > 0


def test_detections_of_one_query_go_to_separate_backward_groups() -> None:
    assert distinct_query_groups([0, 4, 4, 9]) == [[0, 1, 3], [2]]
    assert distinct_query_groups([7, 7, 7]) == [[0], [1], [2]]
    assert distinct_query_groups([]) == []


def test_explain_with_a_prompt_returns_maps_and_token_scores(owl) -> None:
    folder, image = owl
    api.clear_model_cache()
    explanation = detection.explain(str(image), model=str(folder), prompt="red car. remote control. cat.",
                                    score_threshold=0.2, device="cpu")
    detections = explanation.detections
    assert len(detections) > 0 and set(detections.class_names) <= set(PHRASES)
    assert explanation.maps.shape == (len(detections), 70, 90)
    scores = explanation.token_scores
    assert isinstance(scores, TokenScores) and scores.phrases == PHRASES and len(scores) == len(detections)
    model = load_model(folder, prompt=PHRASES)
    expected = text_token_scores(model, _input(model, image), detections.query_index, detections.labels)
    assert np.allclose(scores.scores, expected.scores, atol=1e-6)
    # each detection's own phrase holds its highest phrase score (the label rule of OWL: max over phrases)
    assert (scores.phrase_scores.argmax(1) == detections.labels.numpy()).all()
    with pytest.raises(ValueError, match="no phrase"):
        detection.explain(str(image), model=str(folder), prompt=" . ", device="cpu")


def test_gradient_x_input_refuses_an_embedding_run_twice() -> None:
    embedding = nn.Embedding(4, 2)
    with pytest.raises(RuntimeError, match="ran 2 times"):
        gradient_x_input(lambda: embedding(torch.tensor([1])) + embedding(torch.tensor([2])), embedding, [(0, 0)])


def test_the_token_view_shades_each_token_by_its_share_of_the_row_s_largest_score() -> None:
    from detection.render.token_view import token_row_html, token_shades, token_table_html

    scores = TokenScores(phrases=("red car", "cat"), tokens=("red", "car", "cat"),
                         token_phrase=np.array([0, 0, 1]), scores=np.array([[0.5, -2.0, 0.0], [0.0, 0.0, 0.0]], np.float32),
                         phrase_scores=np.array([[1.5, -3.0], [0.1, 0.2]], np.float32), token_method="t", phrase_method="p")
    assert token_shades(scores.scores[0]).tolist() == [0.25, 1.0, 0.0]
    assert token_shades(scores.scores[1]).tolist() == [0.0, 0.0, 0.0]
    row = token_row_html(scores, 0)
    assert row.count('class="tok"') == 3 and row.count('class="sep"') == 1  # one separator between the phrases
    assert "rgba(230,110,20,0.250)" in row and "rgba(40,110,220,1.000)" in row  # positive orange, negative blue
    assert 'title="red car: token -2; phrase 1.5"' in row
    table = token_table_html(scores, ["red car", "<cat>"])
    assert table.count("<tr>") == 3 and "&lt;cat&gt;" in table
