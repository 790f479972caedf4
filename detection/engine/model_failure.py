"""A model that fails inside its own forward: the error says which module failed and why, as a
usage error before a run starts (the probe) or as one image's error record during it."""
from __future__ import annotations

import traceback
from types import TracebackType

import numpy as np
import torch

#: The probe image (height, width): mid-grey RGB of a common photo shape; the model's own resize
#: rule takes it to the input size its real images get.
PROBE_SIZE = (480, 640)


class ModelRunError(RuntimeError):
    """The model's forward raised; the message names the module where and the library's error."""


def failing_module(trace: TracebackType | None) -> str:
    """The innermost torch module on the traceback: "YolosEmbeddings (modeling_yolos.py:97)", or the
    innermost frame's file and line when no module method is on it."""
    module_frame = None
    last = None
    for frame, line in traceback.walk_tb(trace):
        last = (frame, line)
        if isinstance(frame.f_locals.get("self"), torch.nn.Module):
            module_frame = (frame, line)
    frame, line = module_frame or last or (None, 0)
    if frame is None:
        return "the forward"
    where = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{line}"
    module = frame.f_locals.get("self")
    return f"{type(module).__name__} ({where})" if isinstance(module, torch.nn.Module) else where


def describe_failure(error: BaseException, input_size: tuple[int, int] | None = None) -> str:
    """One paragraph: where the forward failed (input width x height) and the library's own error."""
    size = f" on a {input_size[1]}x{input_size[0]} input" if input_size is not None else ""
    return (f"the model failed{size} in {failing_module(error.__traceback__)}: "
            f"{type(error).__name__}: {error}")


def probe(predictor) -> None:
    """Run the model once on the probe image (PROBE_SIZE). A failure of the model's forward is
    raised as the ModelRunError `Predictor.predict_tensors` makes of it (naming the module and the
    input size the model saw); a failure of our own code around it stays what it is."""
    predictor.predict_arrays([np.full((*PROBE_SIZE, 3), 128, dtype=np.uint8)])
