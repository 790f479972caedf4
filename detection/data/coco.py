"""COCO-format detection dataset for training and validation: images and DETR targets from any
COCO json, the category-id <-> contiguous-label map (`LabelMap`), and the batch collates."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO

from detection.boxes import cxcywh_to_xyxy, xywh_to_xyxy, xyxy_to_cxcywh
from detection.data.ground_truth import coco_from_dataset, load_coco_gt
from detection.data.images import ImageLoadError, load_image
from detection.data.preprocess import pad_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelMap:
    """label index (0..K-1) <-> COCO category id, and label -> class name.

    category_ids[i] is the COCO category id of label i; class_names[i] its name.
    """

    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.class_names):
            raise ValueError(f"{len(self.category_ids)} category ids but {len(self.class_names)} names")
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"duplicate category ids in {list(self.category_ids)}")

    @classmethod
    def from_coco(cls, coco: COCO) -> "LabelMap":
        """All categories of the file, labels in increasing category-id order."""
        cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def label(self, category_id: int) -> int | None:
        """Contiguous label of a category id, None if the id is not in the map."""
        return self._index.get(int(category_id))

    def category_id(self, label: int) -> int:
        return self.category_ids[int(label)]

    @property
    def _index(self) -> dict[int, int]:
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {c: i for i, c in enumerate(self.category_ids)}
            object.__setattr__(self, "_index_cache", index)
        return index


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """The pycocotools index of a COCO file read by the one ground-truth loader (non-strict:
    per-annotation problems are skipped later, with a warning each); errors name the file."""
    return coco_from_dataset(load_coco_gt(ann_file, strict=False))


def _valid_bbox(bbox: Any) -> bool:
    return (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox))


class CocoDetection(torch.utils.data.Dataset):
    """Images + targets of a COCO-format file (read by `detection.data.ground_truth`).

    A sample is (image, target):
        image: float32 (3, h, w) RGB in [0, 1] (transformed, unpadded; the model normalises)
        target: {"boxes": (N, 4) float32 normalised cxcywh relative to the transformed unpadded
                 image, "labels": (N,) int64 contiguous 0..K-1, "image_id": int,
                 "orig_size": (2,) int64 (H, W) of the file, "size": (2,) int64 (h, w) transformed,
                 "ann_ids": (N,) int64, "seed": the sample's augmentation seed}

    Crowd annotations (iscrowd=1) are not training targets (as in DETR); pycocotools'
    evaluation treats them as "ignore" regions. Images without annotations stay (all queries
    learn "no object"). Degenerate boxes (w or h <= 0 after clipping to the image) are dropped
    with a count in the log; malformed annotations (bad bbox, unknown category, image id not
    in the file) and unreadable images are reported with their id / file and skipped. Nothing
    on disk is ever modified.

    transform: callable (image uint8 (H, W, 3), boxes (N, 4) xywh px, labels (N,), seed) ->
        (tensor (3, h, w), boxes (M, 4) xywh px, labels (M,), kept (M,)) — see transforms.py.
    label_map: defaults to all categories of the file; pass the model's map when fine-tuning
        so labels mean the same classes as the model's head.
    seed: with `set_epoch`, the augmentation of sample i in epoch e is a function of
        (seed, epoch, i) only, so runs and resumed runs see identical data.
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 transform: Callable | None = None, label_map: LabelMap | None = None,
                 seed: int = 0, max_pixels: int | None = None) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.coco = load_coco(ann_file)
        self.label_map = label_map or LabelMap.from_coco(self.coco)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.max_pixels = max_pixels
        self.image_ids = sorted(self.coco.imgs)
        self.bad_images: set[int] = set()
        self._annotations = self._check_annotations()

    # -- annotations --------------------------------------------------------------------
    def _check_annotations(self) -> dict[int, list[tuple[list[float], int, int]]]:
        """image id -> [(bbox xywh clipped to the image, label, annotation id)], crowd excluded."""
        per_image: dict[int, list[tuple[list[float], int, int]]] = {i: [] for i in self.image_ids}
        degenerate = crowd = 0
        for ann in self.coco.dataset.get("annotations", []):
            ann_id = ann.get("id")
            image_id = ann.get("image_id")
            where = f"{self.ann_file}: annotation id {ann_id}"
            if image_id not in per_image:
                log.warning("%s: image_id %r is not in the images list; skipped", where, image_id)
                continue
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            bbox = ann.get("bbox")
            if not _valid_bbox(bbox):
                log.warning("%s: bbox %r is not 4 finite numbers; skipped", where, bbox)
                continue
            label = self.label_map.label(ann.get("category_id", -1))
            if label is None:
                log.warning("%s: category_id %r is not in the label map %s; skipped", where,
                            ann.get("category_id"), list(self.label_map.category_ids))
                continue
            info = self.coco.imgs[image_id]
            x0, y0, w, h = (float(v) for v in bbox)
            x1, y1 = min(x0 + w, float(info.get("width", x0 + w))), min(y0 + h, float(info.get("height", y0 + h)))
            x0, y0 = max(x0, 0.0), max(y0, 0.0)
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                degenerate += 1
                continue
            per_image[image_id].append(([x0, y0, x1 - x0, y1 - y0], label, int(ann_id)))
        if degenerate:
            log.warning("%s: dropped %d degenerate boxes (zero width or height inside the image)",
                        self.ann_file, degenerate)
        if crowd:
            log.info("%s: %d crowd annotations are not training targets", self.ann_file, crowd)
        self.num_degenerate = degenerate
        self.num_crowd = crowd
        return per_image

    def annotations(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes (N, 4) xywh px float32, labels (N,) int64, ann_ids (N,) int64) of one image."""
        entries = self._annotations[image_id]
        boxes = np.array([e[0] for e in entries], dtype=np.float32).reshape(-1, 4)
        labels = np.array([e[1] for e in entries], dtype=np.int64)
        ann_ids = np.array([e[2] for e in entries], dtype=np.int64)
        return boxes, labels, ann_ids

    # -- samples ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def load_rgb(self, image_id: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB; raises ImageLoadError naming the file on any problem."""
        path = self.image_path(image_id)
        kwargs = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
        rgb = load_image(path, **kwargs).rgb
        info = self.coco.imgs[image_id]
        expected = (info.get("height"), info.get("width"))
        if None not in expected and tuple(rgb.shape[:2]) != tuple(int(v) for v in expected):
            raise ImageLoadError(path, f"size {rgb.shape[0]}x{rgb.shape[1]} (HxW) differs from the "
                                       f"annotation file's {expected[0]}x{expected[1]} (image id {image_id})")
        return rgb

    def sample_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        # A broken image is reported once and replaced by the next good one, so batch sizes
        # (and DDP ranks' step counts) stay equal.
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            image_id = self.image_ids[i]
            if image_id in self.bad_images:
                continue
            try:
                rgb = self.load_rgb(image_id)
            except ImageLoadError as error:
                log.error("skipping image id %d: %s", image_id, error)
                self.bad_images.add(image_id)
                continue
            return self._make_sample(i, image_id, rgb)
        raise RuntimeError(f"{self.ann_file}: no readable image in the dataset")

    def _make_sample(self, index: int, image_id: int, rgb: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        boxes, labels, ann_ids = self.annotations(image_id)
        orig_h, orig_w = rgb.shape[:2]
        if self.transform is not None:
            tensor, boxes, labels, kept = self.transform(rgb, boxes, labels, self.sample_seed(index))
            ann_ids = ann_ids[kept]
        else:
            tensor = torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32)).div_(255.0)
        height, width = int(tensor.shape[1]), int(tensor.shape[2])
        xyxy = xywh_to_xyxy(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {
            "boxes": xyxy_to_cxcywh(xyxy[keep] / scale),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1)[keep],
            "ann_ids": torch.as_tensor(ann_ids, dtype=torch.int64).reshape(-1)[keep],
            "image_id": int(image_id),
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
            "size": torch.tensor([height, width], dtype=torch.int64),
            "seed": self.sample_seed(index),
        }
        return tensor, target


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """-> (images (B, 3, H, W), padding_mask (B, H, W) True=pad, targets) via preprocess.pad_batch."""
    images, targets = zip(*batch)
    padded, mask = pad_batch(list(images))
    return padded, mask, list(targets)


