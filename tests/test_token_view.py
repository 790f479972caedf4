"""The token view of a prompted run (issue 24) outside the HTML report: the viewer's data carries the
saved token scores; in headless Chromium, clicking a detection shades its prompt tokens by the
colour rule (orange >= 0, blue < 0, opacity |s| / the row's max |s|); the PDF draws and holds
the prompt tokens under each detection's row. A small random OWL-ViT (tests/hf_prompted_models.py);
a closed-set demo run shows no token view."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import hf_prompted_models  # noqa: E402
from test_hf_equivalence import write_images  # noqa: E402

from detection.cli import main  # noqa: E402
from detection.render.report import write_report  # noqa: E402
from detection.render.report_contents import read_run  # noqa: E402
from detection.render.report_pdf import _image_pages  # noqa: E402
from detection.render.token_view import TOKEN_NEGATIVE, TOKEN_POSITIVE, token_colors  # noqa: E402
from detection.render.viewer import viewer_payload, write_viewer  # noqa: E402
from detection.runfolder.tokens_npz import load_tokens_npz  # noqa: E402

transformers.logging.set_verbosity_error()
REPO = Path(__file__).resolve().parents[1]
PROMPT = "cat. remote control. bicycle."
PHRASES = ("cat", "remote control", "bicycle")


@pytest.fixture(scope="module")
def owl_run(tmp_path_factory) -> Path:
    """predict (prompt, --save-attention, --overlays) on two images, then the viewer and the report."""
    root = tmp_path_factory.mktemp("token_view")
    folder = hf_prompted_models.owlvit_folder(root / "model")
    write_images(root / "images", sizes=[(70, 90), (100, 61)])
    out = root / "run"
    assert main(["predict", str(root / "images"), "--model", str(folder), "--out", str(out), "--device", "cpu",
                 "--precision", "fp32", "--workers", "0", "--quiet", "--prompt", PROMPT, "--score-threshold", "0.3",
                 "--save-attention", "--overlays"]) == 0
    write_viewer(out)
    write_report(out)
    return out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("token_view_demo") / "run"
    assert main(["predict", str(REPO / "demo" / "images" / "shapes_3.png"), "--out", str(out), "--workers", "0",
                 "--quiet", "--save-attention"]) == 0
    write_viewer(out)
    return out


def saved_scores(run: Path) -> list[tuple[dict, object]]:
    """(predictions.jsonl row, its TokenScores read from attention/tokens/<key>.npz) per image."""
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    return [(row, load_tokens_npz(run / row["tokens"])[0]) for row in rows]


def expected_shading(row: np.ndarray) -> list[tuple[tuple[int, int, int], float]]:
    """The rule, written out: orange for s >= 0, blue below; opacity |s| / max |s| of the row."""
    peak = float(np.abs(row).max())
    return [(TOKEN_POSITIVE if s >= 0 else TOKEN_NEGATIVE, abs(float(s)) / peak if peak > 0 else 0.0) for s in row]


def test_the_colour_rule_on_hand_values() -> None:
    assert token_colors(np.array([0.5, -1.0, 0.0, 0.25], np.float32)) == [
        (TOKEN_POSITIVE, 0.5), (TOKEN_NEGATIVE, 1.0), (TOKEN_POSITIVE, 0.0), (TOKEN_POSITIVE, 0.25)]
    assert token_colors(np.array([2.0, -3.0], np.float32)) == [(TOKEN_POSITIVE, 0.667), (TOKEN_NEGATIVE, 1.0)]
    assert token_colors(np.zeros(3, np.float32)) == [(TOKEN_POSITIVE, 0.0)] * 3


def test_the_viewer_data_carries_the_saved_token_scores(owl_run, demo_run) -> None:
    payload, _ = viewer_payload(owl_run)
    saved = saved_scores(owl_run)
    assert [image["key"] for image in payload["images"]] == [row["key"] for row, _ in saved]
    for image, (row, scores) in zip(payload["images"], saved):
        tokens = image["tokens"]
        assert len(scores) == len(row["detections"]) > 0
        # float32 values through JSON: exactly the npz's
        assert np.array_equal(np.array(tokens["scores"], np.float32), scores.scores)
        assert np.array_equal(np.array(tokens["phrase_scores"], np.float32), scores.phrase_scores)
        assert tokens["tokens"] == ["cat", "remote", "control", "bicycle"] == list(scores.tokens)
        assert tokens["token_phrase"] == [0, 1, 1, 2] and tuple(tokens["phrases"]) == PHRASES
        assert tokens["method"] == scores.token_method
        for k, html in enumerate(tokens["rows"]):
            assert re.findall(r'class="tok"[^>]*>([^<]*)</span>', html) == list(scores.tokens)
    closed, _ = viewer_payload(demo_run)
    assert closed["images"] and all("tokens" not in image for image in closed["images"])


def test_the_pdf_holds_the_prompt_tokens_shaded_under_each_detection(owl_run) -> None:
    pypdf = pytest.importorskip("pypdf", reason="pypdf is not installed (pip install -e '.[dev]')")
    reader = pypdf.PdfReader(str(owl_run / "report" / "report.pdf"))
    text = "\n".join(page.extract_text() for page in reader.pages)
    saved = saved_scores(owl_run)
    shown = sum(min(12, len(row["detections"])) for row, _ in saved)
    assert len(re.findall(r"cat \. remote control \. bicycle", text)) == shown
    assert "its prompt tokens, gradient x input" in text
    # the drawn page: each token's background is its colour over white, at the text's place
    run = read_run(owl_run)
    checked = {TOKEN_POSITIVE: 0, TOKEN_NEGATIVE: 0}
    for entry, (row, scores) in zip(run.images, saved):
        page = _image_pages(entry)[0]
        drawn = [(x, y) for x, y, _, _, word in page.texts if word.strip() in scores.tokens and word.endswith(" ")]
        assert len(drawn) == 4 * min(12, len(row["detections"]))
        for k in range(min(12, len(row["detections"]))):
            for (x, baseline), (color, opacity) in zip(drawn[4 * k: 4 * k + 4], expected_shading(scores.scores[k])):
                pixel = page.pixels[baseline - 12, x - 2].astype(float)
                assert np.abs(pixel - (255 * (1 - opacity) + np.array(color) * opacity)).max() <= 1.0
                checked[color] += opacity > 0.2
    assert min(checked.values()) > 0  # both signs were drawn


def test_the_pdf_is_the_same_bytes_again(owl_run, tmp_path) -> None:
    _, first = write_report(owl_run, tmp_path / "a")
    _, second = write_report(owl_run, tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()


# -- in a real browser --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def driver():
    browser_tests = pytest.importorskip("test_viewer_browser")
    if browser_tests.CHROMIUM is None or browser_tests.CHROMEDRIVER is None:
        pytest.skip("chromium / chromium-driver not installed (apt-get install -y chromium chromium-driver)")
    browser = browser_tests.start_chrome()
    yield browser
    browser.quit()


#: Chromium keeps a colour's alpha as a byte and prints the shortest decimal of that byte: 1.5 steps
ALPHA_STEP = 1.5 / 255


def spans(driver) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#token-row span.tok')).map((s) => "
        "({text: s.textContent, background: getComputedStyle(s).backgroundColor, title: s.title}))")


def rgba(text: str) -> tuple[tuple[int, int, int], float]:
    values = [float(v) for v in re.findall(r"[\d.]+", text)]
    return tuple(int(v) for v in values[:3]), (values[3] if len(values) == 4 else 1.0)


def test_clicking_a_detection_shades_its_prompt_tokens(driver, owl_run) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser_tests = sys.modules["test_viewer_browser"]
    shades = {TOKEN_POSITIVE: 0, TOKEN_NEGATIVE: 0}
    for index, (row, scores) in enumerate(saved_scores(owl_run)):
        browser_tests.open_view(driver, owl_run, f"#image={index}&det=0")
        assert driver.find_element(By.ID, "token-view").is_displayed()
        for k in reversed(range(len(row["detections"]))):  # from the last: each click changes the view
            driver.find_element(By.ID, f"det-row-{k}").click()
            browser_tests.wait_ready(driver)
            assert driver.execute_script("return detrViewer.state.det") == k
            shown = spans(driver)
            assert [s["text"] for s in shown] == list(scores.tokens)
            for t, (span, (color, opacity)) in enumerate(zip(shown, expected_shading(scores.scores[k]))):
                got_color, got_opacity = rgba(span["background"])
                assert abs(got_opacity - opacity) <= ALPHA_STEP, (index, k, t, span)
                if opacity > 0:
                    assert got_color == color, (index, k, t, span)
                    shades[color] += 1
                phrase = int(scores.token_phrase[t])
                assert span["title"] == (f"{PHRASES[phrase]}: token {float(scores.scores[k, t]):.4g}; "
                                         f"phrase {float(scores.phrase_scores[k, phrase]):.4g}")
        # hovering another detection's row previews its prompt; leaving it shows the selected one again
        ActionChains(driver).move_to_element(driver.find_element(By.ID, f"det-row-{len(row['detections']) - 1}")).perform()
        last = expected_shading(scores.scores[-1])
        assert [rgba(s["background"])[1] for s in spans(driver)] == pytest.approx([o for _, o in last], abs=ALPHA_STEP)
        ActionChains(driver).move_to_element(driver.find_element(By.ID, "title")).perform()
        first = expected_shading(scores.scores[0])
        assert [rgba(s["background"])[1] for s in spans(driver)] == pytest.approx([o for _, o in first], abs=ALPHA_STEP)
    assert min(shades.values()) > 0  # orange and blue tokens both seen


def test_a_closed_set_run_shows_no_token_view(driver, demo_run) -> None:
    from selenium.webdriver.common.by import By

    browser_tests = sys.modules["test_viewer_browser"]
    browser_tests.open_view(driver, demo_run, "#image=0&det=0")
    driver.find_element(By.ID, "det-row-1").click()
    browser_tests.wait_ready(driver)
    assert not driver.find_element(By.ID, "token-view").is_displayed()
    assert driver.execute_script("return document.querySelectorAll('#token-view span').length") == 0


def test_a_long_prompt_wraps_and_continues_on_new_pages() -> None:
    """80 phrases x 12 detections: every token of every row is drawn, on the page, in prompt order."""
    from detection.attention.token_scores import TokenScores
    from detection.render.report_contents import ImageEntry
    from detection.render.report_pdf import PDF_PAGE

    phrases = tuple(f"phrase{c}" for c in range(80))
    tokens = tuple(word for c in range(80) for word in (f"word{c}", "thing"))
    rng = np.random.default_rng(0)
    scores = TokenScores(phrases=phrases, tokens=tokens, token_phrase=np.repeat(np.arange(80), 2),
                         scores=rng.normal(size=(12, 160)).astype(np.float32),
                         phrase_scores=rng.normal(size=(12, 80)).astype(np.float32),
                         token_method="hand-made", phrase_method="hand-made")
    detections = [{"bbox": [1, 2, 3, 4], "score": 0.5, "class_name": phrases[k], "query_index": 100 + k} for k in range(12)]
    entry = ImageEntry(file="long.png", image_id=1, width=10, height=10, detections=detections, stem=None,
                       overlay=None, token_scores=scores)
    pages = _image_pages(entry)
    assert len(pages) > 1
    drawn = [word.strip() for page in pages for _, _, _, _, word in page.texts if word.endswith(" ")]
    assert drawn == list(tokens) * 12
    for page in pages:
        assert all(0 < x and baseline + 5 <= PDF_PAGE[0] and x + width <= PDF_PAGE[1]
                   for x, baseline, _, width, _ in page.texts)
    numbers = [text for page in pages for _, _, _, _, text in page.texts if text.isdigit()]
    assert numbers == [str(v) for k in range(12) for v in (k, 100 + k)]  # each row once, in order
