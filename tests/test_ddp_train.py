"""DDP on CPU (gloo): two processes train a few steps and end with identical weights;
the epoch sampler splits data between ranks reproducibly."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch.multiprocessing as mp

from detection.data.synthetic import SynthConfig, generate_dataset
from detection.train.sampler import EpochSampler
from detection.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, config: dict, out: str, results: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from detection.train.loop import train

    summary = train(config, out)
    Path(results, f"rank{rank}.json").write_text(json.dumps(summary, default=float))


def test_two_cpu_ranks_end_with_identical_weights(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, train=16, val=4, seed=4, config=SynthConfig(image_size=64, max_objects=3))
    config = load_train_config(REPO / "configs/train/tiny.yaml", [
        f"data.train_images={data / 'train'}",
        f"data.train_annotations={data / 'annotations/instances_train.json'}",
        f"data.val_images={data / 'val'}",
        f"data.val_annotations={data / 'annotations/instances_val.json'}",
        "optim.batch_size=2", "optim.epochs=1", "device=cpu",
    ])
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), config, str(tmp_path / "run"), str(results)), nprocs=2, join=True)
    rank0 = json.loads((results / "rank0.json").read_text())
    rank1 = json.loads((results / "rank1.json").read_text())
    assert rank0["world_size"] == rank1["world_size"] == 2
    # 16 images over 2 ranks, batch 2 per rank -> 4 optimiser steps
    assert rank0["steps"] == rank1["steps"] == 4
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    # rank 0 wrote the run folder; the model it exported is the trained one
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log if l["type"] == "train"] == [1, 2, 3, 4]  # one writer, no duplicates
    assert log[0]["world_size"] == 2


def test_epoch_sampler_splits_ranks_and_resumes():
    full = EpochSampler(10, seed=3, epoch=2).indices()
    assert sorted(full) == list(range(10))
    assert full == EpochSampler(10, seed=3, epoch=2).indices()
    assert full != EpochSampler(10, seed=3, epoch=3).indices()
    ranks = [EpochSampler(10, seed=3, epoch=2, rank=r, num_replicas=3).indices() for r in range(3)]
    assert all(len(r) == 4 for r in ranks)  # padded to 12 by wrapping, as DistributedSampler
    # rank r takes every 3rd index of the permutation, wrapped to 12 with its first two entries
    padded = full + full[:2]
    assert ranks == [padded[r::3] for r in range(3)]
    skipped = EpochSampler(10, seed=3, epoch=2, rank=1, num_replicas=3, skip=2)
    assert list(skipped) == ranks[1][2:] and len(skipped) == 2