def crop_to_common_size(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]], min_visibility: float = 0.3
                        ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Random-crop every image of a batch to the batch's smallest height and width, so the
    padded batch has NO padding.

    Why: a batch padded to its largest image shows most images with zero padding beyond their
    border, while a single image at inference has none; convolutions see the two differently
    (padding stops being zero after the first conv + batch norm). A model trained only on
    padded batches then depends on the batch it is run in. Mixing unpadded batches in training
    removes that dependence. Boxes are clipped to the crop and dropped when less than
    `min_visibility` of their area stays inside; the offset is drawn from each sample's seed
    (reproducible). Targets keep the contract: normalised cxcywh of the cropped image.
    """
    height = min(int(image.shape[1]) for image, _ in batch)
    width = min(int(image.shape[2]) for image, _ in batch)
    out = []
    for image, target in batch:
        full_h, full_w = int(image.shape[1]), int(image.shape[2])
        rng = np.random.default_rng(int(target.get("seed", 0)) + 1)
        top = int(rng.integers(0, full_h - height + 1))
        left = int(rng.integers(0, full_w - width + 1))
        scale = torch.tensor([full_w, full_h, full_w, full_h], dtype=torch.float32)
        xyxy = cxcywh_to_xyxy(target["boxes"]) * scale
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        shifted = xyxy - torch.tensor([left, top, left, top], dtype=torch.float32)
        shifted[:, 0::2] = shifted[:, 0::2].clamp(0, width)
        shifted[:, 1::2] = shifted[:, 1::2].clamp(0, height)
        kept_area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
        keep = (kept_area > 0) & (kept_area >= min_visibility * area)
        new_scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        cropped = dict(target)
        cropped["boxes"] = xyxy_to_cxcywh(shifted[keep] / new_scale)
        cropped["labels"] = target["labels"][keep]
        cropped["ann_ids"] = target["ann_ids"][keep]
        cropped["size"] = torch.tensor([height, width], dtype=torch.int64)
        out.append((image[:, top:top + height, left:left + width], cropped))
    return out


class TrainCollate:
    """Training collate: with probability `common_crop_p` (decided per batch from the first
    sample's seed) the batch is first cropped to a common size (`crop_to_common_size`), then
    padded by `pad_batch` like any batch."""

    def __init__(self, common_crop_p: float = 0.0, min_visibility: float = 0.3) -> None:
        self.common_crop_p = float(common_crop_p)
        self.min_visibility = float(min_visibility)

    def __call__(self, batch):
        if self.common_crop_p > 0:
            draw = np.random.default_rng(int(batch[0][1].get("seed", 0)) + 2).random()
            if draw < self.common_crop_p:
                batch = crop_to_common_size(batch, self.min_visibility)
        return collate(batch)
