"""`detr-attn predict` on HF folders gives the detections of HF's own pipeline (its image processor,
model and post_process_object_detection at the same threshold), for every wrapped family, with
small random ("lively") weights; padded batches match single images where the family pads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import hf_dense_models  # noqa: E402
import hf_sampled_models  # noqa: E402

from detection.cli import main  # noqa: E402
from detection.engine.predictor import Predictor, PredictorSettings  # noqa: E402
from detection.models.registry import load_model  # noqa: E402

transformers.logging.set_verbosity_error()

SHORT = {"size": {"shortest_edge": 64, "longest_edge": 96}}
FIXED = {"size": {"height": 64, "width": 64}}
# (builder module, variant) -> (processor class, its options)
CASES = {
    "yolos": (hf_dense_models, "YolosImageProcessor", SHORT),
    "conditional_detr": (hf_dense_models, "ConditionalDetrImageProcessor", SHORT),
    "dab-detr": (hf_dense_models, "ConditionalDetrImageProcessor", SHORT),
    "table-transformer": (hf_dense_models, "DetrImageProcessor", SHORT),
    "deformable_detr": (hf_sampled_models, "DeformableDetrImageProcessor", SHORT),
    "deformable_detr_box_refine": (hf_sampled_models, "DeformableDetrImageProcessor", SHORT),
    "deformable_detr_two_stage": (hf_sampled_models, "DeformableDetrImageProcessor", SHORT),
    "rt_detr": (hf_sampled_models, "RTDetrImageProcessor", FIXED),
    "rt_detr_v2": (hf_sampled_models, "RTDetrImageProcessor", FIXED),
    "rt_detr_v2_discrete": (hf_sampled_models, "RTDetrImageProcessor", FIXED),
    "d_fine": (hf_sampled_models, "RTDetrImageProcessor", FIXED),
    "rf_detr": (hf_sampled_models, "RfDetrImageProcessor", FIXED),
    "deimv2": (hf_sampled_models, "RTDetrImageProcessor", FIXED),
    "deimv2_dinov3": (hf_sampled_models, "RTDetrImageProcessor", FIXED),
    "deimv2_lite": (hf_sampled_models, "RTDetrImageProcessor", FIXED),
    "lw_detr": (hf_sampled_models, "DeformableDetrImageProcessor", FIXED),
}
IMAGE_SIZES = [(70, 90), (100, 61)]


def hf_folder(variant: str, folder: Path) -> Path:
    """Save a small lively model of `variant` and its processor as a Hub-style folder."""
    module, processor_class, options = CASES[variant]
    model = hf_sampled_models.build_lively(variant) if module is hf_sampled_models else module.build(variant)
    model.save_pretrained(folder)
    getattr(transformers, processor_class)(**options).save_pretrained(folder)
    return folder


def write_images(folder: Path, sizes=IMAGE_SIZES) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for index, (height, width) in enumerate(sizes):
        # smooth blobs rather than noise: resizing noise is where processors differ most
        base = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(base).resize((width, height), Image.BILINEAR))
        path = folder / f"img{index}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def hf_pipeline(folder: Path, image_path: Path, threshold: float) -> dict[str, torch.Tensor]:
    """HF's own path: AutoImageProcessor, the model (eager), post_process_object_detection."""
    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = transformers.AutoModelForObjectDetection._model_mapping[type(config)]
    model = model_class.from_pretrained(folder, attn_implementation="eager").eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=[image.shape[:2]])[0]


