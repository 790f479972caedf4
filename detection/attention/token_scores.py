"""Text-side attribution of prompted detectors: how much each prompt token made each detection.

`TokenScores` holds one image's scores (per detection x prompt token, and per detection x phrase);
`gradient_x_input` / `summed_gradient_x_input` are the attribution core (gradient of a logit with
respect to a token embedding, times that embedding, summed over its features), family-independent.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TokenScores:
    """One image's text-side attribution, detection k in the image's Detections order.

    phrases: the prompt's phrases (C). tokens: the prompt's tokens (T), the tokenizer's pieces
    without special or padding tokens, in prompt order; token_phrase: int64 (T,) the phrase
    each token belongs to.
    scores: float32 (N, T) the token score of each detection: `token_method` says what it is
        (OWL: gradient x input of the detection's logit on the token's embedding; a token of
        another phrase than the detection's scores 0 there, its phrase being encoded apart).
    phrase_scores: float32 (N, C) a score per phrase: `phrase_method` says what (OWL: the
        detection's logit for each phrase, as the model computed it).
    raw_scores: float32 (N, T) or None: a second, un-weighted token score where the family has
        one (Grounding DINO: the last decoder layer's text cross-attention of the detection's
        query, head mean; `scores` is then that attention weighted by the gradient of the
        detection's phrase logit, head mean of (dlogit/dA * A)+).
    """

    phrases: tuple[str, ...]
    tokens: tuple[str, ...]
    token_phrase: np.ndarray
    scores: np.ndarray
    phrase_scores: np.ndarray
    token_method: str
    phrase_method: str
    raw_scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        tokens, phrases = len(self.tokens), len(self.phrases)
        problems = []
        if self.token_phrase.shape != (tokens,):
            problems.append(f"token_phrase {self.token_phrase.shape} for {tokens} tokens")
        elif tokens and (self.token_phrase.min() < 0 or self.token_phrase.max() >= phrases):
            problems.append(f"token_phrase outside 0 .. {phrases - 1}")
        if self.scores.ndim != 2 or self.scores.shape[1] != tokens:
            problems.append(f"scores {self.scores.shape} must be (N, {tokens})")
        if self.raw_scores is not None and self.raw_scores.shape != self.scores.shape:
            problems.append(f"raw_scores {self.raw_scores.shape} must be like scores {self.scores.shape}")
        if self.phrase_scores.shape != (self.scores.shape[0], phrases):
            problems.append(f"phrase_scores {self.phrase_scores.shape} must be ({self.scores.shape[0]}, {phrases})")
        if problems:
            raise ValueError("invalid TokenScores: " + "; ".join(problems))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def phrase_tokens(self, phrase: int) -> list[int]:
        """The token indices of phrase `phrase`."""
        return [int(i) for i in np.flatnonzero(self.token_phrase == phrase)]


@contextmanager
def _embedding_leaf(embedding: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, what `embedding` returns is made a leaf of the graph (collected in the list)."""
    kept: list[torch.Tensor] = []

    def make_leaf(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        kept.append(leaf)
        return leaf

    handle = embedding.register_forward_hook(make_leaf)
    try:
        with torch.enable_grad():
            yield kept
    finally:
        handle.remove()


def _one_leaf(kept: list[torch.Tensor]) -> torch.Tensor:
    if len(kept) != 1:
        raise RuntimeError(f"the embedding module ran {len(kept)} times in one forward pass (expected once)")
    return kept[0]


def gradient_x_input(run: Callable[[], torch.Tensor], embedding: nn.Module,
                     targets: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """Gradient x input of chosen outputs with respect to what `embedding` returns.

    run: one forward pass, returning a tensor of logits (any shape); it must call `embedding`
        exactly once, whose output E (..., D) (e.g. token embeddings (rows, S, D)) is made a
        leaf of the graph here. targets: N index tuples into the logits, one scalar each.
    Returns float32 (N, *E.shape[:-1]): for target n, sum over D of d logit_n / dE * E, i.e.
    the derivative of logit_n along scaling each embedding vector (a first-order estimate of
    what removing that token's embedding changes). One backward per target (exact whatever the
    targets share; `summed_gradient_x_input` is the one-backward form); parameters need no gradient.
    """
    with _embedding_leaf(embedding) as kept:
        logits = run()
    leaf = _one_leaf(kept)
    scores = []
    for number, index in enumerate(targets):
        (gradient,) = torch.autograd.grad(logits[tuple(index)], leaf, retain_graph=number < len(targets) - 1,
                                          allow_unused=True)
        if gradient is None:
            gradient = torch.zeros_like(leaf)
        scores.append((gradient * leaf.detach()).sum(-1).float())
    if not scores:
        return torch.zeros((0, *leaf.shape[:-1]), dtype=torch.float32)
    return torch.stack(scores)


def summed_gradient_x_input(run: Callable[[], torch.Tensor], embedding: nn.Module) -> torch.Tensor:
    """Gradient x input of the sum of what `run` returns, one backward: float32 E.shape[:-1].

    Equal to `gradient_x_input` of each output where output n depends on its own part of E only
    (e.g. row n of the token embeddings), every other part's gradient being exactly zero."""
    with _embedding_leaf(embedding) as kept:
        total = run().sum()
    leaf = _one_leaf(kept)
    (gradient,) = torch.autograd.grad(total, leaf, allow_unused=True)
    if gradient is None:
        gradient = torch.zeros_like(leaf)
    return (gradient * leaf.detach()).sum(-1).float()


def text_token_scores(model: nn.Module, images: torch.Tensor | None, query_index: torch.Tensor,
                      labels: torch.Tensor, kept: Any = None) -> TokenScores:
    """TokenScores of one image's detections for a prompted detector: the decoder's text
    cross-attention where the model has one (`text_cross_attention_modules`: Grounding DINO,
    `cross_attention_token_scores`), else gradient x input on the token embeddings (OWL,
    `embedding_token_scores`).

    kept: the inference pass's `KeptInputs` of this image (`AttentionRecord.kept_inputs`, on the
    model's device, ordinary tensors): only the part of the model the gradient needs runs again
    (images may be None). None: the model runs again on `images` (1, 3, H, W) with a graph."""
    if kept is None and images is None:
        raise ValueError("token scores need the image's model input or the inference pass's kept inputs")
    if hasattr(model, "text_cross_attention_modules"):
        return cross_attention_token_scores(model, images, query_index, labels, kept)
    return embedding_token_scores(model, images, query_index, labels, kept)


def _columns(layout: Sequence[Sequence[tuple[int, str]]]) -> tuple[list[str], list[int], list[int], list[int]]:
    """The prompt's tokens in order: texts, phrase of each, the phrase's text row, the position in it."""
    tokens, phrases, rows, positions = [], [], [], []
    for phrase, pieces in enumerate(layout):
        for position, text in pieces:
            tokens.append(text)
            phrases.append(phrase)
            rows.append(phrase)
            positions.append(position)
    return tokens, phrases, rows, positions


def distinct_query_groups(query_index: Sequence[int]) -> list[list[int]]:
    """Detection numbers in groups whose queries are distinct, in order (a query's second
    detection opens the next group): one backward per group, since a logit of query q reaches
    row q of the text cross-attention only."""
    groups: list[list[int]] = []
    for number, query in enumerate(query_index):
        group = next((g for g in groups if all(query_index[n] != query for n in g)), None)
        if group is None:
            groups.append([number])
        else:
            group.append(number)
    return groups


def cross_attention_token_scores(model: nn.Module, images: torch.Tensor | None, query_index: torch.Tensor,
                                 labels: torch.Tensor, kept: Any = None) -> TokenScores:
    """Grounding DINO: the last decoder layer's text cross-attention row of each detection's query
    over the prompt tokens (raw_scores, head mean) and that row weighted by the gradient of the
    detection's phrase logit (scores, head mean of (dlogit/dA * A)+).

    Query q's logit depends on the layer's text cross-attention through row q only (the layer's
    self-attention comes before it; what follows works per query), so the detections of distinct
    queries share one backward of their logits' sum (`distinct_query_groups`). The graph starts at
    the last decoder layer's input: `replay_last_decoder_layer(kept)` on the inference pass's kept
    inputs, else `text_gradient_forward(images)` (the whole model again), else forward(images,
    cross_attention=True, keep_graph=True). Each returns {"pred_logits": (1, Q, C),
    "text_attention_graph": per decoder layer (1, heads, Q, S)}; `prompt_layout()` gives the
    positions of each phrase's tokens in the one text row."""
    if images is not None and images.shape[0] != 1:
        raise ValueError(f"token scores take one image at a time, got a batch of {images.shape[0]}")
    query_index = torch.as_tensor(query_index, dtype=torch.int64).reshape(-1).tolist()
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).tolist()
    tokens, token_phrase, _, positions = _columns(model.prompt_layout())
    if kept is not None:
        outputs = model.replay_last_decoder_layer(kept)
    elif hasattr(model, "text_gradient_forward"):  # the graph from the last decoder layer on only
        outputs = model.text_gradient_forward(images)
    else:
        with torch.enable_grad():  # the input joins the graph, so the attention does whatever the parameters' flags
            outputs = model(images.detach().requires_grad_(True), cross_attention=True, keep_graph=True)
    weights = outputs["text_attention_graph"][-1]  # (1, heads, Q, S)
    logits = outputs["pred_logits"]
    raw = weights.detach()[0].float().mean(0)[query_index][:, positions]  # (N, T)
    scores = torch.zeros((len(query_index), len(tokens)), dtype=torch.float32)
    groups = distinct_query_groups(query_index)
    for number, group in enumerate(groups):
        total = sum(logits[0, query_index[n], labels[n]] for n in group)
        (gradient,) = torch.autograd.grad(total, weights, retain_graph=number < len(groups) - 1)
        weighted = (gradient * weights.detach())[0][:, [query_index[n] for n in group]][..., positions]
        scores[group] = weighted.float().clamp(min=0).mean(0).cpu()
    phrase = logits.detach()[0, query_index].float().reshape(len(query_index), logits.shape[-1])
    return TokenScores(phrases=tuple(model.config.prompt), tokens=tuple(tokens),
                       token_phrase=np.asarray(token_phrase, dtype=np.int64), scores=scores.numpy(),
                       phrase_scores=phrase.cpu().numpy(), raw_scores=raw.cpu().numpy().astype(np.float32),
                       token_method="gradient-weighted text cross-attention, last decoder layer (head mean of "
                                    "(dlogit/dA * A)+)",
                       phrase_method="logit (maximum over the phrase's tokens)")


def embedding_token_scores(model: nn.Module, images: torch.Tensor | None, query_index: torch.Tensor,
                           labels: torch.Tensor, kept: Any = None) -> TokenScores:
    """TokenScores of one image's detections for a prompted detector with one text row per phrase.

    model: offers `token_embedding()` (the module whose output (rows, S, D) holds token embeddings,
        one row per text row) and `prompt_layout()` -> per phrase, [(position in its row, token
        text), ...] of its real tokens; and forward(images) -> {"pred_logits": (1, Q, C)} (row c =
        phrase c) or, with kept, `detection_text_logits(kept, query_index, labels)` -> (logits (N,),
        phrase logits (N, C)) with one text row per detection (row n = phrase labels[n]).
    images: (1, 3, H, W) the model input (unused with kept); query_index / labels: (N,) each
        detection's query and phrase. scores: gradient x input of logit[0, query, label] on each
        token embedding (tokens of other phrases: 0); phrase_scores: logit[0, query, :].
    With kept, one backward for every detection (each reads its own text row); without, the whole
    model runs again and one backward per detection (phrases' rows are shared).
    A model whose rows hold one pooled embedding per phrase (OmDet-Turbo: (C, 1, D)) says so in its
    `token_method` / `phrase_method` attributes, which then name the scores.
    """
    if images is not None and images.shape[0] != 1:
        raise ValueError(f"text_token_scores takes one image at a time, got a batch of {images.shape[0]}")
    query_index = torch.as_tensor(query_index, dtype=torch.int64).reshape(-1).tolist()
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).tolist()
    tokens, token_phrase, rows, positions = _columns(model.prompt_layout())
    scores = np.zeros((len(query_index), len(tokens)), dtype=np.float32)
    phrases = len(model.prompt_layout())
    if kept is not None:
        if not query_index:
            logits = np.zeros((0, phrases), dtype=np.float32)
        else:
            outputs: dict = {}

            def run_kept() -> torch.Tensor:
                detection_logits, outputs["phrase"] = model.detection_text_logits(kept, query_index, labels)
                return detection_logits

            per_detection = summed_gradient_x_input(run_kept, model.token_embedding()).cpu().numpy()  # (N, S)
            columns = np.asarray(token_phrase)
            for n, label in enumerate(labels):
                own = np.flatnonzero(columns == label)
                scores[n, own] = per_detection[n, np.asarray(positions)[own]]
            logits = outputs["phrase"].detach().float().cpu().numpy().reshape(len(query_index), phrases)
    else:
        outputs = {}

        def run() -> torch.Tensor:
            outputs["logits"] = model(images)["pred_logits"]
            return outputs["logits"]

        per_row = gradient_x_input(run, model.token_embedding(), [(0, q, c) for q, c in zip(query_index, labels)])
        if len(query_index):
            scores = per_row[:, rows, positions].detach().cpu().numpy().astype(np.float32)
        logits = outputs["logits"].detach()[0, query_index].float().cpu().numpy().reshape(len(query_index),
                                                                                          outputs["logits"].shape[-1])
    return TokenScores(phrases=tuple(model.config.prompt), tokens=tuple(tokens),
                       token_phrase=np.asarray(token_phrase, dtype=np.int64), scores=scores,
                       phrase_scores=logits.astype(np.float32),
                       token_method=getattr(model, "token_method", "gradient x input (token embedding)"),
                       phrase_method=getattr(model, "phrase_method", "logit"))
