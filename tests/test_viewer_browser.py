"""The viewer in headless Chromium (Debian's chromium + chromium-driver, driven by selenium by path):
its upsampling equals `cells_to_image`, its canvas the Python overlay, real clicks and keys change the
view, and the URL hash reopens the same view. Skips (with the reason) only where chromium is absent."""
from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detection.attention.aggregate import normalize_maps
from detection.attention.maps import cells_to_image
from detection.cli import main as cli_main
from detection.runfolder.grids import AttentionGrids, MethodGrids, load_grids_npz, save_grids_npz
from detection.runfolder.reader import RunReader
from detection.runfolder.layout import grids_name
from detection.data.image_codec import encode_image
from detection.render.overlay import render_saliency
from detection.render.viewer import write_viewer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium / chromium-driver not installed (apt-get install -y chromium chromium-driver; .ci/run does)")
#: Where to copy the screenshot of test_hash_opens_the_view_the_clicks_made (docs/viewer.png for the README).
SCREENSHOT_COPY = os.environ.get("DETECTION_VIEWER_SCREENSHOT")


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer_browser")
    images = [str(REPO / "demo" / "images" / name) for name in ("shapes_3.png", "shapes_1.png")]
    assert cli_main(["predict", *images, "--out", str(root / "run"), "--workers", "0", "--quiet",
                     "--save-encoder-attention"]) == 0
    write_viewer(root / "run")
    return root / "run"


