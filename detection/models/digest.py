"""The one weights digest: sha256 over a model's state dict (names, dtypes, shapes, bytes).

The same weights give the same digest wherever they were loaded from. Predict run folders
store it in run.json's fingerprint, so the formula must never change (old runs resume).
"""
from __future__ import annotations

import hashlib

import torch


def weights_digest(model: torch.nn.Module) -> str:
    """Hex sha256 of `model.state_dict()` in name order; ~0.3 s for DETR-R50."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
