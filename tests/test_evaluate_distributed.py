"""`torchrun --nproc_per_node 2 ... detr-attn eval`: two CPU gloo processes merge to the single-process result."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from detection.cli import main
from test_evaluate_model import confident_model_setup

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return confident_model_setup(tmp_path_factory.mktemp("evalddp"))


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="no torchrun next to the interpreter")
def test_torchrun_two_gloo_processes_equal_single(setup, tmp_path):
    root, ann = setup
    args = ["eval", "--no-progress", "--model", str(root / "model"), "--ann", str(ann), "--images", str(root / "images"),
            "--attention-threshold", "0.3", "--layers", "last", "--heads", "mean", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    torchrun = str(TORCHRUN)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as probe:  # a free port, so parallel test runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", port, "-m", "detection.cli", *args,
                           "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sharded = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert sharded["settings"]["world_size"] == 2
    assert sharded["bbox"] == pytest.approx(single["bbox"], abs=1e-6)
    for choice in single["attention"]:
        for key in ("pointing_game", "energy_pointing_game", "num_detections", "num_matched"):
            assert sharded["attention"][choice][key] == pytest.approx(single["attention"][choice][key])
        assert sharded["attention"][choice]["mask_ap"] == pytest.approx(single["attention"][choice]["mask_ap"])