def threshold_in_a_gap(folder: Path, image_path: Path) -> float:
    """A threshold in the widest gap between consecutive scores, keeping at least 2 and at
    most 2/3 of the candidates (so that a flip at the threshold cannot happen silently)."""
    scores = np.sort(hf_pipeline(folder, image_path, threshold=-1.0)["scores"].numpy())[::-1]
    gaps = scores[:-1] - scores[1:]
    first, last = 1, max(2, (2 * len(scores)) // 3)
    cut = first + int(np.argmax(gaps[first:last]))
    assert gaps[cut] > 2e-4, "scores too close together to place a threshold safely"
    return float((scores[cut] + scores[cut + 1]) / 2)


@pytest.mark.parametrize("variant", list(CASES))
def test_predict_matches_the_hf_pipeline(tmp_path, variant: str) -> None:
    folder = hf_folder(variant, tmp_path / "model")
    images = write_images(tmp_path / "images")
    threshold = threshold_in_a_gap(folder, images[0])
    out = tmp_path / "run"
    assert main(["predict", str(tmp_path / "images"), "--model", str(folder), "--out", str(out),
                 "--score-threshold", str(threshold), "--device", "cpu", "--precision", "fp32",
                 "--workers", "0", "--quiet"]) == 0
    lines = {json.loads(line)["file"]: json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()}
    run = json.loads((out / "run.json").read_text())
    assert str(folder.resolve()) in json.dumps(run)  # the local path is recorded
    compared = 0
    for image_path in images:
        expected = hf_pipeline(folder, image_path, threshold)
        ours = next(v for k, v in lines.items() if k.endswith(image_path.name))["detections"]
        assert len(ours) == len(expected["scores"]) > 0, variant
        order = torch.argsort(expected["scores"], descending=True, stable=True)
        for rank, k in enumerate(order.tolist()):
            mine = ours[rank]
            x0, y0, x1, y1 = expected["boxes"][k].tolist()
            assert abs(mine["score"] - float(expected["scores"][k])) <= 1e-4
            assert mine["category_id"] == int(expected["labels"][k])
            assert np.abs(np.array(mine["bbox"]) - np.array([x0, y0, x1 - x0, y1 - y0])).max() <= 0.05
            compared += 1
    assert compared >= 2


PADDING_FAMILIES = [v for v, (_, _, options) in CASES.items()
                    if "shortest_edge" in options["size"] and v != "yolos"]


@pytest.mark.parametrize("variant", PADDING_FAMILIES)
def test_padded_batches_match_the_hf_batched_pipeline(tmp_path, variant: str) -> None:
    """A padded batch of two sizes runs as HF's processor batches it (zero padding + pixel_mask).

    Padded vs single images is a property of the weights (a CNN's border activations change
    under padding): with these random weights it is far outside DETR's tolerance, see
    README "HF families"; what is checked here is that padding is handled as HF handles it."""
    folder = hf_folder(variant, tmp_path / "model")
    model = load_model(folder)
    assert model.supports_padding
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in write_images(tmp_path / "images")]
    predictor = Predictor(model, PredictorSettings(score_threshold=0.0, batching="padded", batch_size=2))
    ours, _ = predictor.predict_arrays(arrays)
    config = transformers.AutoConfig.from_pretrained(folder)
    hf = transformers.AutoModelForObjectDetection._model_mapping[type(config)].from_pretrained(
        folder, attn_implementation="eager").eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    inputs = processor(images=arrays, return_tensors="pt")
    assert inputs["pixel_mask"].float().mean() < 1  # really padded
    with torch.no_grad():
        outputs = hf(**inputs)
    expected = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[a.shape[:2] for a in arrays])
    for mine, theirs in zip(ours, expected):
        order = torch.argsort(theirs["scores"], descending=True, stable=True)[:10]
        assert torch.allclose(mine.scores[:10], theirs["scores"][order], atol=1e-4)
        assert (mine.boxes[:10] - theirs["boxes"][order]).abs().max() <= 0.05
        assert torch.equal(mine.labels[:10], theirs["labels"][order])


def test_families_without_padding_refuse_padded_batching(tmp_path) -> None:
    model = load_model(hf_folder("rt_detr", tmp_path / "model"))
    assert not model.supports_padding
    with pytest.raises(ValueError, match="batching 'exact'"):
        Predictor(model, PredictorSettings(batching="padded"))
