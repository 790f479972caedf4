"""Training augmentation (albumentations, bbox-safe) and the validation transform (exactly the
inference rule of `detection.data.preprocess.image_to_input`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import DualTransform

from detection.data.preprocess import image_to_input, resized_size
from detection.models.contract import PreprocessSpec


class DetrRandomResize(DualTransform):
    """Shorter side -> a random choice of `scales`, longer side <= `max_size` (DETR's rule).

    Uses `preprocess.resized_size`, so the largest scale reproduces the inference size exactly.
    Albumentations keeps boxes normalised internally, so resizing leaves them unchanged.
    """

    def __init__(self, scales: Sequence[int], max_size: int | None, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not scales:
            raise ValueError("DetrRandomResize needs at least one scale")
        self.scales = [int(s) for s in scales]
        self.max_size = None if max_size is None else int(max_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        scale = self.scales[int(self.random_generator.integers(len(self.scales)))]
        return {"target_size": resized_size(height, width, scale, self.max_size)}

    def apply(self, img: np.ndarray, target_size: tuple[int, int], **params: Any) -> np.ndarray:
        if img.shape[:2] == tuple(target_size):
            return img
        return cv2.resize(img, (target_size[1], target_size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, target_size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, (target_size[1], target_size[0]), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalised coordinates are resize-invariant

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scales", "max_size")


@dataclass
class AugmentConfig:
    """The `augment:` section of a train config; every key optional:

        augment:
          hflip: 0.5                    # probability
          vflip: 0.0
          color_jitter: {p: 0.8, brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.02}
          crop: {p: 0.5, max_fraction: 0.25, keep_all_boxes: false}
          scales: [128, 144, 160]       # shorter side drawn from this list (DETR multi-scale)
          max_size: 224                 # longer side cap, DETR's rule (preprocess.resized_size)
          min_visibility: 0.3           # a cropped box keeping < 30 % of its area is dropped

    Both transforms return the model input contract: float32 (3, h, w) RGB in [0, 1] (the
    model normalises internally, so nothing here normalises) and boxes as COCO [x, y, w, h]
    pixels of the TRANSFORMED (unpadded) image.
    """

    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: dict[str, float] = field(default_factory=lambda: {
        "p": 0.8, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02})
    crop: dict[str, Any] = field(default_factory=lambda: {"p": 0.5, "max_fraction": 0.25, "keep_all_boxes": False})
    scales: list[int] = field(default_factory=lambda: [128, 144, 160])
    max_size: int | None = 224
    min_visibility: float = 0.3

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "AugmentConfig":
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augment keys {unknown}; known: {sorted(known)}")
        config = cls(**values)
        if not config.scales:
            raise ValueError("augment.scales must list at least one size")
        return config


class TrainTransform:
    """Albumentations pipeline: flips -> photometric jitter -> random crop -> multi-scale resize.

    Call with (image uint8 (H, W, 3) RGB, boxes (N, 4) COCO xywh pixels, labels (N,), seed)
    -> (float32 tensor (3, h, w) in [0, 1], boxes (M, 4) xywh pixels of the output, labels (M,),
    kept (M,) indices into the input boxes). `seed` makes the draw a function of the sample
    alone (not of worker or call order), which is what makes `--resume` exact.
    """

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        steps: list[A.BasicTransform] = []
        if config.hflip > 0:
            steps.append(A.HorizontalFlip(p=config.hflip))
        if config.vflip > 0:
            steps.append(A.VerticalFlip(p=config.vflip))
        jitter = dict(config.color_jitter or {})
        if jitter and jitter.get("p", 0) > 0:
            b, c, s, h = (float(jitter.get(k, 0.0)) for k in ("brightness", "contrast", "saturation", "hue"))
            steps.append(A.ColorJitter(brightness=(1 - b, 1 + b), contrast=(1 - c, 1 + c),
                                       saturation=(1 - s, 1 + s), hue=(-h, h), p=float(jitter["p"])))
        crop = dict(config.crop or {})
        if crop and crop.get("p", 0) > 0:
            if crop.get("keep_all_boxes", False):
                steps.append(A.BBoxSafeRandomCrop(erosion_rate=0.0, p=float(crop["p"])))
            else:
                f = float(crop.get("max_fraction", 0.25))
                steps.append(A.RandomCropFromBorders(crop_left=f / 2, crop_right=f / 2, crop_top=f / 2,
                                                     crop_bottom=f / 2, p=float(crop["p"])))
        steps.append(DetrRandomResize(config.scales, config.max_size, p=1.0))
        self.pipeline = A.Compose(
            steps,
            bbox_params=A.BboxParams(format="coco", label_fields=["labels", "indices"], clip=True,
                                     min_visibility=config.min_visibility, filter_invalid_bboxes=True),
        )

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, seed: int
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        self.pipeline.set_random_seed(int(seed) % (2**32))
        out = self.pipeline(image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                            labels=np.asarray(labels, dtype=np.int64),
                            indices=np.arange(len(labels), dtype=np.int64))
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        # channel-first copy in numpy: albumentations may return a read-only view
        tensor = torch.from_numpy(np.array(out["image"].transpose(2, 0, 1), dtype=np.float32)).div_(255.0)
        return (tensor, out_boxes, np.asarray(out["labels"], dtype=np.int64).reshape(-1),
                np.asarray(out["indices"], dtype=np.int64).reshape(-1))


class EvalTransform:
    """The inference rule (preprocess.image_to_input) with boxes scaled along.

    preprocess: the detector's PreprocessSpec, or DETR's (min_size, max_size) shortest-edge pair.
    """

    def __init__(self, preprocess: PreprocessSpec | int, max_size: int | None = None) -> None:
        if not isinstance(preprocess, PreprocessSpec):
            preprocess = PreprocessSpec.shortest_edge(int(preprocess), None if max_size is None else int(max_size))
        self.preprocess = preprocess

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, seed: int = 0
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        tensor = image_to_input(image, self.preprocess)
        scale = np.array([tensor.shape[2] / image.shape[1], tensor.shape[1] / image.shape[0]] * 2, np.float32)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        return tensor, boxes, labels, np.arange(len(labels), dtype=np.int64)


def build_transform(augment: Mapping[str, Any] | None, train: bool, min_size: int, max_size: int | None):
    """Train: `TrainTransform(AugmentConfig.from_dict(augment))`; eval: `EvalTransform`."""
    if train:
        return TrainTransform(AugmentConfig.from_dict(augment))
    return EvalTransform(min_size, max_size)
