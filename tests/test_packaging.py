"""The built wheel carries configs/ and weights/ (demo model included) and predicts outside the repo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from detection.cli import main as cli_main
from detection.resources import data_root

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "demo" / "images" / "shapes_1.png"
SHIPPED = ["configs/models/demo.yaml", "configs/models/detr-r50.yaml", "configs/train/demo.yaml",
           "weights/manifest.yaml", "weights/demo/model.json", "weights/demo/model.safetensors",
           "weights/hard/model.json", "weights/hard/model.safetensors"]


def _copy_project(dest: Path) -> None:
    # build from a copy: the in-tree build writes build/ and *.egg-info, kept out of the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("detection", "configs", "weights"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)


def _predictions(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def test_checkout_reads_the_top_level_folders() -> None:
    assert data_root() == REPO
    from detection.models import configs, published, registry
    assert configs.CONFIG_DIR == REPO / "configs" / "models"
    assert registry.DEMO_DIR == REPO / "weights" / "demo"
    assert published.MANIFEST_PATH == REPO / "weights" / "manifest.yaml"


@pytest.mark.slow
def test_wheel_ships_data_and_predicts_outside_the_repo(tmp_path: Path) -> None:
    source, dist, target, elsewhere = (tmp_path / n for n in ("src", "dist", "site", "elsewhere"))
    for folder in (source, elsewhere):
        folder.mkdir()
    _copy_project(source)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(dist), str(source)], capture_output=True, text=True)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log
    assert "warning" not in log.lower() and "deprecat" not in log.lower(), log
    (wheel,) = dist.glob("detection-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for relative in SHIPPED:
            assert archive.read(f"detection/_data/{relative}") == (REPO / relative).read_bytes(), relative

    # an sdist carries the same data, so a wheel built from it does too
    sdist = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "build_meta.build_sdist(sys.argv[1])", str(tmp_path / "sdist")],
                           cwd=source, capture_output=True, text=True)
    assert sdist.returncode == 0 and "Warning" not in sdist.stderr, sdist.stderr
    (archive_path,) = (tmp_path / "sdist").glob("detection-*.tar.gz")
    with tarfile.open(archive_path) as archive:
        names = archive.getnames()
    root = names[0].split("/")[0]
    for relative in SHIPPED:
        assert f"{root}/{relative}" in names, relative

    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                              "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "from detection.resources import data_root; print(data_root())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()) == target / "detection" / "_data"

    installed_run = tmp_path / "installed_run"
    run = subprocess.run([sys.executable, "-m", "detection.cli", "predict", "--model", "demo", "--quiet",
                          "--out", str(installed_run), str(IMAGE)], cwd=elsewhere, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr

    checkout_run = tmp_path / "checkout_run"
    assert cli_main(["predict", "--model", "demo", "--quiet", "--out", str(checkout_run), str(IMAGE)]) == 0
    installed = _predictions(installed_run)
    assert installed == _predictions(checkout_run)
    assert len(installed) == 1 and len(installed[0]["detections"]) > 0
    fingerprint = [json.loads((run_dir / "run.json").read_text())["fingerprint"]["weights_sha256"]
                   for run_dir in (installed_run, checkout_run)]
    assert fingerprint[0] == fingerprint[1]
