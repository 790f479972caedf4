"""Typed per-image detection container: equal-length fields, indexing applies to all.

Coordinate convention: `boxes` are float32 (N, 4) xyxy in ORIGINAL image pixels
(x right, y down, origin at the top-left corner of the top-left pixel).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch


def _length(value: Any) -> int:
    return len(value)


def _index(value: Any, item: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if isinstance(item, int):
            return value[item : item + 1]
        if isinstance(value, np.ndarray) and isinstance(item, torch.Tensor):
            item = item.cpu().numpy()
        return value[item]
    # plain Python list: support int, slice, bool mask and integer index arrays
    if isinstance(item, int):
        return [value[item]]
    if isinstance(item, slice):
        return value[item]
    index = item.cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if index.dtype == bool:
        index = np.nonzero(index)[0]
    return [value[int(i)] for i in index]


#: Rows `repr(Detections)` shows.
REPR_ROWS = 10


class Detections:
    """Detections of one image, detectron2-`Instances` style.

    Standard fields (all length N):
      boxes        float32 (N, 4) xyxy, original-image pixels
      scores       float32 (N,)
      labels       int64 (N,) contiguous model label index (into `class_names` of the model)
      query_index  int64 (N,) decoder query that produced the detection (ties it to its attention;
                   under a sigmoid_topk PostprocessRule one query may appear once per class)
      class_names  list[str] (N,)
    Optional fields, e.g. `maps` float32 (N, H, W) saliency in original-image pixels.

    `image_size` is the original image (height, width).
    """

    def __init__(self, image_size: tuple[int, int], **fields: Any) -> None:
        object.__setattr__(self, "image_size", (int(image_size[0]), int(image_size[1])))
        object.__setattr__(self, "_fields", {})
        for name, value in fields.items():
            self.set(name, value)

    # -- field access -------------------------------------------------------------------
    def set(self, name: str, value: Any) -> None:
        if name == "boxes":
            value = torch.as_tensor(value, dtype=torch.float32).reshape(-1, 4)
        if self._fields:
            expected = len(self)
            if _length(value) != expected:
                raise ValueError(
                    f"field {name!r} has length {_length(value)}, other fields have {expected}"
                )
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def get(self, name: str) -> Any:
        return self._fields[name]

    def fields(self) -> dict[str, Any]:
        return dict(self._fields)

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            return fields[name]
        raise AttributeError(f"Detections has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(name, value)

    # -- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        for value in self._fields.values():
            return _length(value)
        return 0

    def __getitem__(self, item: Any) -> "Detections":
        if isinstance(item, int):
            if item >= len(self) or item < -len(self):
                raise IndexError(f"index {item} out of range for {len(self)} detections")
            item = item % len(self)
        return Detections(self.image_size, **{k: _index(v, item) for k, v in self._fields.items()})

    def __iter__(self) -> Iterator["Detections"]:
        for i in range(len(self)):
            yield self[i]

    def to(self, device: Any) -> "Detections":
        return Detections(
            self.image_size,
            **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self._fields.items()},
        )

    def resized(self, image_size: tuple[int, int]) -> "Detections":
        """The same detections on the image scaled to `image_size` (height, width): boxes scaled
        by (width / W, height / H) per axis (pixel edges scale linearly), other fields unchanged
        (a field in original pixels, e.g. `maps`, is dropped: it would no longer match)."""
        height, width = (int(image_size[0]), int(image_size[1]))
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive (height, width), got {image_size}")
        old_h, old_w = self.image_size
        fields = {k: v for k, v in self._fields.items() if k != "maps"}
        if "boxes" in fields:
            scale = torch.tensor([width / old_w, height / old_h, width / old_w, height / old_h], dtype=torch.float32)
            fields["boxes"] = fields["boxes"] * scale.to(fields["boxes"].device)
        return Detections((height, width), **fields)

    def __repr__(self) -> str:
        """The count, the image size and the fields, then up to REPR_ROWS rows of class, score,
        box (xyxy pixels) and query index: what an HF pipeline user reads off a result."""
        height, width = self.image_size
        head = (f"Detections({len(self)} in a {width}x{height} image; fields: {', '.join(self._fields)})")
        return "\n".join([head, *self.table_rows(REPR_ROWS)])

    def table_rows(self, limit: int | None = None) -> list[str]:
        """Up to `limit` lines "  k  class  score  [x0, y0, x1, y1]  query q" (then "  ... N more")."""
        count = len(self) if limit is None else min(limit, len(self))
        names = list(self.get("class_names")) if self.has("class_names") else None
        rows = []
        for k in range(count):
            label = names[k] if names is not None else (f"label {int(self.labels[k])}" if self.has("labels") else "")
            score = f"{float(self.scores[k]):.3f}" if self.has("scores") else "-"
            box = ", ".join(f"{float(v):.1f}" for v in self.boxes[k]) if self.has("boxes") else ""
            query = f"  query {int(self.query_index[k])}" if self.has("query_index") else ""
            rows.append(f"  {k:>3}  {label:<16} {score}  [{box}]{query}")
        if count < len(self):
            rows.append(f"  ... {len(self) - count} more")
        return rows

    @staticmethod
    def empty(image_size: tuple[int, int]) -> "Detections":
        return Detections(
            image_size,
            boxes=torch.zeros((0, 4)),
            scores=torch.zeros((0,)),
            labels=torch.zeros((0,), dtype=torch.int64),
            query_index=torch.zeros((0,), dtype=torch.int64),
            class_names=[],
        )
