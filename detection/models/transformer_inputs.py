"""What the inference pass keeps for the gradients that follow it: the native DETR's transformer
inputs (issue #23), and a prompted detector's inputs of the part its token scores differentiate."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TransformerInputs:
    """The backbone stage's output of one forward over a padded batch (`DETR.encode_features`).

    features: (B, C, h, w) the projected backbone features (after `input_proj`), C = hidden_dim;
    feature_padding_mask: (B, h, w) bool, True on padding cells;
    position: (B, C, h, w) the sine position encoding of the valid cells;
    input_size: (H, W) of the padded input batch, in input pixels;
    image_sizes: (B, 2) int64 (height, width) of each image before padding, in input pixels.
    `DETR.decode_features` of these gives the forward's outputs exactly.
    """

    features: torch.Tensor
    feature_padding_mask: torch.Tensor
    position: torch.Tensor
    input_size: tuple[int, int]
    image_sizes: torch.Tensor

    def select_image(self, index: int) -> "TransformerInputs":
        """The inputs of one image of the batch (batch dimension kept, size 1; the batch's padding)."""
        sl = slice(index, index + 1)
        return dataclasses.replace(self, features=self.features[sl], feature_padding_mask=self.feature_padding_mask[sl],
                                   position=self.position[sl], image_sizes=self.image_sizes[sl])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           copy: bool = False) -> "TransformerInputs":
        """The inputs on `device` (features and position in `dtype` when given), contiguous (a
        channels_last backbone's features are NHWC-strided). copy: new tensors even where nothing
        changes, so that inference-mode tensors (`InferenceModel`'s pass) become ordinary tensors
        autograd may save for backward."""
        def moved(tensor: torch.Tensor, cast: bool) -> torch.Tensor:
            return tensor.to(device, dtype=dtype if cast and dtype is not None else tensor.dtype, copy=copy,
                             memory_format=torch.contiguous_format)
        return dataclasses.replace(self, features=moved(self.features, True),
                                   feature_padding_mask=moved(self.feature_padding_mask, False),
                                   position=moved(self.position, True), image_sizes=moved(self.image_sizes, False))


@dataclass(frozen=True)
class KeptInputs:
    """The inputs of the part of a prompted detector that its token scores differentiate, kept by
    the inference pass (`forward(..., keep_features=True)`), so that only that part runs again
    with a graph (OWL: the class head's image features, the text tower runs again; Grounding DINO:
    the last decoder layer's inputs and the class head's text features).

    per_image: name -> tensor whose first dimension is the batch (B, ...); shared: name -> what
    every image of the batch shares (e.g. the feature levels' shapes). The names are the family's
    own (`OwlDetector` / `GroundingDetector` read them back).
    """

    per_image: dict[str, torch.Tensor]
    shared: dict[str, Any] = field(default_factory=dict)

    def select_image(self, index: int) -> "KeptInputs":
        """The inputs of one image of the batch (batch dimension kept, size 1)."""
        return KeptInputs({name: tensor[index:index + 1] for name, tensor in self.per_image.items()}, self.shared)

    def to(self, device: torch.device | str, copy: bool = False) -> "KeptInputs":
        """The inputs on `device`; copy: new tensors even where nothing moves, so that inference-mode
        tensors (`InferenceModel`'s pass) become ordinary tensors autograd may save for backward."""
        def moved(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(device, copy=copy)
            return value
        return KeptInputs({name: moved(tensor) for name, tensor in self.per_image.items()},
                          {name: moved(value) for name, value in self.shared.items()})
