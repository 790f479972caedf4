"""Text-side attribution of prompted detectors: how much each prompt token made each detection.

`TokenScores` holds one image's scores (per detection x prompt token, and per detection x phrase);
`gradient_x_input` is the attribution core (gradient of a logit with respect to a token embedding,
times that embedding, summed over its features), independent of the model family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

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
    """

    phrases: tuple[str, ...]
    tokens: tuple[str, ...]
    token_phrase: np.ndarray
    scores: np.ndarray
    phrase_scores: np.ndarray
    token_method: str
    phrase_method: str

    def __post_init__(self) -> None:
        tokens, phrases = len(self.tokens), len(self.phrases)
        problems = []
        if self.token_phrase.shape != (tokens,):
            problems.append(f"token_phrase {self.token_phrase.shape} for {tokens} tokens")
        elif tokens and (self.token_phrase.min() < 0 or self.token_phrase.max() >= phrases):
            problems.append(f"token_phrase outside 0 .. {phrases - 1}")
        if self.scores.ndim != 2 or self.scores.shape[1] != tokens:
            problems.append(f"scores {self.scores.shape} must be (N, {tokens})")
        if self.phrase_scores.shape != (self.scores.shape[0], phrases):
            problems.append(f"phrase_scores {self.phrase_scores.shape} must be ({self.scores.shape[0]}, {phrases})")
        if problems:
            raise ValueError("invalid TokenScores: " + "; ".join(problems))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def phrase_tokens(self, phrase: int) -> list[int]:
        """The token indices of phrase `phrase`."""
        return [int(i) for i in np.flatnonzero(self.token_phrase == phrase)]


def gradient_x_input(run: Callable[[], torch.Tensor], embedding: nn.Module,
                     targets: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """Gradient x input of chosen outputs with respect to what `embedding` returns.

    run: one forward pass, returning a tensor of logits (any shape); it must call `embedding`
        exactly once, whose output E (..., D) (e.g. token embeddings (rows, S, D)) is made a
        leaf of the graph here. targets: N index tuples into the logits, one scalar each.
    Returns float32 (N, *E.shape[:-1]): for target n, sum over D of d logit_n / dE * E, i.e.
    the derivative of logit_n along scaling each embedding vector (a first-order estimate of
    what removing that token's embedding changes). One backward per target (exact, not a
    batched approximation); parameters need no gradient.
    """
    kept: list[torch.Tensor] = []

    def make_leaf(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        kept.append(leaf)
        return leaf

    handle = embedding.register_forward_hook(make_leaf)
    try:
        with torch.enable_grad():
            logits = run()
    finally:
        handle.remove()
    if len(kept) != 1:
        raise RuntimeError(f"the embedding module ran {len(kept)} times in one forward pass (expected once)")
    (leaf,) = kept
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


def text_token_scores(model: nn.Module, images: torch.Tensor, query_index: torch.Tensor,
                      labels: torch.Tensor) -> TokenScores:
    """TokenScores of one image's detections for a prompted detector with one text row per phrase.

    model: offers forward(images) -> {"pred_logits": (1, Q, C)}, `token_embedding()` (the module
        whose output (C, S, D) holds each phrase's token embeddings, row c = phrase c) and
        `prompt_layout()` -> per phrase, [(position in its row, token text), ...] of its real tokens.
    images: (1, 3, H, W) the model input; query_index / labels: (N,) each detection's query and
        phrase. scores: gradient x input of logit[0, query, label] on each token embedding;
        phrase_scores: logit[0, query, :] as the model computed it.
    """
    if images.shape[0] != 1:
        raise ValueError(f"text_token_scores takes one image at a time, got a batch of {images.shape[0]}")
    query_index = torch.as_tensor(query_index, dtype=torch.int64).reshape(-1).tolist()
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).tolist()
    outputs: dict = {}

    def run() -> torch.Tensor:
        outputs["logits"] = model(images)["pred_logits"]
        return outputs["logits"]

    per_row = gradient_x_input(run, model.token_embedding(), [(0, q, c) for q, c in zip(query_index, labels)])
    layout = model.prompt_layout()
    tokens, token_phrase, columns = [], [], []
    for phrase, pieces in enumerate(layout):
        for position, text in pieces:
            tokens.append(text)
            token_phrase.append(phrase)
            columns.append((phrase, position))
    scores = np.zeros((len(query_index), len(tokens)), dtype=np.float32)
    if len(query_index):
        rows = torch.tensor([row for row, _ in columns], dtype=torch.int64)
        positions = torch.tensor([position for _, position in columns], dtype=torch.int64)
        scores = per_row[:, rows, positions].detach().cpu().numpy().astype(np.float32)
    logits = outputs["logits"].detach()[0, query_index].float().cpu().numpy().reshape(len(query_index), -1)
    return TokenScores(phrases=tuple(model.config.prompt), tokens=tuple(tokens),
                       token_phrase=np.asarray(token_phrase, dtype=np.int64), scores=scores,
                       phrase_scores=logits.astype(np.float32), token_method="gradient x input (token embedding)",
                       phrase_method="logit")
