import json
import os

import pytest
import torch

from detection import boxes
from detection.io import atomic_path, write_json_atomic


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(target.parent) == ["out.json"]


def test_atomic_write_gives_umask_permissions(tmp_path):
    target = tmp_path / "out.bin"
    old = os.umask(0o022)
    try:
        write_json_atomic(target, [1])
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_box_conversions_round_trip():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.0, 1.0]])
    cxcywh = boxes.xyxy_to_cxcywh(xyxy)
    assert cxcywh.tolist() == [[30.0, 50.0, 40.0, 60.0], [0.5, 0.5, 1.0, 1.0]]
    assert torch.equal(boxes.cxcywh_to_xyxy(cxcywh), xyxy)
    xywh = boxes.xyxy_to_xywh(xyxy)
    assert xywh.tolist()[0] == [10.0, 20.0, 40.0, 60.0]
    assert torch.equal(boxes.xywh_to_xyxy(xywh), xyxy)


def test_read_json_names_the_file_and_problem(tmp_path):
    from detection.io import read_json

    class Custom(ValueError):
        pass

    good = tmp_path / "a.json"
    good.write_text('{"x": [1, 2]}')
    assert read_json(good, "results file") == {"x": [1, 2]}
    with pytest.raises(Custom, match=r"missing\.json: results file not found"):
        read_json(tmp_path / "missing.json", "results file", Custom)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        read_json(bad, "annotation file")
