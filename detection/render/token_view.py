"""The token view of a prompted detector's detection: the prompt with each token shaded by how much
that detection came from it (`attention.token_scores.TokenScores`); the one colour rule, as HTML for
the report and the viewer and as colours for the PDF."""
from __future__ import annotations

import html

import numpy as np

from detection.attention.token_scores import TokenScores

#: Shading: positive scores orange, negative ones blue (gradient x input can be negative).
TOKEN_POSITIVE, TOKEN_NEGATIVE = (230, 110, 20), (40, 110, 220)

TOKEN_VIEW_CSS = (".tokens td{font-size:14px}.tok{padding:1px 3px;margin:0 1px;border-radius:3px;"
                  "border:1px solid #ddd}.sep{color:#999;margin:0 2px}")


def token_shades(scores: np.ndarray) -> np.ndarray:
    """(T,) scores -> (T,) opacities in [0, 1]: |score| / max |score| of the row (0 for a row of zeros)."""
    scores = np.asarray(scores, dtype=np.float64)
    peak = float(np.abs(scores).max()) if scores.size else 0.0
    return np.abs(scores) / peak if peak > 0 else np.zeros_like(scores)


def token_colors(scores: np.ndarray) -> list[tuple[tuple[int, int, int], float]]:
    """(T,) scores -> per token (RGB, opacity): orange for a score >= 0, blue below, opacity
    `token_shades` rounded to 3 decimals (as the HTML's rgba() writes it)."""
    scores = np.asarray(scores)
    return [(TOKEN_POSITIVE if value >= 0 else TOKEN_NEGATIVE, round(float(shade), 3))
            for value, shade in zip(scores.tolist(), token_shades(scores).tolist())]


def token_title(scores: TokenScores, k: int, t: int) -> str:
    """The hover text of detection k's token t: its phrase, the token's score and the phrase's."""
    phrase = int(scores.token_phrase[t])
    return f"{scores.phrases[phrase]}: token {scores.scores[k, t]:.4g}; phrase {scores.phrase_scores[k, phrase]:.4g}"


def token_row_html(scores: TokenScores, k: int) -> str:
    """Detection k's prompt: every token a span shaded by its score (title: the score), phrases
    separated by '.', the detection's phrase scores in the phrase's title."""
    parts, previous = [], None
    for t, (text, phrase, ((red, green, blue), shade)) in enumerate(
            zip(scores.tokens, scores.token_phrase.tolist(), token_colors(scores.scores[k]))):
        if previous is not None and phrase != previous:
            parts.append('<span class="sep">.</span>')
        previous = phrase
        parts.append(f'<span class="tok" style="background:rgba({red},{green},{blue},{shade:.3f})" '
                     f'title="{html.escape(token_title(scores, k, t), quote=True)}">{html.escape(text)}</span>')
    return "".join(parts)


def token_table_html(scores: TokenScores, class_names: list[str]) -> str:
    """One row per detection: its number, its phrase and the shaded prompt; `token_method` named."""
    rows = [f'<table class="tokens"><tr><th>#</th><th>class</th><th>prompt tokens: {html.escape(scores.token_method)}'
            "</th></tr>"]
    for k in range(len(scores)):
        name = class_names[k] if k < len(class_names) else ""
        rows.append(f'<tr><td class="num">{k}</td><td>{html.escape(name)}</td><td>{token_row_html(scores, k)}</td></tr>')
    rows.append("</table>")
    return "\n".join(rows)
