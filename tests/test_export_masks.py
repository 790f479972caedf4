"""`detr-attn export --format coco-masks`: RLE masks of a real predict run equal our Otsu masks,
pycocotools reads the file, ground-truth image ids by file name, the missing-attention error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detection.runfolder.maps_npz import load_maps_npz
from detection.attention.metrics import explanation_mask
from detection.cli import main as cli_main
from detection.attention.mask_ap import mask_ap
from detection.data.ground_truth import call_quietly, coco_from_dataset
from detection.evaluation.mask_export import MissingAttentionError, coco_mask_results

DEMO = Path(__file__).resolve().parents[1] / "demo" / "images"


def _predict(out: Path, *extra: str) -> None:
    status = cli_main(["predict", str(DEMO), "--model", "demo", "--out", str(out), "--workers", "0", "--quiet", *extra])
    assert status == 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    _predict(out, "--save-attention")
    return out


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]


def test_rle_masks_decode_to_the_otsu_masks_of_the_saved_maps(run_dir, tmp_path):
    out = tmp_path / "masks.json"
    assert cli_main(["export", str(run_dir), "--format", "coco-masks", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    expected_entries = json.loads((run_dir / "detections.json").read_text())
    assert len(written) == len(expected_entries) > 0
    index = 0
    for record in _records(run_dir):
        if not record["detections"]:
            continue
        maps, _ = load_maps_npz(run_dir / "attention" / f"{record['key']}.npz")
        assert len(maps) == len(record["detections"])
        for saliency in maps:
            entry, expected = written[index], expected_entries[index]
            assert isinstance(entry["segmentation"]["counts"], str)
            assert entry["segmentation"]["size"] == [record["height"], record["width"]]
            decoded = mask_utils.decode(dict(entry["segmentation"], counts=entry["segmentation"]["counts"].encode()))
            np.testing.assert_array_equal(decoded.astype(bool), explanation_mask(saliency))
            assert decoded.any()  # the demo maps are not flat: the masks are not empty
            for field in ("image_id", "category_id", "bbox", "score", "file_name", "class_name", "query_index"):
                assert entry[field] == expected[field], field
            index += 1
    assert index == len(written)
    assert coco_mask_results(run_dir) == written  # the library call writes what it returns


def test_pycocotools_loads_the_file_and_scores_it_as_eval_does(run_dir, tmp_path):
    out = tmp_path / "masks.json"
    ann = DEMO / "annotations.json"
    assert cli_main(["export", str(run_dir), "--format", "coco-masks", "--out", str(out), "--ann", str(ann)]) == 0
    written = json.loads(out.read_text())
    gt_dataset = json.loads(ann.read_text())
    gt = coco_from_dataset(gt_dataset)
    results, _ = call_quietly(lambda: gt.loadRes(str(out)))
    assert len(results.anns) == len(written)
    for ann_id, entry in zip(sorted(results.anns), written):
        rle = dict(entry["segmentation"], counts=entry["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(results.annToMask(results.anns[ann_id]), mask_utils.decode(rle))
    # eval's mask AP (IoU 0.2:0.95) of the file equals that of the bare segm results: the extra
    # fields (bbox, file_name, ...) change nothing at area "all"
    image_ids = [image["id"] for image in gt_dataset["images"]]
    category_ids = [category["id"] for category in gt_dataset["categories"]]
    bare = [{k: e[k] for k in ("image_id", "category_id", "segmentation", "score")} for e in written]
    scored = mask_ap(gt_dataset, written, image_ids, category_ids)
    assert scored == mask_ap(gt_dataset, bare, image_ids, category_ids)
    assert 0.0 <= scored["mask_ap50"] <= 1.0 and scored["mask_ap"] > -1


def test_ann_sets_ground_truth_image_ids_by_file_name(run_dir, tmp_path):
    names = sorted(p.name for p in DEMO.glob("*.png"))
    ids = {name: 100 + 7 * k for k, name in enumerate(reversed(names))}  # not the run's 1..4 order
    gt = {"images": [{"id": ids[n], "file_name": f"images/{n}", "height": 1, "width": 1} for n in names],
          "annotations": [], "categories": [{"id": c, "name": str(c)} for c in range(1, 6)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "masks.json"
    assert cli_main(["export", str(run_dir), "--format", "coco-masks", "--out", str(out),
                     "--ann", str(tmp_path / "gt.json")]) == 0
    written = json.loads(out.read_text())
    assert [e["image_id"] for e in written] == [ids[Path(e["file_name"]).name] for e in written]
    run_ids = {r["file"]: r["image_id"] for r in _records(run_dir)}
    assert {e["image_id"] for e in written} != {run_ids[e["file_name"]] for e in written}

    # without --ann: the run's own ids
    assert cli_main(["export", str(run_dir), "--format", "coco-masks", "--out", str(out)]) == 0
    assert [e["image_id"] for e in json.loads(out.read_text())] == [run_ids[e["file_name"]] for e in written]

    # a file name the ground truth does not know: exit 2, nothing written
    gt["images"] = gt["images"][1:]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out.unlink()
    assert cli_main(["export", str(run_dir), "--format", "coco-masks", "--out", str(out),
                     "--ann", str(tmp_path / "gt.json")]) == 2
    assert not out.exists()


def test_run_without_saved_attention_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "plain"
    _predict(run)
    out = tmp_path / "masks.json"
    assert cli_main(["export", str(run), "--format", "coco-masks", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert str(run) in message and "--save-attention" in message
    assert not out.exists()
    with pytest.raises(MissingAttentionError, match="--save-attention"):
        coco_mask_results(run)
    # not a run folder at all
    assert cli_main(["export", str(tmp_path / "nothing"), "--format", "coco-masks", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
