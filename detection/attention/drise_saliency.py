"""D-RISE: saliency of a detection from randomly masked copies of its image (any detector).

Petsiuk et al., "Black-box Explanation of Object Detectors via Saliency Maps" (CVPR 2021).
N random masks (RISE's: a binary grid_size x grid_size grid, each cell kept with `probability`,
upsampled bilinearly to (grid_size + 1) cells and shifted by a random offset below one cell)
multiply the model input; each masked copy is detected, and mask i is weighted, for target t,
by the best detection-similarity over the masked copy's detections j:

    w_ti = max_j IoU(L_t, L_j) · cos(P_t, P_j) · O_j
    P_t = one-hot of the target's class (the paper's target vector); P_j the class probabilities;
    O_j objectness: 1 − p(no object) for a softmax-with-no-object rule, 1 for sigmoid rules.

Saliency S_t = Σ_i w_ti · M_i / Σ_i M_i over the model input's pixels: the paper's weighted sum of
masks divided by each pixel's own mask coverage (as xaitk-saliency's DRISEScoring does; equal to its
maps up to their per-detection max-abs scale, tested). The paper's (1/N) Σ_i w_ti · M_i carries each
pixel's coverage, Σ_i M_i / N = p ± sqrt(p(1 − p)/N), times the mean weight: at N = 300 that noise
outranked the signal, and D-RISE lost to a Gaussian in the box on deletion. Only the detector contract
is used (preprocess_spec for the masked fill, postprocess_rule for probabilities, a forward callable).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from detection.boxes import cxcywh_to_xyxy
from detection.models.contract import PostprocessRule, PreprocessSpec

ForwardFn = Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]
# masks per forward pass when not given: about this many input pixels per batch
_AUTO_BATCH_PIXELS = 2_000_000
#: What masked pixels become: black (the paper's and RISE's), or the image's mean colour (the
#: substrate of eval's deletion / insertion curves, `attention.perturbation`).
FILLS = ("black", "mean")


@dataclass(frozen=True)
class DriseOptions:
    """num_masks N; grid_size: cells per side of the random grid; probability: share of cells
    kept; seed: the masks' generator seed (same seed and input size -> same masks); fill: what
    masked pixels become (`FILLS`); batch_size:
    masks per forward pass (None: about 2 M input pixels per batch, at most 64); max_side: the
    stored map's long side is at most this many cells (the map is averaged down by an integer
    factor, see `drise_maps`)."""

    num_masks: int = 1000
    grid_size: int = 16
    probability: float = 0.5
    seed: int = 0
    batch_size: int | None = None
    max_side: int = 256
    fill: str = "black"

    def __post_init__(self) -> None:
        if self.num_masks < 1 or self.grid_size < 1 or self.max_side < 1:
            raise ValueError(f"D-RISE num_masks, grid_size and max_side must be >= 1, got {self}")
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(f"D-RISE probability must be in (0, 1], got {self.probability}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"D-RISE batch_size must be >= 1, got {self.batch_size}")
        if self.fill not in FILLS:
            raise ValueError(f"D-RISE fill must be one of {FILLS}, got {self.fill!r}")


@dataclass(frozen=True)
class MaskSet:
    """The random part of N masks for one input size: binary grids (N, g, g) and per-mask
    shifts (N, 2) (dy, dx) in pixels of the upsampled grid; `masks(start, stop)` draws them."""

    grids: torch.Tensor
    shifts: torch.Tensor
    input_size: tuple[int, int]
    cell_size: tuple[int, int]

    def masks(self, start: int, stop: int) -> torch.Tensor:
        """Masks start..stop-1 as float32 (n, h, w) in [0, 1] at the input size."""
        height, width = self.input_size
        cell_h, cell_w = self.cell_size
        grid = self.grids.shape[-1]
        upsampled = F.interpolate(self.grids[start:stop, None], size=((grid + 1) * cell_h, (grid + 1) * cell_w),
                                  mode="bilinear", align_corners=False)[:, 0]
        rows = self.shifts[start:stop, 0, None] + torch.arange(height)  # (n, h)
        cols = self.shifts[start:stop, 1, None] + torch.arange(width)  # (n, w)
        index = torch.arange(stop - start)[:, None, None]
        return upsampled[index, rows[:, :, None], cols[:, None, :]].clamp_(0.0, 1.0)  # bilinear rounding


def random_masks(input_size: tuple[int, int], options: DriseOptions) -> MaskSet:
    """The seeded random grids and shifts of `options.num_masks` masks for an input (h, w)."""
    height, width = (int(v) for v in input_size)
    generator = torch.Generator().manual_seed(int(options.seed))
    grid = int(options.grid_size)
    cell_h, cell_w = math.ceil(height / grid), math.ceil(width / grid)
    grids = (torch.rand((options.num_masks, grid, grid), generator=generator) < options.probability).float()
    shift_y = torch.randint(0, cell_h, (options.num_masks,), generator=generator)
    shift_x = torch.randint(0, cell_w, (options.num_masks,), generator=generator)
    return MaskSet(grids, torch.stack([shift_y, shift_x], dim=1), (height, width), (cell_h, cell_w))


def objectness(probabilities: torch.Tensor, rule: PostprocessRule) -> torch.Tensor:
    """O_j of each query from its (…, C) class probabilities (`rule.class_probabilities`):
    1 − p(no object) = the sum over real classes for softmax_no_object, 1 for sigmoid rules."""
    if rule.kind == "softmax_no_object":
        return probabilities.sum(dim=-1)
    return torch.ones(probabilities.shape[:-1], dtype=probabilities.dtype, device=probabilities.device)


def detection_similarity(
    target_boxes: torch.Tensor,
    target_labels: torch.Tensor,
    boxes: torch.Tensor,
    probabilities: torch.Tensor,
    objectness_scores: torch.Tensor,
) -> torch.Tensor:
    """D-RISE weight of each (target, masked copy): (T, B) = max_j IoU · cos(one-hot, P_j) · O_j.

    target_boxes (T, 4) and boxes (B, Q, 4) xyxy in the same coordinates; target_labels (T,);
    probabilities (B, Q, C); objectness_scores (B, Q). cos(one-hot(c), P) = P_c / ||P||.
    """
    batch, queries, _ = boxes.shape
    ious = box_iou(target_boxes.double(), boxes.reshape(-1, 4).double()).reshape(-1, batch, queries)
    probabilities = probabilities.double()
    norms = probabilities.norm(dim=-1).clamp_min(1e-12)  # (B, Q)
    cosine = probabilities[..., target_labels.long()].permute(2, 0, 1) / norms  # (T, B, Q)
    return (ious * cosine * objectness_scores.double()).amax(dim=-1).float()


def drise_saliency(
    forward: ForwardFn,
    image: torch.Tensor,
    target_boxes: torch.Tensor,
    target_labels: torch.Tensor,
    spec: PreprocessSpec,
    rule: PostprocessRule,
    options: DriseOptions = DriseOptions(),
) -> torch.Tensor:
    """D-RISE saliency (T, h, w) float32 over the model input's pixels of ONE image.

    forward: (images (n, 3, h, w), padding_mask (n, h, w)) -> outputs with "pred_logits" and
    "pred_boxes" (normalised cxcywh), e.g. the engine's prepared model (bf16 where it runs so).
    image: (3, h, w) model input (`image_to_input`, unpadded); masked pixels become black (0 in
    [0, 1], i.e. −mean/std when the spec normalises) by default. target_boxes (T, 4) xyxy normalised to
    [0, 1] of the image; target_labels (T,). Every target shares the same N forward passes.
    options.fill "mean": masked pixels take the image's mean colour (per channel) instead.
    Returns S_t = Σ_i w_ti M_i / Σ_i M_i per pixel (see the module docstring).
    """
    if image.ndim != 3:
        raise ValueError(f"image must be one (3, h, w) model input, got {tuple(image.shape)}")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    mask_set = random_masks((height, width), options)
    batch_size = options.batch_size or max(1, min(64, _AUTO_BATCH_PIXELS // (height * width)))
    image = image.float().cpu()
    fill = torch.zeros(3, 1, 1)
    if options.fill == "mean":
        fill = image.mean(dim=(1, 2)).view(3, 1, 1)  # normalisation is affine per channel: the mean colour's input
    elif spec.mean is not None:
        fill = -torch.tensor(spec.mean).view(3, 1, 1) / torch.tensor(spec.std).view(3, 1, 1)
    target_boxes = target_boxes.float().cpu().reshape(-1, 4)
    target_labels = torch.as_tensor(target_labels, dtype=torch.int64).reshape(-1)
    saliency = torch.zeros((len(target_labels), height * width), dtype=torch.float64)
    coverage = torch.zeros(height * width, dtype=torch.float64)
    for start in range(0, options.num_masks, batch_size):
        stop = min(start + batch_size, options.num_masks)
        masks = mask_set.masks(start, stop)  # (n, h, w)
        masked = image * masks[:, None] + fill * (1.0 - masks[:, None])
        padding = torch.zeros((stop - start, height, width), dtype=torch.bool)
        with torch.no_grad():
            outputs = forward(masked, padding)
        probabilities = rule.class_probabilities(outputs["pred_logits"]).float().cpu()
        boxes = cxcywh_to_xyxy(outputs["pred_boxes"].float().cpu())
        weights = detection_similarity(target_boxes, target_labels, boxes, probabilities,
                                       objectness(probabilities, rule))  # (T, n)
        flat = masks.reshape(stop - start, -1).double()
        saliency += weights.double() @ flat
        coverage += flat.sum(dim=0)
    # a pixel no mask ever kept has no evidence: 0 (only possible for tiny N)
    saliency = torch.where(coverage > 0, saliency / coverage.clamp_min(1e-12), torch.zeros_like(saliency))
    return saliency.reshape(-1, height, width).float()


def downsample_factor(input_size: tuple[int, int], max_side: int) -> int:
    """Smallest integer k with ceil(long side / k) <= max_side."""
    return max(1, math.ceil(max(int(v) for v in input_size) / int(max_side)))


def pool_saliency(saliency: torch.Tensor, factor: int) -> torch.Tensor:
    """(T, h, w) -> (T, ceil(h/k), ceil(w/k)): mean of each k x k block, edges replicated to
    fill the last blocks; block (y, x) then covers input pixels [y·k, (y+1)·k) like a feature
    cell of stride k, so `attention.maps.cells_to_image` takes it to original pixels."""
    if factor == 1:
        return saliency
    height, width = saliency.shape[-2:]
    pad_h, pad_w = -height % factor, -width % factor
    padded = F.pad(saliency[:, None], (0, pad_w, 0, pad_h), mode="replicate")
    return F.avg_pool2d(padded, factor)[:, 0]
