"""`detr-attn predict --explain` (issue #13): each method's saved maps are that method's maps of the
same detections computed directly with the library functions; D-RISE is stored on its pooled grid;
refusals are usage errors that write nothing; the fingerprint names the methods only with --explain."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detection.attention.aggregate import normalize_maps
from detection.attention.drise_saliency import DriseOptions, downsample_factor, drise_saliency, pool_saliency
from detection.attention.gradients import attn_grad_maps, relevance_maps
from detection.attention.maps import cells_to_image, detection_maps
from detection.runfolder.maps_npz import load_maps_npz
from detection.cli import main
from detection.data.images import load_image
from detection.data.preprocess import image_to_input, pad_batch
from detection.runfolder.journal import read_journal
from detection.models.registry import load_model
from detection.render.overlay import render_detection_overlay
from detection.structures import Detections

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "demo" / "images"
DRISE = ["--drise-masks", "12", "--drise-grid", "4", "--drise-seed", "3"]


def _predict(out: Path, *extra: str, images: tuple[str, ...] = ("shapes_1.png", "shapes_3.png")) -> int:
    return main(["predict", *(str(DEMO_IMAGES / name) for name in images), "--model", "demo", "--out", str(out),
                 "--device", "cpu", "--precision", "fp32", "--workers", "0", "--quiet", *extra])


@pytest.fixture(scope="module")
def explained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict_explain") / "run"
    assert _predict(out, "--overlays", "--explain", "raw,rollout,attn-grad,relevance,drise", *DRISE) == 0
    return out


@pytest.fixture(scope="module")
def model():
    return load_model("demo").eval()


def _inputs(model, file: str):
    loaded = load_image(file)
    images, mask = pad_batch([image_to_input(loaded.rgb, model.preprocess_spec)], model.preprocess_spec.size_divisibility)
    return loaded, images, mask


def test_each_methods_saved_maps_are_its_maps_computed_directly(explained_run: Path, model) -> None:
    records = read_journal(explained_run / "predictions.jsonl")
    assert sum(len(r["detections"]) for r in records) >= 3
    for record in records:
        key = record["key"]
        assert record["methods"] == {m: f"attention/{m}/{key}.npz" for m in ("rollout", "attn-grad", "relevance", "drise")}
        loaded, images, mask = _inputs(model, record["file"])
        queries = torch.tensor([d["query_index"] for d in record["detections"]])
        labels = torch.tensor([d["label"] for d in record["detections"]])
        size = loaded.original_size
        input_size = tuple(int(v) for v in (~mask[0]).nonzero().max(dim=0).values + 1)
        with torch.no_grad():
            outputs = model(images, mask, cross_attention=True, decoder_self_attention=True, encoder_attention=True)
        direct = {
            "rollout": detection_maps(outputs["attention"], 0, queries, size, heads="mean", layers="rollout"),
            "attn-grad": normalize_maps(cells_to_image(attn_grad_maps(model, images, mask, 0, queries, labels),
                                                       model.feature_stride, input_size, size)),
            "relevance": normalize_maps(cells_to_image(relevance_maps(model, images, mask, 0, queries, labels),
                                                       model.feature_stride, input_size, size)),
        }
        for method, expected in direct.items():
            maps, meta = load_maps_npz(explained_run / record["methods"][method])
            assert meta["method"] == method and meta["key"] == key and meta["normalize"] == "minmax"
            assert meta["query_index"] == queries.tolist()
            assert maps.shape == (len(queries), *size)
            assert np.abs(maps - expected).max() <= 2e-3  # float16 storage, BN folded in the engine's copy
        # D-RISE: the pooled grid of the saliency, from the same masks, un-normalised in float32
        grid, meta = load_maps_npz(explained_run / record["methods"]["drise"], size=None)
        options = DriseOptions(num_masks=12, grid_size=4, seed=3)
        scale = torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32)
        saliency = drise_saliency(lambda x, m: model(x, m), images[0, :, :input_size[0], :input_size[1]],
                                  torch.tensor(meta["boxes"]) / scale, labels, model.preprocess_spec,
                                  model.postprocess_rule, options)
        factor = downsample_factor(input_size, options.max_side)
        expected = pool_saliency(saliency, factor).numpy()
        assert meta["method"] == "drise" and meta["feature_stride"] == factor and meta["input_size"] == list(input_size)
        assert grid.shape == expected.shape and np.abs(grid - expected).max() <= 1e-4 * max(1.0, expected.max())
        # at the original size: the one resize path, then the run's normalisation
        image_maps, _ = load_maps_npz(explained_run / record["methods"]["drise"])
        np.testing.assert_allclose(image_maps, normalize_maps(cells_to_image(grid, factor, input_size, size)), atol=1e-6)


def test_per_method_overlays_draw_the_saved_maps(explained_run: Path) -> None:
    record = read_journal(explained_run / "predictions.jsonl")[0]
    key = record["key"]
    rgb = load_image(record["file"]).rgb
    maps, meta = load_maps_npz(explained_run / record["methods"]["relevance"])
    detections = Detections(image_size=tuple(meta["image_size"]), boxes=torch.tensor(meta["boxes"]),
                            scores=torch.tensor(meta["scores"]), labels=torch.tensor(meta["labels"]),
                            query_index=torch.tensor(meta["query_index"]), class_names=meta["class_names"])
    for k in range(len(detections)):
        written = cv2.cvtColor(cv2.imread(str(explained_run / "overlays" / key / f"det_{k}.relevance.png")),
                               cv2.COLOR_BGR2RGB)
        expected = render_detection_overlay(rgb, detections[k], maps[k])
        # float16 storage moves a few colormap steps by one
        assert np.mean(np.abs(written.astype(int) - expected.astype(int)) > 2) < 0.01
        assert (explained_run / "overlays" / key / f"det_{k}.raw.png").is_file()  # raw's, as without --explain
    # one folder per image, each file named by its detection and the method that drew it
    assert sorted(p.name for p in (explained_run / "overlays" / key).iterdir()) == sorted(
        f"det_{k}.{method}.png" for k in range(len(record["detections"]))
        for method in ("raw", "relevance", "rollout", "attn-grad", "drise"))


def test_drise_is_stored_on_a_grid_of_long_side_at_most_max_side(tmp_path) -> None:
    # a 600 px input (min side 160 -> the demo model upsamples): max_side 64 -> pooled by 4
    image = np.zeros((480, 640, 3), np.uint8)
    cv2.circle(image, (320, 240), 120, (255, 255, 255), -1)
    cv2.imwrite(str(tmp_path / "disc.png"), image)
    out = tmp_path / "run"
    assert main(["predict", str(tmp_path / "disc.png"), "--model", "demo", "--out", str(out), "--device", "cpu",
                 "--precision", "fp32", "--workers", "0", "--quiet", "--score-threshold", "0.3", "--explain", "drise",
                 "--drise-masks", "4", "--drise-grid", "4"]) == 0
    record = read_journal(out / "predictions.jsonl")[0]
    assert record["detections"], "the demo model should find the disc"
    grid, meta = load_maps_npz(out / record["methods"]["drise"], size=None)
    assert max(grid.shape[1:]) <= 256 and meta["image_size"] == [480, 640]
    assert meta["feature_stride"] == downsample_factor(meta["input_size"], 256)
    assert grid.shape[1:] == tuple(-(-v // meta["feature_stride"]) for v in meta["input_size"])
    assert "attention" not in record and not (out / "attention" / "disc.npz").exists()  # no --save-attention


def test_fingerprint_names_the_methods_only_with_explain(tmp_path) -> None:
    plain = tmp_path / "plain"
    assert _predict(plain, "--save-attention", images=("shapes_2.png",)) == 0
    fingerprint = json.loads((plain / "run.json").read_text())["fingerprint"]
    assert "explain" not in fingerprint
    assert "methods" not in read_journal(plain / "predictions.jsonl")[0]
    # a run without --explain resumes as before; adding --explain to it is refused (other settings)
    assert _predict(plain, "--save-attention", images=("shapes_2.png",)) == 0
    assert _predict(plain, "--save-attention", "--explain", "raw,relevance", images=("shapes_2.png",)) == 2
    explained = tmp_path / "explained"
    assert _predict(explained, "--explain", "raw,relevance,drise", *DRISE, images=("shapes_2.png",)) == 0
    entry = json.loads((explained / "run.json").read_text())["fingerprint"]["explain"]
    assert entry["methods"] == ["raw", "relevance", "drise"]
    assert entry["drise"]["num_masks"] == 12 and entry["drise"]["precision"] == "fp32"
    assert _predict(explained, "--explain", "raw,relevance,drise", *DRISE[:-1], "4", images=("shapes_2.png",)) == 2


def test_a_method_that_does_not_apply_is_a_usage_error_that_writes_nothing(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    from test_hf_equivalence import hf_folder

    folder = hf_folder("rt_detr", tmp_path / "model")
    out = tmp_path / "run"
    assert main(["predict", str(DEMO_IMAGES / "shapes_1.png"), "--model", str(folder), "--out", str(out), "--device",
                 "cpu", "--workers", "0", "--quiet", "--explain", "raw,relevance"]) == 2
    message = capsys.readouterr().err
    assert "'relevance' does not apply to the RT-DETR family" in message
    assert "methods that apply: raw, attn-grad, drise, in-box" in message
    assert not out.exists()


def test_export_takes_the_maps_of_a_saved_method(explained_run: Path, tmp_path) -> None:
    """export --method M: each COCO mask is the Otsu mask of that method's saved map; a method the
    run did not save (and raw without --save-attention) is a clear error naming the option."""
    from detection.attention.metrics import encode_mask, explanation_mask

    out = tmp_path / "relevance.json"
    assert main(["export", str(explained_run), "--format", "coco-masks", "--out", str(out),
                 "--method", "relevance"]) == 0
    results = json.loads(out.read_text())
    expected = []
    for record in read_journal(explained_run / "predictions.jsonl"):
        maps, _ = load_maps_npz(explained_run / record["methods"]["relevance"])
        expected += [encode_mask(explanation_mask(saliency)) for saliency in maps]
    assert [entry["segmentation"] for entry in results] == expected and expected
    fiftyone = tmp_path / "fo"
    assert main(["export", str(explained_run), "--format", "fiftyone", "--out", str(fiftyone), "--method", "drise"]) == 0
    assert (fiftyone / "samples.json").is_file()
    assert main(["export", str(explained_run), "--format", "coco-masks", "--out", str(tmp_path / "raw.json")]) == 2
    assert not (tmp_path / "raw.json").exists()  # no --save-attention in this run: raw maps were not saved
