"""OWLv2 behind the detector contract: OWL-ViT's prompt, patch-token queries and last-layer
attention (`owl.OwlDetector`), with OWLv2's geometry -- each image padded to a square first.

transformers' Owlv2ImageProcessor pads each rescaled image to a square (bottom/right, value 0),
blurs it (Gaussian, sigma = (side / size - 1) / 2) and resizes it to the model's size; its boxes
are relative to that square. The engine hands the model each image at its own size
(`PreprocessSpec.unresized`, normalised), so the forward here knows each image's exact extent
from the padding mask: it builds the squares as the processor does and maps the boxes back to
the image (the contract's convention), exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torchvision.transforms.v2.functional as tvF
from torch import nn

from detection.models.contract import PreprocessSpec
from detection.models.hf.detector import image_sizes_from_mask
from detection.models.hf.families import Family
from detection.models.hf.owl import OWL_QUERY_MEANING, OwlDetector, tokenize_prompt
from detection.models.hf.prompt import PromptedConfig, check_phrases
from detection.models.outputs import AttentionRecord


def square_inputs(images: torch.Tensor, image_sizes: torch.Tensor, side: int, pad_value: torch.Tensor) -> torch.Tensor:
    """What Owlv2ImageProcessor (torchvision backend) makes of each image, from the image itself.

    images: (B, 3, H, W) float, image b in its top-left (h_b, w_b) = image_sizes[b] (the rest is
    padding of the batch, ignored). Each image is padded bottom/right to a square of side
    s_b = max(h_b, w_b) with `pad_value` (3,) -- the processor's 0 after the same normalisation
    as `images` -- blurred with the processor's anti-aliasing Gaussian (sigma = (s_b / side - 1) / 2
    per axis, none when s_b <= side) and resized bilinearly without antialias to (side, side).
    Returns float32 (B, 3, side, side). Blur and resize weights sum to 1, so normalising before
    them (here) or after (the processor) agree to float rounding.
    """
    squares = images.new_empty((images.shape[0], images.shape[1], side, side), dtype=torch.float32)
    fill = pad_value.to(device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    with torch.autocast(images.device.type, enabled=False):  # the processor's float32 arithmetic
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (height, width) in enumerate(image_sizes.tolist()):
            groups.setdefault((int(height), int(width)), []).append(index)
        for (height, width), members in groups.items():
            size = max(height, width)
            square = fill.expand(len(members), -1, size, size).clone()
            square[:, :, :height, :width] = images[members, :, :height, :width].float()
            # Owlv2ImageProcessor.resize, as transformers writes it
            factors = torch.tensor([size, size]) / torch.tensor([side, side])
            sigma = ((factors - 1) / 2).clamp(min=0)
            if not bool(torch.any(sigma == 0)):
                kernel = 2 * torch.ceil(3 * sigma).int() + 1
                square = tvF.gaussian_blur(square, [int(kernel[0]), int(kernel[1])], sigma=sigma.tolist())
            squares[members] = tvF.resize(square, [side, side], interpolation=tvF.InterpolationMode.BILINEAR,
                                          antialias=False)
    return squares


class Owlv2Detector(OwlDetector):
    """OWLv2 with a prompt, through the contract.

    forward(images (B, 3, H, W): each image at its own size, normalised (preprocess_spec),
    padded bottom/right to the batch's largest; padding_mask (B, H, W) True on that padding):
    each image becomes the processor's square (`square_inputs`) and the model runs on
    (B, 3, S, S), S = the vision model's image size. pred_logits (B, P, C) as OWL-ViT's;
    pred_boxes (B, P, 4) cxcywh relative to each image's own extent (HF's are relative to the
    square: x scaled by s_b / w_b, y by s_b / h_b); objectness_logits (B, P), HF's
    class-agnostic objectness of each patch. With cross_attention the record is OWL-ViT's (the
    last vision layer's patch rows over the S/p x S/p patch grid, input_size (S, S)) with
    image_sizes[b] the image's extent inside the square, round(h_b * S / s_b) x
    round(w_b * S / s_b), and the patches wholly outside it marked in feature_padding_mask (the
    model attends to them, so their weights are kept; maps crop them).
    """

    def square_side(self) -> int:
        return int(self.hf_model.config.vision_config.image_size)

    def _pad_value(self) -> torch.Tensor:
        spec = self.preprocess_spec
        if spec.mean is None:
            return torch.zeros(3)
        return -torch.tensor(spec.mean) / torch.tensor(spec.std)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                cross_attention: bool = False, encoder_attention: bool = False,
                decoder_self_attention: bool = False, keep_graph: bool = False,
                keep_features: bool = False) -> dict[str, Any]:
        batch, _, height, width = images.shape
        if padding_mask is None:
            padding_mask = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
        extents = image_sizes_from_mask(padding_mask).to(images.device)
        side = self.square_side()
        pixels = square_inputs(images, extents, side, self._pad_value())
        objectness: list[torch.Tensor] = []
        handle = self.hf_model.register_forward_hook(
            lambda _module, _args, output: objectness.append(getattr(output, "objectness_logits", None)))
        try:
            outputs = super().forward(pixels, None, cross_attention=cross_attention,
                                      encoder_attention=encoder_attention,
                                      decoder_self_attention=decoder_self_attention, keep_graph=keep_graph,
                                      keep_features=keep_features)
        finally:
            handle.remove()
        if not objectness or objectness[-1] is None:
            raise RuntimeError(f"{self.family.title}: {type(self.hf_model).__name__}'s output has no "
                               "'objectness_logits': the model this code reads was renamed; the OWLv2 support "
                               "needs updating")
        sides = extents.max(dim=1).values.to(torch.float32)
        scale = sides[:, None] / extents.flip(1).to(torch.float32)  # (B, 2): s / w, s / h
        # in float32: a bf16 scale would move every box by up to 0.4 %
        outputs["pred_boxes"] = outputs["pred_boxes"].float() * scale.repeat(1, 2)[:, None, :]
        outputs["objectness_logits"] = objectness[-1]
        if outputs["attention"] is not None:
            outputs["attention"] = self._square_record(outputs["attention"], extents)
        return outputs

    def _square_record(self, record: AttentionRecord, extents: torch.Tensor) -> AttentionRecord:
        """OWL-ViT's record over the square with each image's extent inside it (see forward)."""
        side = self.square_side()
        stride = int(record.feature_stride)
        grid_h, grid_w = record.feature_size
        sizes, mask = [], torch.ones((len(extents), grid_h, grid_w), dtype=torch.bool)
        for index, (height, width) in enumerate(extents.tolist()):
            size = max(height, width)
            inside = (max(1, round(height * side / size)), max(1, round(width * side / size)))
            sizes.append(inside)
            rows, cols = -(-height * side // (size * stride)), -(-width * side // (size * stride))
            mask[index, :rows, :cols] = False
        device = record.decoder_cross.device
        return dataclasses.replace(record, image_sizes=torch.tensor(sizes, dtype=torch.int64, device=device),
                                   feature_padding_mask=mask.to(device))


def build_owlv2_detector(hf_model: nn.Module, family: Family, preprocess: PreprocessSpec, tokenizer: Any,
                         phrases: Sequence[str], name: str, source: str) -> Owlv2Detector:
    """An Owlv2Detector for `phrases`. preprocess: the folder's processor as `processor_spec` reads
    it (a fixed square resize with mean / std); the detector's own spec keeps its normalisation
    and leaves the size to the model. ValueError when the processor's square is not the vision
    model's image size; PromptError when the prompt is empty or a phrase too long."""
    phrases = check_phrases(phrases)
    side = int(hf_model.config.vision_config.image_size)
    if preprocess.resize != "fixed" or tuple(preprocess.fixed_size) != (side, side):
        resized = preprocess.fixed_size or preprocess.resize
        raise ValueError(f"{family.title}: the image processor resizes to {resized}, but the vision model takes "
                         f"{side}x{side} squares")
    limit = int(hf_model.config.text_config.max_position_embeddings)
    prompt = tokenize_prompt(tokenizer, phrases, limit, family.title)
    grid = side // int(hf_model.config.vision_config.patch_size)
    config = PromptedConfig(name=name, model_type=family.model_type, class_names=phrases,
                            category_ids=tuple(range(len(phrases))), num_queries=grid * grid, source=source,
                            prompt=phrases, query_meaning=OWL_QUERY_MEANING)
    spec = PreprocessSpec.unresized(mean=preprocess.mean, std=preprocess.std, backend="torch")
    return Owlv2Detector(hf_model.eval(), family, spec, config, prompt, tokenizer)
