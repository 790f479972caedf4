"""detection.explain: one call equals the Predictor path + detection_maps + render, for every input kind."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

import detection
from detection import api
from detection.api import Explanation, ExplanationError, explain
from detection.attention.maps import detection_maps
from detection.runfolder.maps_npz import load_maps_npz
from detection.engine.predictor import Predictor, PredictorSettings
from detection.models.registry import load_model
from detection.data.image_codec import decode_image
from detection.render.overlay import render_overlay
from detection.render.panel import render_panel

IMAGES = sorted((Path(__file__).resolve().parents[1] / "demo" / "images").glob("*.png"))


@pytest.fixture(scope="module")
def reference() -> list[tuple]:
    """(rgb, detections, maps) of each demo image through Predictor + detection_maps."""
    predictor = Predictor(load_model("demo"), PredictorSettings(device="cpu", cross_attention=True, keep_images=True,
                                                                last_layer_only=True))
    out = []
    for result in predictor.run([str(p) for p in IMAGES]):
        det = result.detections
        out.append((result.image, det, detection_maps(result.attention, 0, det.query_index, det.image_size)))
    return out


@pytest.fixture(scope="module")
def explained() -> list[Explanation]:
    return list(explain([str(p) for p in IMAGES], device="cpu"))


def _same_detections(a, b) -> None:
    assert a.image_size == b.image_size
    for name in ("boxes", "scores", "labels", "query_index"):
        assert torch.equal(torch.as_tensor(a.get(name)), torch.as_tensor(b.get(name))), name
    assert list(a.class_names) == list(b.class_names)


def test_maps_overlay_and_panel_equal_the_predictor_path(reference, explained) -> None:
    assert len(explained) == len(reference) == 4
    assert sum(len(e.detections) for e in explained) > 4
    for explanation, (rgb, det, maps), path in zip(explained, reference, IMAGES):
        assert explanation.source == str(path) and explanation.error is None
        _same_detections(explanation.detections, det)
        np.testing.assert_array_equal(explanation.image, rgb)
        assert explanation.maps.shape == (len(det), *rgb.shape[:2])
        np.testing.assert_array_equal(explanation.maps, maps)
        np.testing.assert_array_equal(explanation.map(0), maps[0])
        np.testing.assert_array_equal(explanation.overlay(), render_overlay(rgb, det, maps))
        np.testing.assert_array_equal(explanation.panel(), render_panel(rgb, det, maps))


def test_paths_arrays_and_pil_images_give_identical_results(explained) -> None:
    path = IMAGES[2]
    rgb = np.array(Image.open(path).convert("RGB"))
    from_array = explain(rgb, device="cpu")
    from_pil = explain(Image.open(path), device="cpu")
    assert (from_array.source, from_pil.source) == ("array #0", "PIL image #0")
    for other in (from_array, from_pil):
        _same_detections(other.detections, explained[2].detections)
        np.testing.assert_array_equal(other.maps, explained[2].maps)
        np.testing.assert_array_equal(other.overlay(), explained[2].overlay())


def test_lists_yield_as_they_go_and_a_bad_image_is_named(tmp_path: Path, explained) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    consumed = []

    def inputs():
        for item in (str(IMAGES[0]), str(broken), np.zeros((4, 4), np.float32), Image.open(IMAGES[1])):
            consumed.append(item)
            yield item

    results = explain(inputs(), device="cpu")
    assert isinstance(results, Iterator) and consumed == []
    first = next(results)
    assert len(consumed) == 1
    np.testing.assert_array_equal(first.maps, explained[0].maps)
    bad_file, bad_array, last = list(results)
    assert bad_file.source == str(broken) and str(broken) in bad_file.error
    assert bad_array.error.startswith("array #2: expected a uint8 (H, W, 3) RGB array")
    with pytest.raises(ExplanationError, match="broken.png"):
        bad_file.maps
    assert bad_file._repr_png_() is None
    np.testing.assert_array_equal(last.maps, explained[1].maps)
    with pytest.raises(ExplanationError, match=r"broken\.png"):
        explain(broken, device="cpu")  # a single image raises at once
    with pytest.raises(ExplanationError, match="names several images"):
        explain(IMAGES[0].parent, device="cpu")  # a folder is a list: explain([folder])
    in_folder = explain([IMAGES[0].parent], device="cpu")
    assert [e.source for e in in_folder] == [str(p) for p in IMAGES]


def test_a_named_model_loads_once_and_a_model_object_is_used_as_given(monkeypatch, explained) -> None:
    api.clear_model_cache()
    calls = []

    def counting_load(name, **options):
        calls.append(name)
        return load_model(name, **options)

    monkeypatch.setattr(api, "load_model", counting_load)
    first = explain(IMAGES[0], device="cpu")
    second = explain(IMAGES[0], device="cpu", score_threshold=0.5)
    assert calls == ["demo"]
    assert len(second.detections) >= len(first.detections)
    given = explain(IMAGES[0], model=load_model("demo"), device="cpu")
    assert calls == ["demo"] and len(api._MODELS) == 1
    np.testing.assert_array_equal(given.maps, explained[0].maps)
    api.clear_model_cache()


def test_save_and_notebook_png(tmp_path: Path, explained) -> None:
    explanation = explained[1]
    maps, meta = load_maps_npz(explanation.save(tmp_path / "maps.npz"))
    np.testing.assert_array_equal(maps, explanation.maps)  # stored as cells: exact at the original size
    assert meta["file"] == explanation.source and meta["layers"] == "last"
    saved = decode_image(explanation.save(tmp_path / "overlay.png").read_bytes())
    np.testing.assert_array_equal(saved, explanation.overlay())
    panel = decode_image(explanation.save(tmp_path / "panel.png", kind="panel").read_bytes())
    np.testing.assert_array_equal(panel, explanation.panel())
    np.testing.assert_array_equal(decode_image(explanation._repr_png_()), explanation.overlay())


def test_rollout_method_and_lazy_exports() -> None:
    assert detection.explain is explain and detection.Explanation is Explanation
    with pytest.raises(ValueError, match="method must be one of"):
        explain(IMAGES[0], method="gradcam")
    predictor = Predictor(load_model("demo"), PredictorSettings(device="cpu", cross_attention=True, rollout=True))
    (result,) = predictor.run([str(IMAGES[3])])
    det = result.detections
    expected = detection_maps(result.attention, 0, det.query_index, det.image_size, layers="rollout")
    explanation = explain(IMAGES[3], method="rollout", device="cpu")
    np.testing.assert_array_equal(explanation.maps, expected)


def test_to_supervision_matches_our_fields(explained) -> None:
    sv = pytest.importorskip("supervision", reason="supervision (the [export] extra) is not installed")
    from detection.structures import Detections

    for explanation in explained[:2]:
        det = explanation.detections
        height, width = det.image_size
        # move the boxes past every border so that clipping is exercised
        moved = Detections(det.image_size, boxes=det.boxes + torch.tensor([-1000.0, -1000.0, 1000.0, 1000.0]),
                           scores=det.scores, labels=det.labels, query_index=det.query_index,
                           class_names=list(det.class_names))
        for source, boxes in ((explanation, det.boxes), (Explanation(explanation.source, image=explanation.image,
                              detections=moved, attention=explanation.attention), moved.boxes)):
            result = source.to_supervision()
            assert isinstance(result, sv.Detections) and len(result) == len(det)
            np.testing.assert_array_equal(result.xyxy, sv.clip_boxes(boxes.numpy(), (width, height)))
            np.testing.assert_array_equal(result.confidence, det.scores.numpy())
            np.testing.assert_array_equal(result.class_id, det.labels.numpy())
            assert list(result.data["class_name"]) == list(det.class_names)
            np.testing.assert_array_equal(result.data["query_index"], det.query_index.numpy())
            np.testing.assert_array_equal(result.data["saliency"], explanation.maps)
            keep = result.confidence > 0.9  # supervision's own filtering keeps our data aligned
            np.testing.assert_array_equal(result[keep].data["saliency"], explanation.maps[keep])
        assert (result.xyxy[:, 2:] == [width, height]).all() and (result.xyxy[:, :2] == 0).all()


def test_gradient_methods_equal_the_library_functions(tmp_path: Path) -> None:
    """explain(method="relevance" | "attn-grad"): the maps are the library functions' cells of the
    same detections, through the one resize path and normalised; save(.npz) gives them back."""
    from detection.attention.aggregate import normalize_maps
    from detection.attention.gradients import attn_grad_maps, relevance_maps
    from detection.attention.maps import cells_to_image
    from detection.data.images import load_image
    from detection.data.preprocess import image_to_input, pad_batch

    model = load_model("demo").eval()
    loaded = load_image(IMAGES[0])
    images, mask = pad_batch([image_to_input(loaded.rgb, model.preprocess_spec)], model.preprocess_spec.size_divisibility)
    input_size = tuple(int(v) for v in (~mask[0]).nonzero().max(dim=0).values + 1)
    for method, function in (("relevance", relevance_maps), ("attn-grad", attn_grad_maps)):
        explanation = explain(IMAGES[0], model=model, method=method, device="cpu")
        detections = explanation.detections
        assert len(detections) > 0 and explanation.method == method
        cells = function(model, images, mask, 0, detections.query_index, detections.labels)
        expected = normalize_maps(cells_to_image(cells, model.feature_stride, input_size, loaded.original_size))
        np.testing.assert_allclose(explanation.maps, expected, atol=1e-4)
        maps, meta = load_maps_npz(explanation.save(tmp_path / f"{method}.npz"))
        assert meta["method"] == method
        np.testing.assert_allclose(maps, explanation.maps, atol=1e-6)
    with pytest.raises(ValueError, match="method must be one of"):
        explain(IMAGES[0], model=model, method="gradcam")


def test_a_method_the_family_lacks_is_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from test_hf_equivalence import hf_folder

    model = load_model(hf_folder("rt_detr", tmp_path / "model"))
    with pytest.raises(ValueError, match="'relevance' does not apply to the RT-DETR family.*raw, attn-grad, drise, in-box"):
        explain(IMAGES[0], model=model, method="relevance", device="cpu")


def test_overlay_options_draw_through_predicts_renderer_as_render_overlay_does(explained) -> None:
    """`Explanation.overlay` draws from the cells with predict's renderer; with every drawing
    option it equals `render_overlay` of the full-resolution maps, pixel for pixel."""
    options = {"alpha": 0.35, "contour_mass": 0.5, "show_labels": False, "display_width": 400}
    for explanation in explained:
        drawn = explanation.overlay(**options)
        expected = render_overlay(explanation.image, explanation.detections, explanation.maps, **options)
        np.testing.assert_array_equal(drawn, expected)
        assert not np.array_equal(drawn, explanation.overlay())  # the options changed the picture
