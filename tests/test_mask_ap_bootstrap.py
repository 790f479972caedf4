"""Bootstrap intervals of explanation-mask AP (issue 23): the vectorised accumulate over resampled
images equals pycocotools' own evaluation, for the whole set and for a resample with repeats (checked
against a data set in which the repeated images are real copies)."""
from __future__ import annotations

import numpy as np
import pytest

from detection.attention.mask_ap import mask_ap, mask_ap_resamples
from detection.attention.metrics import FaithfulnessAccumulator, encode_mask


def _random_set(seed: int, images: int = 7, size: int = 24):
    """GT rectangles and noisy detection masks with scores over `images` images and 2 categories."""
    rng = np.random.default_rng(seed)
    dataset = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    results = []
    for image_id in range(1, images + 1):
        dataset["images"].append({"id": image_id, "width": size, "height": size, "file_name": f"{image_id}.png"})
        for _ in range(int(rng.integers(0, 3))):
            x, y = (int(v) for v in rng.integers(0, size - 8, 2))
            w, h = (int(v) for v in rng.integers(4, 9, 2))
            category = int(rng.integers(1, 3))
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id, "category_id": category,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            for _ in range(int(rng.integers(1, 3))):  # a noisy copy, sometimes of the wrong category
                mask = np.zeros((size, size), bool)
                dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
                mask[max(y + dy, 0):y + dy + h, max(x + dx, 0):x + dx + w] = True
                results.append({"image_id": image_id, "category_id": category if rng.random() < 0.8 else 3 - category,
                                "segmentation": encode_mask(mask), "score": float(rng.random())})
        if rng.random() < 0.5:  # a false positive
            mask = np.zeros((size, size), bool)
            mask[2:6, 2:9] = True
            results.append({"image_id": image_id, "category_id": 1, "segmentation": encode_mask(mask),
                            "score": float(rng.random())})
    return dataset, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_identity_draw_is_pycocotools_exactly(seed):
    dataset, results = _random_set(seed)
    ids = [image["id"] for image in dataset["images"]][::-1]  # any order: evaluate() sorts them
    expected = mask_ap(dataset, results, ids, [1, 2])
    figures, got = mask_ap_resamples(dataset, results, ids, [1, 2], np.arange(len(ids))[None])
    assert {name: float(values[0]) for name, values in got.items()} == expected
    assert figures == expected  # the whole set's figures from the same matching
    assert expected["mask_ap"] > 0


def test_a_resample_with_repeats_is_the_set_with_those_images_copied():
    dataset, results = _random_set(3)
    ids = [image["id"] for image in dataset["images"]]
    draw = np.array([0, 0, 2, 3, 3, 3, 6])
    copied = {"images": [], "annotations": [], "categories": dataset["categories"]}
    copied_results = []
    for new_id, index in enumerate(draw, start=100):
        old_id = ids[index]
        copied["images"].append(dict(dataset["images"][index], id=new_id))
        copied["annotations"] += [dict(a, id=len(copied["annotations"]) + k + 1, image_id=new_id)
                                  for k, a in enumerate(a for a in dataset["annotations"] if a["image_id"] == old_id)]
        copied_results += [dict(r, image_id=new_id) for r in results if r["image_id"] == old_id]
    expected = mask_ap(copied, copied_results, [image["id"] for image in copied["images"]], [1, 2])
    _, got = mask_ap_resamples(dataset, results, ids, [1, 2], draw[None])
    for name, value in expected.items():
        assert got[name][0] == pytest.approx(value, abs=1e-12), name


def test_summaries_carry_mask_ap_intervals_around_the_mask_ap():
    dataset, _ = _random_set(4, images=12)
    accumulator = FaithfulnessAccumulator(["perfect"])
    for image in dataset["images"]:
        annotations = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in annotations], float).reshape(-1, 4)
        maps = np.zeros((len(annotations), 24, 24), np.float32)
        for k, a in enumerate(annotations):
            x, y, w, h = a["bbox"]
            maps[k, y:y + h, x:x + w] = 1.0
        accumulator.add_image(image["id"], (24, 24), boxes, np.full(len(boxes), 0.9),
                              np.array([a["category_id"] for a in annotations]), {"perfect": maps}, annotations)
    ids = [image["id"] for image in dataset["images"]]
    row = accumulator.summarize(dataset, ids, [1, 2], bootstrap=50)["perfect"]
    low, high = row["ci95"]["mask_ap"]
    assert low <= row["mask_ap"] <= high and row["mask_ap"] == pytest.approx(1.0)
    assert "mask_ap_standard" in row["ci95"]
    gauss_low, gauss_high = accumulator.summarize(dataset, ids, [1, 2], bootstrap=50)["gaussian-baseline"]["ci95"][
        "mask_ap"]
    assert gauss_low <= gauss_high < 1.0


def test_paired_differences_against_each_floor_and_their_markdown():
    from detection.evaluation.writer import _difference_markdown

    dataset, _ = _random_set(4, images=12)
    accumulator = FaithfulnessAccumulator(["perfect", "gaussian-copy"])
    for image in dataset["images"]:
        annotations = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in annotations], float).reshape(-1, 4)
        perfect = np.zeros((len(annotations), 24, 24), np.float32)
        for k, a in enumerate(annotations):
            x, y, w, h = a["bbox"]
            perfect[k, y:y + h, x:x + w] = 1.0
        gaussian = np.stack([_gaussian(box) for box in boxes]) if len(boxes) else perfect
        accumulator.add_image(image["id"], (24, 24), boxes, np.full(len(boxes), 0.9),
                              np.array([a["category_id"] for a in annotations]),
                              {"perfect": perfect, "gaussian-copy": gaussian}, annotations)
    ids = [image["id"] for image in dataset["images"]]
    summary = accumulator.summarize(dataset, ids, [1, 2], bootstrap=50)
    assert "ci95_difference" not in summary["gaussian-baseline"]
    # a map equal to the floor: every resample's difference is 0
    same = summary["gaussian-copy"]["ci95_difference"]["gaussian-baseline"]
    assert same["mask_ap"] == [0.0, 0.0] and same["pointing_game"] == [0.0, 0.0]
    low, high = summary["perfect"]["ci95_difference"]["gaussian-baseline"]["mask_ap"]
    assert 0 < low <= high
    markdown = "\n".join(_difference_markdown(summary, with_curves=False))
    assert "| perfect | +" in markdown and "]*" in markdown and "| gaussian-copy | +0.000 [+0.000, +0.000] |" in markdown


def _gaussian(box):
    from detection.attention.floors import gaussian_box_map

    return gaussian_box_map(box, (24, 24), 0.25)
