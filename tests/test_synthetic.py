"""Synthetic shapes generator: determinism, COCO layout, annotation geometry."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detection.cli import main as cli_main
from detection.data.synthetic import (CLASS_NAMES, SynthConfig, generate_dataset, image_rng,
                                      mask_to_polygons, render_image)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_layout(tmp_path):
    config = SynthConfig(image_size=64)
    generate_dataset(tmp_path / "a", train=4, val=2, seed=7, config=config)
    generate_dataset(tmp_path / "b", train=4, val=2, seed=7, config=config)
    generate_dataset(tmp_path / "c", train=4, val=2, seed=8, config=config)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert sorted(a) == ["annotations/instances_train.json", "annotations/instances_val.json",
                         *[f"train/{i:06d}.png" for i in range(4)], *[f"val/{i:06d}.png" for i in range(2)]]
    assert a == b
    assert a["train/000000.png"] != c["train/000000.png"]
    # train and val draw from different streams even with the same seed
    assert a["train/000000.png"] != a["val/000000.png"]
    # JSON keys are sorted (byte-stable output)
    text = a["annotations/instances_train.json"].decode()
    data = json.loads(text)
    assert text.strip() == json.dumps(data, sort_keys=True, separators=(",", ":"))


def test_image_is_independent_of_generation_order():
    config = SynthConfig(image_size=64)
    first, _ = render_image(config, image_rng(3, "train", 5))
    render_image(config, image_rng(3, "train", 4))
    again, _ = render_image(config, image_rng(3, "train", 5))
    assert np.array_equal(first, again)


def test_annotations_match_visible_masks():
    config = SynthConfig(image_size=96, difficulty=1.0)
    n_objects = 0
    for index in range(12):
        image, objects = render_image(config, image_rng(0, "train", index))
        height, width = image.shape[:2]
        assert config.min_objects <= len(objects) <= config.max_objects
        covered = np.zeros((height, width), dtype=bool)
        for obj in objects:
            mask = obj.visible_mask
            assert not (mask & covered).any(), "visible masks of different objects overlap"
            covered |= mask
            ys, xs = np.nonzero(mask)
            assert obj.bbox == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert obj.area == mask.sum()
            assert 1 <= obj.category_id <= len(CLASS_NAMES)
            rle = mask_utils.merge(mask_utils.frPyObjects(obj.segmentation, height, width))
            decoded = mask_utils.decode(rle).astype(bool)
            iou = (decoded & mask).sum() / (decoded | mask).sum()
            assert iou > 0.85, f"polygon does not trace its mask (IoU {iou:.3f})"
            n_objects += 1
    assert n_objects >= 12


def test_mask_to_polygons_is_pixel_exact_on_a_rectangle():
    mask = np.zeros((20, 30), dtype=bool)
    mask[3:9, 5:17] = True  # rows 3..8, cols 5..16
    (polygon,) = mask_to_polygons(mask)
    xs, ys = polygon[0::2], polygon[1::2]
    # corners within 0.5/upsample px of the pixel edges 5, 17 (x) and 3, 9 (y)
    assert min(xs) == pytest.approx(5, abs=0.13) and max(xs) == pytest.approx(17, abs=0.13)
    assert min(ys) == pytest.approx(3, abs=0.13) and max(ys) == pytest.approx(9, abs=0.13)
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], 20, 30))).astype(bool)
    assert np.array_equal(decoded, mask)


def test_sizes_span_coco_ranges_and_object_counts(tmp_path):
    config = SynthConfig(image_size=192, difficulty=1.0)
    generate_dataset(tmp_path, train=40, val=0, seed=1, config=config)
    coco = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    areas = np.array([a["area"] for a in coco["annotations"]])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=41)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 8 and len(set(per_image.tolist())) > 3
    ids = [a["id"] for a in coco["annotations"]]
    assert ids == list(range(1, len(ids) + 1))  # annotation id 0 breaks pycocotools
    assert all(a["iscrowd"] == 0 for a in coco["annotations"])
    assert {c["name"] for c in coco["categories"]} == set(CLASS_NAMES)
    assert len({a["category_id"] for a in coco["annotations"]}) == len(CLASS_NAMES)


def test_difficulty_zero_is_cleaner_than_one():
    easy = [render_image(SynthConfig(image_size=96, difficulty=0.0), image_rng(0, "train", i))[0] for i in range(8)]
    hard = [render_image(SynthConfig(image_size=96, difficulty=1.0), image_rng(0, "train", i))[0] for i in range(8)]

    def roughness(img):  # mean absolute horizontal gradient: noise + texture + clutter
        return np.abs(np.diff(img.astype(np.float32), axis=1)).mean()

    assert np.mean([roughness(i) for i in easy]) < np.mean([roughness(i) for i in hard])


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="difficulty"):
        SynthConfig(difficulty=1.5)
    with pytest.raises(ValueError, match="min_objects"):
        SynthConfig(min_objects=3, max_objects=2)


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "ds"
    status = cli_main(["synth", "--out", str(out), "--train", "2", "--val", "1", "--seed", "3",
                       "--image-size", "48", "--no-progress"])
    assert status == 0
    val = json.loads((out / "annotations" / "instances_val.json").read_text())
    assert [im["file_name"] for im in val["images"]] == ["000000.png"]
    assert (out / "val" / "000000.png").is_file() and (out / "train" / "000001.png").is_file()


# ------------------------------------------------------------------------------------------
# --shapes hard (issue 23): boxes that are not the mask
# ------------------------------------------------------------------------------------------
def _pixels_and_json_digest(root: Path) -> str:
    import hashlib

    import cv2

    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix == ".png":  # decoded pixels: PNG bytes may differ between libpng builds
            digest.update(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).tobytes())
        elif path.suffix == ".json":
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_default_output_unchanged_by_the_hard_shapes(tmp_path):
    # digest of the generator's output at commit afdf164, before --shapes hard existed
    generate_dataset(tmp_path, train=3, val=2, seed=5, config=SynthConfig(image_size=96, difficulty=0.7))
    assert _pixels_and_json_digest(tmp_path) == "f0652768c3f0761d1f9e2f69dc8d8a2a318d90756ceec13e6f68be6d94882fef"


@pytest.fixture(scope="module")
def hard_images():
    config = SynthConfig(image_size=160, shapes="hard", difficulty=0.6, max_objects=4,
                         min_object_size=24, max_object_size=110)
    return config, [render_image(config, image_rng(23, "test", index)) for index in range(40)]


def test_hard_boxes_are_the_visible_masks_extent(hard_images):
    from detection.data.synthetic import HARD_CLASS_NAMES

    _, images = hard_images
    seen = set()
    convex = total = 0
    for image, objects in images:
        height, width = image.shape[:2]
        covered = np.zeros((height, width), dtype=bool)
        for obj in objects:
            mask = obj.visible_mask
            decoded = mask_utils.decode(obj.segmentation).astype(bool)  # the annotation's RLE is the mask
            assert np.array_equal(decoded, mask)
            assert mask.any() and not (mask & covered).any()
            covered |= mask
            ys, xs = np.nonzero(mask)
            assert obj.bbox == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert obj.area == mask.sum()
            seen.add(HARD_CLASS_NAMES[obj.category_id - 1])
            convex += obj.category_id <= len(CLASS_NAMES)
            total += 1
    assert seen == set(HARD_CLASS_NAMES), f"shapes never drawn: {set(HARD_CLASS_NAMES) - seen}"
    assert convex / total >= 0.3


def test_hard_shapes_keep_their_stroke_and_differ_from_their_box():
    import cv2

    from detection.data.synthetic_hard import NONCONVEX_NAMES, SHAPES, shape_mask

    config = SynthConfig(shapes="hard")
    stroke = config.stroke_pixels(128, 128)  # 2 cells of stride 16 once resized to 160: 25.6 px
    assert stroke == pytest.approx(2 * 16 * 128 / 160)
    cell = stroke / config.stroke_cells
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(stroke) - 1, int(stroke) - 1))
    for name in NONCONVEX_NAMES:
        for seed in range(6):
            rng = np.random.default_rng(seed)
            extent = SHAPES[name][1](stroke, cell) * (1 + seed / 6)
            mask = shape_mask(name, extent, stroke, cell, (150, 150), rng.uniform(0, 2 * np.pi), (300, 300), rng)
            # a disk one stroke wide fits nearly everywhere: no part thinner than the stroke but the tips
            opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
            assert opened.sum() / mask.sum() > 0.85, name
            # a whole feature cell of the box (a hole, a gap, a corner) lies off the mask
            ys, xs = np.nonzero(mask)
            off_mask = ~mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            side = int(np.floor(cell))
            assert cv2.erode(off_mask.astype(np.uint8), np.ones((side, side), np.uint8),
                             borderType=cv2.BORDER_CONSTANT, borderValue=0).any(), name


def test_hard_dataset_is_deterministic_with_selection_and_test_splits(tmp_path):
    out = tmp_path / "hard"
    argv = ["synth", "--out", str(out), "--shapes", "hard", "--train", "0", "--val", "0", "--selection", "2",
            "--test", "2", "--seed", "23", "--image-size", "96", "--quiet"]
    assert cli_main(argv) == 0
    first = _tree_bytes(out)
    assert sorted(first) == ["annotations/instances_selection.json", "annotations/instances_test.json",
                             "selection/000000.png", "selection/000001.png", "test/000000.png", "test/000001.png"]
    assert first["selection/000000.png"] != first["test/000000.png"]
    assert cli_main(argv + ["--overwrite"]) == 0
    assert _tree_bytes(out) == first
    test = json.loads(first["annotations/instances_test.json"])
    assert len(test["categories"]) == 12 and test["info"]["generator"]["shapes"] == "hard"
    assert all(isinstance(a["segmentation"]["counts"], str) for a in test["annotations"])


def test_hard_options_are_checked():
    with pytest.raises(ValueError, match="convex_share"):
        SynthConfig(shapes="hard", convex_share=0.2)
    with pytest.raises(ValueError, match="shapes"):
        SynthConfig(shapes="wiggly")
