"""Exact capture of Hugging Face multi-scale deformable attention as a sampled `AttentionRecord`.

Families (`config.model_type`): deformable_detr (single-stage, box refinement, two-stage),
rt_detr, rt_detr_v2, d_fine, deimv2 (HGNetV2 or DINOv3 backbone; hybrid or lite encoder),
rf_detr, lw_detr, as implemented by transformers 5.x. The record holds
the sampling locations and softmax weights each DECODER layer's deformable cross-attention
really used (per layer, head, query, level and point), taken from the tensors handed to the
sampling core -- nothing is recomputed.

How each family is wrapped, and why:
  * deformable_detr, rt_detr, rf_detr, lw_detr: the decoder module calls an nn.Module
    `self.attn(value, spatial_shapes, spatial_shapes_list, level_start_index,
    sampling_locations, attention_weights, im2col_step)`; a supported forward hook (with
    args and kwargs) on that module reads the arguments. Only the decoder layers' modules are
    hooked: Deformable DETR's encoder has deformable SELF-attention (queries are feature
    cells, not detections) that does not belong in the decoder record; it is not captured.
  * rt_detr_v2: the decoder module calls the module-level FUNCTION
    `multi_scale_deformable_attention_v2` by its global name, so no hook can see its
    arguments; the name is replaced in its modeling module for the duration of the `with`
    block only (restored on exit, also on exceptions); pre/post forward hooks on the decoder
    modules tell which layer is calling. While the block is open, other models of this
    family in the same process go through the wrapper too (it only records while one of OUR
    decoder modules is running, so they are not affected otherwise).
  * d_fine, deimv2: the decoder module calls its INSTANCE attribute `self.ms_deformable_attn_core`;
    that attribute is replaced on each decoder module for the duration of the block (same
    restoring).
The wrappers call the original and return its result unchanged: capture changes no output.
If HF's internals change so that nothing is found, `record` raises RuntimeError naming the
family and the transformers version rather than returning an empty record.

Geometry: level strides come from the model (timm `feature_info`, the ResNet backbone's
config, `config.feat_strides`, the backbone patch size, and the stride of the extra levels'
convolutions, LW-DETR's patch size over its projector's scale factors), never from rounding
input/level sizes (which only CHECK them). The record's padding mask is level 0's as the model
computes it: Deformable DETR, RF-DETR and LW-DETR downsample `pixel_mask` (nearest); RT-DETR,
RT-DETR v2, D-FINE and DEIMv2 take no mask (all cells valid; maps still crop to `image_sizes`).
Encoder attention (`encoder=True`): the dense AIFI self-attention of rt_detr / rt_detr_v2 /
d_fine / deimv2 (hybrid encoder; DEIMv2's lite encoder has none) over its own top-level grid
(`AttentionRecord.encoder_self_size` / `encoder_self_stride`). Self-attention weights need
HF's "eager" attention: when `encoder` or `decoder_self` is asked and the model uses another
implementation, it is set to "eager" inside the block and restored on exit (results then
differ from the other implementation by float rounding only).
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from detection.models.hf.backbone_strides import first_conv_stride, hf_backbone_strides
from detection.models.outputs import AttentionGraph, AttentionRecord, SampledAttention

logger = logging.getLogger(__name__)

FAMILIES = ("deformable_detr", "rt_detr", "rt_detr_v2", "d_fine", "deimv2", "rf_detr", "lw_detr", "grounding-dino",
            "mm-grounding-dino")
_GROUNDING = ("grounding-dino", "mm-grounding-dino")  # Deformable DETR's layout, its backbone in conv_encoder
_HOOKED_CORE = ("deformable_detr", "rt_detr", "rf_detr", "lw_detr", *_GROUNDING)  # nn.Module `attn` inside the decoder module
_CORE_ATTRIBUTE = ("d_fine", "deimv2")  # instance attribute `ms_deformable_attn_core` of the decoder module
_LW_DETR_LIKE = ("rf_detr", "lw_detr")  # decoder layers' `cross_attn`; the others' `encoder_attn`
_MASKED = ("deformable_detr", "rf_detr", "lw_detr", *_GROUNDING)  # the models that downsample pixel_mask
_AIFI_FAMILIES = ("rt_detr", "rt_detr_v2", "d_fine", "deimv2")
_CORE_ARGS = ("value", "value_spatial_shapes", "value_spatial_shapes_list", "level_start_index",
              "sampling_locations", "attention_weights", "im2col_step")
_V2_ARGS = ("value", "value_spatial_shapes", "sampling_locations", "attention_weights", "num_points_list", "method")
_V2_FUNCTION = "multi_scale_deformable_attention_v2"


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _version() -> str:
    import transformers

    return transformers.__version__


def _read_cells(locations: torch.Tensor, level_sizes, counts) -> torch.Tensor:
    """Discrete sampler: (B, Q, heads, points, 2) locations -> the cells the model read, as (c_x / w, c_y / h).

    The cell is computed exactly as `multi_scale_deformable_attention_v2` does, in the model's
    own dtype (bf16 rounds differently from float32); stored as c / w in float32 so that any
    consumer recomputing int64(x·w + 0.5) in float32 finds the same cell c.
    """
    levels = []
    for (height, width), chunk in zip(level_sizes, locations.split(list(counts), dim=3)):
        cells = (chunk * torch.tensor([[width, height]], device=chunk.device) + 0.5).to(torch.int64)
        cells = torch.stack([cells[..., 0].clamp(0, width - 1), cells[..., 1].clamp(0, height - 1)], dim=-1)
        levels.append(cells.float() / torch.tensor([width, height], dtype=torch.float32, device=chunk.device))
    return torch.cat(levels, dim=3)


class SampledCapture:
    """Capture a deformable HF detector's decoder attention during one `with` block.

    Usage: `with SampledCapture(model) as capture: out = model(pixel_values=x,
    pixel_mask=m, **capture.forward_kwargs())`, then `capture.record(out, input_size=...,
    image_sizes=..., padding_mask=...)`. cross: decoder cross-attention -- captured even when
    False, because an `AttentionRecord` always holds its decoder cross-attention (the points
    cost little); encoder: the dense AIFI encoder self-attention (rt_detr / rt_detr_v2 / d_fine
    only; ValueError for the others); decoder_self: (L, B, heads, Q, Q). keep_graph: also keep,
    for gradients, each decoder layer's `attention_weights` tensor exactly as handed to the
    sampling core (un-detached, HF's layout); `graph()` returns them as an `AttentionGraph`.
    """

    def __init__(self, hf_model: nn.Module, *, cross: bool = True, encoder: bool = False, decoder_self: bool = False,
                 keep_graph: bool = False):
        family = getattr(getattr(hf_model, "config", None), "model_type", None)
        if family not in FAMILIES:
            raise ValueError(f"SampledCapture supports model types {FAMILIES}, got {family!r}")
        if encoder and family not in _AIFI_FAMILIES:
            raise ValueError(
                f"{family} has no dense encoder self-attention to capture (its encoder, if any, is deformable); "
                f"encoder attention is available for {_AIFI_FAMILIES}"
            )
        if encoder and getattr(hf_model.config, "encoder_type", "hybrid") == "lite":
            raise ValueError(f"{family} with encoder_type 'lite' has no AIFI encoder self-attention to capture")
        self.family = family
        self.model = hf_model
        self.cross = cross
        self.encoder = encoder
        self.decoder_self = decoder_self
        self.keep_graph = keep_graph
        self._graph: dict[int, torch.Tensor] = {}
        self._decoder_layers = list(hf_model.model.decoder.layers)
        self._undo: list[Callable[[], None]] = []
        self._active_layer: int | None = None
        self._cross: dict[int, dict[str, Any]] = {}
        self._self: dict[int, torch.Tensor | None] = {}
        self._encoder_layers: list[torch.Tensor | None] = []
        self._encoder_grid: tuple[int, int] | None = None
        self._encoder_stride: int | None = None

    def forward_kwargs(self) -> dict:
        """Extra keyword arguments for the forward call: none (everything comes through hooks)."""
        return {}

    # -- installing and removing ------------------------------------------------------------
    def __enter__(self) -> "SampledCapture":
        self._cross, self._self, self._encoder_layers, self._encoder_grid = {}, {}, [], None
        self._graph = {}
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()
        self._active_layer = None

    def _hook(self, module: nn.Module, hook: Callable, **kwargs) -> None:
        self._undo.append(module.register_forward_hook(hook, **kwargs).remove)

    def _install(self) -> None:
        config = self.model.config
        if (self.encoder or self.decoder_self) and config._attn_implementation != "eager":
            # the detector's own attention modules read the top-level config at every call;
            # set_attn_implementation would also re-dispatch the backbone (and may refuse to
            # switch back), so only this attribute is switched and restored
            previous = config._attn_implementation_internal
            config._attn_implementation_internal = "eager"
            self._undo.append(lambda: setattr(config, "_attn_implementation_internal", previous))
        for index, layer in enumerate(self._decoder_layers):
            module = getattr(layer, "cross_attn" if self.family in _LW_DETR_LIKE else "encoder_attn", None)
            if module is not None:
                self._install_cross(index, module)
            if self.decoder_self and isinstance(getattr(layer, "self_attn", None), nn.Module):
                self._hook(layer.self_attn, self._self_hook(index))
        if self.encoder:
            self._install_aifi()

    def _install_cross(self, index: int, module: nn.Module) -> None:
        if self.family in _HOOKED_CORE:
            core = getattr(module, "attn", None)
            if isinstance(core, nn.Module):
                self._hook(core, self._core_hook(index), with_kwargs=True)
        elif self.family in _CORE_ATTRIBUTE:
            original = module.__dict__.get("ms_deformable_attn_core")
            if callable(original):
                module.ms_deformable_attn_core = self._v2_wrapper(original, index)
                self._undo.append(lambda: setattr(module, "ms_deformable_attn_core", original))
        else:  # rt_detr_v2: the module-level function, looked up by name in the class's module
            modeling = sys.modules[type(module).__module__]
            original = getattr(modeling, _V2_FUNCTION, None)
            if not callable(original):
                return
            if getattr(original, "_detection_capture", None) is not self:  # once per block
                setattr(modeling, _V2_FUNCTION, self._v2_wrapper(original, None))
                self._undo.append(lambda: setattr(modeling, _V2_FUNCTION, original))
            self._undo.append(module.register_forward_pre_hook(lambda *_: setattr(self, "_active_layer", index)).remove)
            self._hook(module, lambda *_: setattr(self, "_active_layer", None))

    def _install_aifi(self) -> None:
        aifi = getattr(self.model.model.encoder, "aifi", None)
        if not isinstance(aifi, nn.ModuleList) or len(aifi) == 0:
            return
        if len(aifi) > 1:
            logger.info("%s has %d AIFI layers; the record keeps the top level's", self.family, len(aifi))
        top = aifi[-1]
        self._encoder_stride = int(self.model.config.feat_strides[self.model.config.encode_proj_layers[-1]])

        def grid(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._encoder_grid = (int(hidden.shape[-2]), int(hidden.shape[-1]))

        self._undo.append(top.register_forward_pre_hook(grid, with_kwargs=True).remove)
        for layer in top.layers:
            self._hook(layer.self_attn, lambda _m, _a, output: self._encoder_layers.append(output[1]))

    # -- hooks ---------------------------------------------------------------------------------
    def _core_hook(self, index: int) -> Callable:
        def hook(_module, args, kwargs, _output):
            bound = _bind(_CORE_ARGS, args, kwargs)
            if self.keep_graph:
                self._graph[index] = bound["attention_weights"]
            self._cross[index] = {
                "locations": bound["sampling_locations"].detach(),
                "weights": bound["attention_weights"].detach(),
                "level_sizes": tuple((int(h), int(w)) for h, w in bound["value_spatial_shapes_list"]),
                "points_per_level": None,
                "sampler": "bilinear",
            }
        return hook

    def _v2_wrapper(self, original: Callable, index: int | None) -> Callable:
        def wrapper(*args, **kwargs):
            layer = index if index is not None else self._active_layer
            if layer is not None:
                bound = _bind(_V2_ARGS, args, kwargs)
                method = bound.get("method", "default")
                if method not in ("default", "discrete"):
                    raise RuntimeError(f"{self.family}: unknown decoder_method {method!r} (transformers {_version()})")
                level_sizes = tuple((int(h), int(w)) for h, w in bound["value_spatial_shapes"])
                counts = tuple(int(n) for n in bound["num_points_list"])
                locations = bound["sampling_locations"].detach()
                if self.keep_graph:
                    self._graph[layer] = bound["attention_weights"]
                if method == "discrete":
                    locations = _read_cells(locations, level_sizes, counts)
                self._cross[layer] = {
                    "locations": locations,
                    "weights": bound["attention_weights"].detach(),
                    "level_sizes": level_sizes,
                    "points_per_level": counts,
                    "sampler": "nearest" if method == "discrete" else "bilinear",
                }
            return original(*args, **kwargs)

        wrapper._detection_capture = self
        return wrapper

    def _self_hook(self, index: int) -> Callable:
        def hook(_module, _args, output):
            self._self[index] = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        return hook

    # -- the record -------------------------------------------------------------------------------
    def _nothing(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{self.family}: the capture found {what} (transformers {_version()}); Hugging Face's internals "
            "may have changed -- see detection/models/hf/capture_sampled.py"
        )

    def graph(self) -> AttentionGraph:
        """The kept decoder `attention_weights` of the last forward pass (`keep_graph=True`), one
        tensor per layer in HF's layout (see `AttentionGraph.cross`)."""
        if not self.keep_graph:
            raise RuntimeError("SampledCapture.graph() needs keep_graph=True")
        layers = len(self._decoder_layers)
        if sorted(self._graph) != list(range(layers)):
            raise self._nothing(f"attention weights kept for decoder layers {sorted(self._graph)} of {layers}")
        return AttentionGraph(cross=tuple(self._graph[index] for index in range(layers)))

    def level_strides(self, levels: int) -> tuple[int, ...]:
        """Input pixels per cell of each of the decoder's `levels` feature levels, from the model."""
        config, base = self.model.config, self.model.model
        if self.family in _LW_DETR_LIKE:
            patch = config.backbone_config.patch_size
            patch = int(patch if isinstance(patch, int) else patch[0])
            # RF-DETR: one level at the patch size; LW-DETR: one level per projector scale
            # factor (2.0 upsamples the patch grid by a transposed convolution, 0.5 halves it)
            scales = config.projector_scale_factors if self.family == "lw_detr" else (1.0,)
            strides = [patch / float(scale) for scale in scales]
            if any(stride != int(stride) for stride in strides):
                raise ValueError(f"{self.family}: patch size {patch} over scale factors {scales} gives no whole strides")
            strides = [int(stride) for stride in strides]
            projections = []
        elif self.family in ("deformable_detr", *_GROUNDING):
            grounding = self.family in _GROUNDING
            backbone = base.backbone.conv_encoder.model if grounding else base.backbone.model
            info = getattr(backbone, "feature_info", None)
            strides = [int(s) for s in info.reduction()] if info is not None else hf_backbone_strides(backbone)
            projections = list(base.input_proj_vision if grounding else base.input_proj)
        else:
            strides = [int(s) for s in config.feat_strides]
            projections = list(base.decoder_input_proj)
        sources = len(strides)
        for level in range(sources, levels):
            # Deformable DETR chains its extra levels; the RT-DETR family feeds every extra
            # level from the last encoder output (DEIMv2: through an identity when the widths agree)
            previous = strides[-1] if self.family in ("deformable_detr", *_GROUNDING) else strides[sources - 1]
            projection = projections[level]
            strides.append(previous * (1 if isinstance(projection, nn.Identity) else first_conv_stride(projection)))
        return tuple(strides[:levels])

    def _check_strides(self, level_sizes, strides, input_size) -> None:
        for (height, width), stride in zip(level_sizes, strides):
            for cells, pixels in ((height, input_size[0]), (width, input_size[1])):
                if cells not in (pixels // stride, math.ceil(pixels / stride)):
                    raise RuntimeError(
                        f"{self.family}: level of {level_sizes} cells disagrees with stride {stride} for input "
                        f"{tuple(input_size)} (strides {strides}, transformers {_version()})"
                    )

    def _padding_mask(self, padding_mask: torch.Tensor | None, size: tuple[int, int], batch: int, device) -> torch.Tensor:
        if padding_mask is None or self.family not in _MASKED:
            return torch.zeros(batch, *size, dtype=torch.bool, device=device)
        pixel_mask = (~padding_mask.bool()).long()  # exactly the model's own downsampling
        return ~F.interpolate(pixel_mask[None].float(), size=size).to(torch.bool)[0]

    def record(self, outputs, *, input_size: tuple[int, int], image_sizes: torch.Tensor,
               padding_mask: torch.Tensor | None) -> AttentionRecord:
        """The sampled record of the last forward pass (conventions: detection/models/outputs.py)."""
        layers = len(self._decoder_layers)
        missing = [index for index in range(layers) if index not in self._cross]
        if len(missing) == layers:
            raise self._nothing("no decoder deformable attention")
        if missing:
            raise self._nothing(f"decoder layers {missing} of {layers} missing")
        calls = [self._cross[index] for index in range(layers)]
        first = calls[0]
        level_sizes = first["level_sizes"]
        strides = self.level_strides(len(level_sizes))
        self._check_strides(level_sizes, strides, input_size)
        sampled = SampledAttention.from_layers(
            [call["locations"] for call in calls], [call["weights"] for call in calls], level_sizes, strides,
            points_per_level=first["points_per_level"], sampler=first["sampler"],
        )
        queries = int(outputs.logits.shape[1])
        if sampled.num_queries != queries or sampled.batch_size != int(outputs.logits.shape[0]):
            raise RuntimeError(
                f"{self.family}: captured {sampled.num_queries} queries x {sampled.batch_size} images, the outputs have "
                f"{queries} x {int(outputs.logits.shape[0])} (transformers {_version()})"
            )
        batch = sampled.batch_size
        extra: dict[str, Any] = {}
        if self.encoder:
            if not self._encoder_layers or self._encoder_grid is None or any(w is None for w in self._encoder_layers):
                raise self._nothing("no AIFI encoder self-attention weights")
            extra = dict(encoder_self=torch.stack([w.detach().float() for w in self._encoder_layers]),
                         encoder_self_size=self._encoder_grid, encoder_self_stride=self._encoder_stride)
        if self.decoder_self:
            weights = [self._self.get(index) for index in range(layers)]
            if any(w is None for w in weights):
                raise self._nothing("no decoder self-attention weights")
            extra["decoder_self"] = torch.stack([w.detach().float() for w in weights])
        return AttentionRecord(
            decoder_cross_sampled=sampled,
            feature_padding_mask=self._padding_mask(padding_mask, level_sizes[0], batch, sampled.weights.device),
            feature_stride=strides[0],
            input_size=(int(input_size[0]), int(input_size[1])),
            image_sizes=torch.as_tensor(image_sizes, dtype=torch.int64),
            **extra,
        )


__all__ = ["FAMILIES", "SampledCapture"]