def start_chrome():
    """Headless Chromium at 1400 x 1000, scale factor 1, driven through Debian's chromedriver by path."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--force-device-scale-factor=1", "--window-size=1400,1000", "--hide-scrollbars"):
        options.add_argument(argument)
    previous = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # never let selenium-manager look for a driver online
    try:
        browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    finally:
        if previous is None:
            os.environ.pop("SE_OFFLINE", None)
        else:
            os.environ["SE_OFFLINE"] = previous
    return browser


@pytest.fixture(scope="module")
def driver():
    browser = start_chrome()
    yield browser
    browser.quit()


def open_view(driver, run: Path, hash_part: str = "") -> None:
    driver.get("about:blank")  # a new document: the hash alone decides the view
    driver.get((run / "report" / "viewer.html").as_uri() + hash_part)
    wait_ready(driver)


def wait_ready(driver) -> None:
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def canvas_pixels(driver, element_id: str = "map-canvas") -> np.ndarray:
    url = driver.execute_script(f"return document.getElementById('{element_id}').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def cells_of(grids: AttentionGrids, det: int, layer, head) -> np.ndarray:
    raw = grids.methods["raw"]
    row = raw.detections.index(det)
    per_head = np.stack([raw.grids[row, raw.slices.index((layer, h))] for h in range(grids.heads)])
    return per_head.mean(axis=0) if head == "mean" else per_head.max(axis=0)


def inside_only(boxes: list[list[float]], k: int, scale: float) -> tuple[int, int]:
    """A canvas pixel (x, y) inside box k and in no other box."""
    x0, y0, x1, y1 = (v * scale for v in boxes[k])
    for y in range(int(y0) + 3, int(y1) - 3):
        for x in range(int(x0) + 3, int(x1) - 3):
            if not any(b[0] * scale - 3 <= x <= b[2] * scale + 3 and b[1] * scale - 3 <= y <= b[3] * scale + 3
                       for j, b in enumerate(boxes) if j != k):
                return x, y
    raise AssertionError(f"box {k} lies inside others")


def click_canvas(driver, x: int, y: int) -> None:
    """A real mouse click at canvas pixel (x, y) (on the box layer above it)."""
    canvas = driver.find_element(By.ID, "map-canvas")
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(canvas, x - size["width"] // 2, y - size["height"] // 2) \
        .click().perform()


def move_away(driver) -> None:
    ActionChains(driver).move_to_element(driver.find_element(By.ID, "title")).perform()


def test_upsampling_equals_cells_to_image(driver, viewer: Path) -> None:
    open_view(driver, viewer)
    rng = np.random.default_rng(0)
    cases = [((7, 9), 16, (100, 130), (333, 217)), ((7, 9), 16, (100, 130), (50, 65)), ((1, 4), 32, (20, 100), (9, 41))]
    grids = load_grids_npz(viewer / grids_name("shapes_3"))
    real = cells_of(grids, 0, grids.layers - 1, "mean")
    cases.append((grids.valid_size, grids.feature_stride, grids.input_size,
                  tuple(driver.execute_script("return detrViewer.data.images[0].canvas"))))
    for index, (valid, stride, input_size, out_size) in enumerate(cases):
        cells = real if index == 3 else rng.random(valid).astype(np.float32)
        mine = np.array(driver.execute_script(
            "const a = Array.from(arguments); return Array.from(detrViewer.upsample(new Float32Array(a[0]), ...a.slice(1)))",
            cells.ravel().tolist(), *valid, stride, *input_size, *out_size), dtype=np.float32).reshape(out_size)
        theirs = cells_to_image(cells[None], stride, input_size, out_size)[0]
        assert np.abs(mine - theirs).max() <= 2e-6 * max(1.0, float(np.abs(theirs).max()))


def test_canvas_is_the_python_overlay_of_the_derived_view(driver, viewer: Path) -> None:
    grids = load_grids_npz(viewer / grids_name("shapes_3"))
    open_view(driver, viewer, "#image=0&det=1&layer=1&head=max&opacity=0")
    base = canvas_pixels(driver)  # opacity 0: the image as the page decoded it
    open_view(driver, viewer, "#image=0&det=1&layer=1&head=max&opacity=0.7")
    shown = canvas_pixels(driver)
    js_cells = np.array(driver.execute_script("return Array.from(detrViewer.cellGrid(0, 1, 'raw', 1, 'max'))"))
    cells = cells_of(grids, 1, 1, "max")
    np.testing.assert_allclose(js_cells, cells.ravel(), atol=1e-7)
    saliency = normalize_maps(cells_to_image(cells[None], grids.feature_stride, grids.input_size, base.shape[:2]))[0]
    expected = render_saliency(base, saliency, alpha=0.7)
    difference = np.abs(shown.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01  # round-half-up vs half-even only
    assert (np.abs(shown.astype(int) - base.astype(int)).max(axis=2) > 20).mean() > 0.02  # a map is shown
    # the layer mean of head maxima, derived in the page from the per-layer per-head slices
    derived = np.array(driver.execute_script("return Array.from(detrViewer.cellGrid(0, 1, 'raw', 'mean', 'max'))"))
    np.testing.assert_allclose(derived, np.mean([cells_of(grids, 1, layer, "max") for layer in range(grids.layers)],
                                                axis=0).ravel(), atol=1e-6)


def test_hover_and_click_change_the_map_where_the_map_is(driver, viewer: Path) -> None:
    grids = load_grids_npz(viewer / grids_name("shapes_3"))
    open_view(driver, viewer, "#image=0&det=0&opacity=0")
    base = canvas_pixels(driver)
    open_view(driver, viewer, "#image=0&det=0")
    move_away(driver)
    canvas = driver.find_element(By.ID, "map-canvas")
    before = png_pixels(canvas.screenshot_as_png)
    height, width = base.shape[:2]
    boxes = [d["box"] for d in driver.execute_script("return detrViewer.data.images[0].detections")]
    scale = width / grids.image_size[1]
    x, y = inside_only(boxes, 2, scale)
    click_canvas(driver, x, y)
    wait_ready(driver)
    assert driver.execute_script("return location.hash").startswith("#image=0&det=2&")
    move_away(driver)
    after = png_pixels(canvas.screenshot_as_png)

    maps = [normalize_maps(cells_to_image(cells_of(grids, k, grids.layers - 1, "mean")[None], grids.feature_stride,
                                          grids.input_size, (height, width)))[0] for k in (0, 2)]
    expected = [render_saliency(base, m, alpha=0.6).astype(int) for m in maps]
    near_box = np.zeros((height, width), bool)
    for box in boxes:  # outlines (their width changes with the selection) and their anti-aliasing
        x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
        for xs, ys in (((x0 - 4, x0 + 5), (y0 - 4, y1 + 5)), ((x1 - 4, x1 + 5), (y0 - 4, y1 + 5)),
                       ((x0 - 4, x1 + 5), (y0 - 4, y0 + 5)), ((x0 - 4, x1 + 5), (y1 - 4, y1 + 5))):
            near_box[max(0, ys[0]):ys[1], max(0, xs[0]):xs[1]] = True
    changed = np.abs(before - after).max(axis=2) > 0
    map_moved = (np.abs(expected[0] - expected[1]).max(axis=2) > 3) & ~near_box
    same = (expected[0] == expected[1]).all(axis=2) & ~near_box  # where neither map colours the image apart
    assert map_moved.sum() > 5000 and same.sum() > 5000
    assert changed[map_moved].mean() > 0.99
    # where Python's overlays of both detections agree, the screen agrees too (up to a rounding step)
    assert np.abs(before - after).max(axis=2)[same].max() <= 1 and changed[same].mean() < 0.03

    # hovering another detection previews its map without changing the view's state
    x, y = inside_only(boxes, 0, scale)
    ActionChains(driver).move_to_element_with_offset(canvas, x - width // 2, y - height // 2).perform()
    hovered = canvas_pixels(driver).astype(int)
    assert np.abs(hovered - expected[0])[~near_box].max() <= 1
    assert driver.execute_script("return location.hash").startswith("#image=0&det=2&")


def test_hash_opens_the_view_the_clicks_made(driver, viewer: Path, tmp_path: Path) -> None:
    open_view(driver, viewer)
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("\ue015")  # ArrowDown: next image
    wait_ready(driver)
    driver.find_element(By.ID, "prev-image").click()
    wait_ready(driver)
    boxes = [d["box"] for d in driver.execute_script("return detrViewer.data.images[0].detections")]
    scale = driver.find_element(By.ID, "map-canvas").size["width"] / driver.execute_script("return detrViewer.data.images[0].size[1]")
    click_canvas(driver, *inside_only(boxes, 3, scale))
    Select(driver.find_element(By.ID, "layer-select")).select_by_value("mean")
    Select(driver.find_element(By.ID, "head-select")).select_by_value("max")
    move_away(driver)
    assert driver.execute_script("return document.activeElement === document.body")  # selects hand keys back
    body.send_keys("-")  # opacity 0.6 -> 0.5
    driver.find_element(By.ID, "point-mode").click()
    click_canvas(driver, 150, 120)
    driver.find_element(By.ID, "point-mode").click()  # back to selecting detections (the mode is not a view)
    move_away(driver)
    wait_ready(driver)
    state = driver.execute_script("return detrViewer.state")
    size = driver.execute_script("return detrViewer.data.images[0].size")
    canvas_size = driver.execute_script("return detrViewer.data.images[0].canvas")
    assert {k: state[k] for k in ("image", "det", "layer", "head", "opacity")} == {
        "image": 0, "det": 3, "layer": "mean", "head": "max", "opacity": 0.5}
    assert state["point"] == [120 * size[0] // canvas_size[0], 150 * size[1] // canvas_size[1]]
    hash_part = driver.execute_script("return location.hash")
    assert hash_part == (f"#image=0&det=3&method=raw&layer=mean&head=max&opacity=0.5"
                         f"&point={state['point'][0]},{state['point'][1]}")
    shots = {name: driver.find_element(By.ID, name).screenshot_as_png for name in ("stage", "encoder", "det-table")}
    pixels = {name: canvas_pixels(driver, name) for name in ("map-canvas", "enc-out", "enc-in")}
    page = tmp_path / "viewer.png"
    driver.save_screenshot(str(page))
    if SCREENSHOT_COPY:
        shutil.copyfile(page, SCREENSHOT_COPY)

    open_view(driver, viewer, hash_part)
    assert driver.execute_script("return detrViewer.state") == state
    for name, shot in shots.items():
        np.testing.assert_array_equal(png_pixels(driver.find_element(By.ID, name).screenshot_as_png), png_pixels(shot))
    for name, expected in pixels.items():
        np.testing.assert_array_equal(canvas_pixels(driver, name), expected)
    assert Select(driver.find_element(By.ID, "head-select")).first_selected_option.get_attribute("value") == "max"
    assert driver.find_element(By.ID, "encoder").is_displayed()


def test_keyboard_navigation(driver, viewer: Path) -> None:
    open_view(driver, viewer, "#image=0&det=0&layer=2&head=mean&point=10,10")
    body = driver.find_element(By.TAG_NAME, "body")
    for keys, expected in (("\ue014", "det=1&"), ("\ue012\ue012", "det=3&"), ("l", "layer=mean&"),
                           ("l", "layer=rollout&"), ("L", "layer=mean&"), ("h", "head=max&"), ("+", "opacity=0.7"),
                           ("\ue00c", "opacity=0.7"), ("\ue015", "image=1&det=0&")):
        body.send_keys(keys)
        wait_ready(driver)
        assert expected in driver.execute_script("return location.hash"), keys
    assert "point=" not in driver.execute_script("return location.hash")  # Escape cleared it


def test_nothing_is_fetched(driver, viewer: Path) -> None:
    open_view(driver, viewer, "#image=1")
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith("data:") for name in names), names


def test_only_what_was_saved_is_offered(driver, viewer: Path, tmp_path: Path) -> None:
    """A sampled record (no rollout, no encoder) whose budget kept 1 of 4 detections, head means only, and a
    second method without layer / head axes."""
    run = tmp_path / "run"
    shutil.copytree(viewer, run, ignore=shutil.ignore_patterns("report"))
    reader = RunReader(run)
    row = reader.predictions()[0]
    original = load_grids_npz(reader.grids(row["key"]))
    valid = original.valid_size
    cells = np.random.default_rng(1).random((1, 3, *valid)).astype(np.float32)
    save_grids_npz(reader.grids(row["key"]), AttentionGrids(
        image_size=original.image_size, input_size=original.input_size, feature_stride=original.feature_stride,
        valid_size=valid, kind="sampled", layers=3, heads=8, detail="layer_mean",
        methods={"raw": MethodGrids(cells, [(0, "mean"), (1, "mean"), (2, "mean")], [1]),
                 "relevance": MethodGrids(cells[:, :1] * 2, [("all", "all")], [1])},  # no layer / head axis
        image_jpeg=encode_image(np.full((20, 30, 3), 128, np.uint8), ".jpg")))
    write_viewer(run)
    open_view(driver, run, "#image=0&det=1&layer=rollout&head=3&point=5,5")
    layers = [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "layer-select")).options]
    heads = [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "head-select")).options]
    assert layers == ["0", "1", "2", "mean"] and heads == ["mean"]
    assert driver.execute_script("return location.hash") == "#image=0&det=1&method=raw&layer=2&head=mean&opacity=0.6"
    assert not driver.find_element(By.ID, "point-mode").is_displayed()
    assert not driver.find_element(By.ID, "encoder").is_displayed()
    assert "(no map saved)" in driver.find_element(By.ID, "det-row-0").text
    assert "no rollout" in driver.find_element(By.ID, "notes").text
    Select(driver.find_element(By.ID, "method-select")).select_by_value("relevance")
    wait_ready(driver)
    assert driver.execute_script("return location.hash") == "#image=0&det=1&method=relevance&layer=all&head=all&opacity=0.6"
    assert not driver.find_element(By.ID, "layer-select").is_displayed()
    assert not driver.find_element(By.ID, "head-select").is_displayed()
    shown = driver.execute_script("return Array.from(detrViewer.cellGrid(0, 1, 'relevance', 'all', 'all'))")
    np.testing.assert_allclose(shown, (cells[0, 0] * 2).astype(np.float16).astype(np.float32).ravel())
