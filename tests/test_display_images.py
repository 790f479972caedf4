"""Display images made in the decoding workers (engine.display): the overlays and the viewer's JPEG
written from them equal those written from the full-resolution image, pixel for pixel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.engine.display import DisplaySpec, make_display_images, viewer_image_jpeg
from detection.runfolder.grids import load_grids_npz
from detection.engine.image_files import OutputOptions
from tests.image_writing import write_like_predict
from detection.render.cell_overlays import overlay_base, render_overlays
from detection.engine.pending import held_arrays
from detection.engine.predictor import Predictor, PredictorSettings
from detection.runfolder.run_folder import RunFolder
from detection.data.sources import expand_sources
from detection.models.registry import build_model
from detection.data.image_codec import decode_image
from detection.render.panel import resize_image

SIZES = [(150, 200), (1000, 1300), (60, 80)]  # shrunk for the overlays; for the viewer too; neither


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(11)
    for index, (height, width) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"im{index}.png")
    return folder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("detr-tiny").eval()


def _written(folder: Path, results, options: OutputOptions, model) -> dict[str, bytes]:
    run = RunFolder(folder)
    run.open()
    for result in results:
        write_like_predict(run, result, options, model)
    run.close()
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.suffix in (".png", ".jpg")}


@pytest.mark.parametrize("overlay_size", [120, None])
def test_worker_display_images_give_the_same_files(tmp_path, images, model, overlay_size):
    options = OutputOptions(overlays=True, save_attention=True, overlay_size=overlay_size)
    common = dict(score_threshold=0.0, cross_attention=True, batch_size=2)
    full = {r.item.key: r for r in Predictor(model, PredictorSettings(keep_images=True, **common)).run([str(images)])}
    spec = DisplaySpec(overlays=True, overlay_size=overlay_size, viewer_jpeg=True)
    shown = {r.item.key: r for r in Predictor(model, PredictorSettings(num_workers=1, display=spec, **common)).run([str(images)])}
    assert sorted(full) == sorted(shown) and len(full) == len(SIZES)
    for key, result in shown.items():
        assert result.image is None  # the main process never got the full-resolution pixels
        height, width = full[key].image.shape[:2]
        expected = overlay_base(full[key].image, overlay_size)
        np.testing.assert_array_equal(result.display.overlay, expected)
        smaller = overlay_size is not None and max(height, width) > overlay_size
        assert result.display.overlay.shape[:2] == ((round(height * 120 / width), 120) if smaller else (height, width))
        assert result.display.viewer_jpeg == viewer_image_jpeg(full[key].image)
        assert torch.equal(result.detections.boxes, full[key].detections.boxes)
    before = _written(tmp_path / "full", full.values(), options, model)
    after = _written(tmp_path / "shown", shown.values(), options, model)
    assert sorted(before) == sorted(after) and len(before) > len(SIZES)
    for name in before:  # lossless files: equal decoded pixels
        np.testing.assert_array_equal(decode_image(after[name], name), decode_image(before[name], name))
    for key in full:
        old = load_grids_npz(tmp_path / "full" / "attention" / "grids" / f"{key}.npz")
        new = load_grids_npz(tmp_path / "shown" / "attention" / "grids" / f"{key}.npz")
        assert old.image_jpeg is not None and new.image_jpeg == old.image_jpeg


def test_display_images_are_what_was_asked_for():
    rgb = np.random.default_rng(2).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    made = make_display_images(rgb, DisplaySpec(overlays=True, overlay_size=100))
    np.testing.assert_array_equal(made.overlay, resize_image(rgb, (60, 100)))
    # what the pending-writes bound counts of it: the overlay base's bytes
    assert made.viewer_jpeg is None and sum(held_arrays(made).values()) == 60 * 100 * 3
    original = make_display_images(rgb, DisplaySpec(overlays=True, overlay_size=None, viewer_jpeg=True))
    assert original.overlay is rgb and original.viewer_jpeg == viewer_image_jpeg(rgb)
    assert make_display_images(rgb, DisplaySpec()).overlay is None
    with pytest.raises(ValueError, match="overlay size"):
        DisplaySpec(overlays=True, overlay_size=0)


def test_render_overlays_refuses_an_image_of_another_size(images, model):
    result = next(iter(Predictor(model, PredictorSettings(score_threshold=0.0, cross_attention=True, keep_images=True))
                       .run([str(images / "im0.png")])))
    cells = torch.rand(len(result.detections), 2, 3)
    geometry = {"feature_stride": 32, "input_size": (64, 96)}
    with pytest.raises(ValueError, match=r"neither the detections' image size \(150, 200\) nor the overlay size"):
        next(render_overlays(result.image[:100], result.detections, cells, geometry,
                             OutputOptions(overlays=True, overlay_size=120)))
