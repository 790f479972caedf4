"""Runtime owners: device / precision resolution, the single-process distributed context,
the weights digest formula, the COCO xywh conversion."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from detection.boxes import coco_xywh
from detection.models.digest import weights_digest
from detection.runtime.device import autocast, precision_dtype, resolve_device, resolve_precision
from detection.runtime.distributed import DistContext, init_distributed


def test_resolve_device_and_precision():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", torch.device("cpu"))
    assert precision_dtype("bf16") == torch.bfloat16


def test_autocast_contexts():
    with autocast(torch.device("cpu"), "bf16"):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA"):
        autocast(torch.device("cpu"), "fp16", training=True)


def test_single_process_context(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = init_distributed()
    assert context == DistContext() and context.is_main and not context.enabled
    assert context.any_true(True) and not context.any_true(False)
    assert context.gather_objects({"a": 1}) == [{"a": 1}]
    context.barrier()
    context.close()


def test_weights_digest_formula_is_the_stored_one():
    """The formula run.json fingerprints store: name|dtype|shape| then the raw bytes."""
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, 0.5)
    torch.nn.init.constant_(model.bias, -1.0)
    digest = hashlib.sha256()
    for name in ("bias", "weight"):
        tensor = getattr(model, name).detach()
        digest.update(f"{name}|torch.float32|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    assert weights_digest(model) == digest.hexdigest()


def test_coco_xywh_rounding():
    boxes = torch.tensor([[10.25, 20.5, 30.875, 40.0], [0.0, 0.0, 0.0009765625, 2.0]])  # exact in float32
    assert coco_xywh(boxes) == [[10.25, 20.5, 20.625, 19.5], [0.0, 0.0, 0.001, 2.0]]
    unrounded = coco_xywh(boxes.numpy(), decimals=None)
    x0, y0, x1, y1 = (float(v) for v in boxes[0])
    assert unrounded[0] == [x0, y0, x1 - x0, y1 - y0]
    assert coco_xywh(np.zeros((0, 4))) == []


def test_weights_digest_takes_zero_dim_buffers():
    """A BatchNorm's num_batches_tracked is a 0-dim int64: hashed like a 1-element tensor."""
    model = torch.nn.BatchNorm1d(2)
    digest = weights_digest(model)
    assert len(digest) == 64 and digest == weights_digest(model)
    model.num_batches_tracked += 1
    assert weights_digest(model) != digest
