"""Dense attention of Hugging Face detectors (YOLOS, Conditional DETR, DAB-DETR, Table Transformer).

`DenseCapture` hooks a transformers *ForObjectDetection model for one forward pass and turns what
the attention modules computed into a dense `AttentionRecord` (see detection/models/outputs.py).
"""
from __future__ import annotations

import logging
import math
import sys
import weakref
from typing import Any, Callable

import torch
from torch import nn

from detection.models.outputs import AttentionGraph, AttentionRecord

logger = logging.getLogger(__name__)

FAMILIES = ("yolos", "conditional_detr", "dab-detr", "table-transformer")
# Families whose attention modules call HF's AttentionInterface (eager, sdpa, ...): captured by
# pointing the hooked modules at a private interface entry that delegates the output to the
# model's own implementation. The others compute eager attention inline and return the weights
# when asked: captured by forward hooks that ask (and hide the answer from callers that did not).
_INTERFACE_FAMILIES = ("yolos", "conditional_detr")
_CAPTURED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models inside a DenseCapture now


class _ConfigView:
    """A module's config seen through, with another `_attn_implementation`."""

    def __init__(self, config: Any, attn_implementation: str) -> None:
        self._config = config
        self._attn_implementation = attn_implementation

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _softmax_rows(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """softmax(query @ key^T * scaling + mask) in float32, as HF's eager attention computes it.

    query (B, heads, R, d), key (B, heads, K, d); mask broadcastable to (B, heads, R, K): bool
    (True = attend, SDPA's convention) or additive float (eager's).
    """
    scores = torch.matmul(query.float() * scaling, key.float().transpose(-1, -2))  # scaling the smaller operand
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise RuntimeError(f"cannot capture attention under a {type(mask).__name__} mask (use eager or sdpa)")
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask.float())
    return scores.softmax(dim=-1)


def _mask_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if mask is None or not isinstance(mask, torch.Tensor) or mask.shape[-2] == 1:
        return mask
    return mask[..., rows, :]


class DenseCapture:
    """Capture dense attention of a HF YOLOS / Conditional DETR / DAB-DETR / Table Transformer.

    Use: `with DenseCapture(model, encoder=..., decoder_self=...) as capture: out =
    model(pixel_values=x, pixel_mask=m, **capture.forward_kwargs())`, then `capture.record(out,
    input_size=..., image_sizes=..., padding_mask=...)`. The decoder cross-attention is always
    captured (the record is built around it, as `DETR.forward` does), so `cross` is accepted for
    the shared interface only. The model's outputs are unchanged, and SDPA stays in use where the
    model was loaded with it: the weights are recomputed from the queries and keys the module
    computed, for the rows needed only. For YOLOS and Conditional DETR (which call HF's
    AttentionInterface) the hooked attention modules see, while the context lasts, a config view
    whose attention implementation is a private interface entry delegating to the model's own;
    DAB-DETR and Table Transformer (eager attention written inline) are asked for their weights
    by forward pre-hooks, and callers that did not ask get None as before. One capture per model
    at a time.

    YOLOS: the detection tokens' rows, every layer and head, over the patch tokens: raw softmax
    weights (the softmax runs over [CLS] + patches + detection tokens, as in the model; the
    [CLS] and detection columns are left out, not renormalised, so a row sums to < 1).
    `token_rows[layer]` keeps the full rows (B, heads, D, N) over all N tokens. YOLOS takes no
    pixel mask and attends to padded patches too: their weights stay as the model used them,
    and the record's feature padding mask marks the patches that hold no pixel of the image
    (from `image_sizes`). The patch embedding drops the last H mod p rows and W mod p columns;
    where an image reaches into them its record `image_sizes` is clipped to the patches' extent.

    keep_graph: also keep, for gradients, the very weight tensors the model multiplied with
    (un-detached, per layer, before any slicing or float conversion): `graph()` returns them as
    an `AttentionGraph` -- every role, whatever the record holds (YOLOS: every layer's full
    (B, heads, T, T) weights as `tokens`). The interface route then runs the hooked modules with
    eager attention (SDPA computes no weights to keep; outputs differ from SDPA's by float
    rounding only, and not at all for the eager models `load_hf_detector` builds). The record
    is the same detached copy either way.
    """

    def __init__(self, hf_model: nn.Module, *, cross: bool = True, encoder: bool = False,
                 decoder_self: bool = False, keep_graph: bool = False) -> None:
        family = getattr(getattr(hf_model, "config", None), "model_type", None)
        if family not in FAMILIES:
            raise ValueError(f"DenseCapture handles model types {FAMILIES}, got {family!r}")
        self.model = hf_model
        self.family = family
        self.cross = True
        self.encoder = bool(encoder)
        self.decoder_self = bool(decoder_self)
        self.keep_graph = bool(keep_graph)
        self._roles = {"cross": {}, "encoder": {}, "decoder_self": {}}  # role -> {layer: tensor}
        self._graph: dict[str, dict[int, torch.Tensor]] = {"cross": {}, "encoder": {}, "decoder_self": {}, "tokens": {}}
        self.token_rows: dict[int, torch.Tensor] = {}
        self._grid: dict[str, Any] = {}
        try:
            self._targets = self._find_targets()
        except AttributeError as error:  # HF renamed the modules the capture hooks
            raise RuntimeError(self._nothing_message(f"cannot find the attention modules ({error})")) from error
        self._handles: list[Any] = []
        self._views: dict[nn.Module, Any] = {}
        self._interface_name: str | None = None
        self._forced: set[nn.Module] = set()
        self._holds_model = False

    # -- which modules ------------------------------------------------------------------------
    def _find_targets(self) -> dict[nn.Module, tuple[str, int]]:
        """{attention module: (role, layer)}; role "yolos" computes every requested block."""
        model = self.model
        if self.family == "yolos":
            return {layer.attention.attention: ("yolos", i) for i, layer in enumerate(model.vit.encoder.layer)}
        encoder_layers, decoder_layers = model.model.encoder.layers, model.model.decoder.layers
        targets: dict[nn.Module, tuple[str, int]] = {}
        for i, layer in enumerate(decoder_layers):
            if self.family == "dab-detr":
                cross, self_attn = layer.cross_attn.cross_attn, layer.self_attn.self_attn
            else:
                cross, self_attn = layer.encoder_attn, layer.self_attn
            targets[cross] = ("cross", i)
            if self.decoder_self or self.keep_graph:
                targets[self_attn] = ("decoder_self", i)
        if self.encoder or self.keep_graph:
            for i, layer in enumerate(encoder_layers):
                targets[layer.self_attn] = ("encoder", i)
        return targets

    def _expected_layers(self) -> tuple[int, int]:
        """(decoder layers, encoder layers) the record must hold."""
        config = self.model.config
        if self.family == "yolos":
            return config.num_hidden_layers, config.num_hidden_layers
        return config.decoder_layers, config.encoder_layers

    def forward_kwargs(self) -> dict:
        """Nothing extra: the hooks ask the modules themselves."""
        return {}

    # -- install / remove -----------------------------------------------------------------------
    def __enter__(self) -> "DenseCapture":
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _install(self) -> None:
        if self.model in _CAPTURED:
            raise RuntimeError("this model is already inside a DenseCapture (one capture per model at a time)")
        _CAPTURED.add(self.model)
        self._holds_model = True
        if self.family in _INTERFACE_FAMILIES:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            self._interface_name = f"detection_dense_capture_{id(self)}"
            ALL_ATTENTION_FUNCTIONS[self._interface_name] = self._attention_function
            for module in self._targets:
                self._views[module] = module.config
                module.config = _ConfigView(module.config, self._interface_name)
        else:
            for module in self._targets:
                self._handles.append(module.register_forward_pre_hook(self._ask_for_weights, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._take_weights))
        if self.family == "yolos":
            projection = self.model.vit.embeddings.patch_embeddings.projection
            self._handles.append(projection.register_forward_hook(self._take_patch_grid))
        else:
            conv_encoder = self._conv_encoder()
            self._handles.append(conv_encoder.register_forward_hook(self._take_feature_mask))

    def _remove(self) -> None:
        if self._holds_model:
            _CAPTURED.discard(self.model)
            self._holds_model = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, config in self._views.items():
            module.config = config
        self._views.clear()
        self._forced.clear()
        if self._interface_name is not None:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            if self._interface_name in ALL_ATTENTION_FUNCTIONS:
                del ALL_ATTENTION_FUNCTIONS[self._interface_name]
            self._interface_name = None

    def _conv_encoder(self) -> nn.Module:
        found = [m for m in self.model.modules() if type(m).__name__.endswith("ConvEncoder")]
        if len(found) != 1:
            raise RuntimeError(self._nothing_message(f"{len(found)} *ConvEncoder backbones (expected 1)"))
        return found[0]

    # -- hooks: geometry ----------------------------------------------------------------------------
    def _take_patch_grid(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._grid = {"size": tuple(output.shape[-2:]), "input_size": tuple(args[0].shape[-2:])}

    def _take_feature_mask(self, module: nn.Module, args: tuple, output: Any) -> None:
        feature_map, mask = output[-1]
        self._grid = {"size": tuple(feature_map.shape[-2:]), "input_size": tuple(args[0].shape[-2:]),
                      "padding": ~mask.detach().bool()}

    # -- hooks: the interface route (YOLOS, Conditional DETR) --------------------------------------
    def _attention_function(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, **kwargs: Any):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        config = self._views.get(module)
        if config is None:  # a module we did not hook (cannot happen unless configs are shared oddly)
            raise RuntimeError(f"DenseCapture's attention function called for an unhooked {type(module).__name__}")
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        implementation: Callable = (eager if self.keep_graph
                                    else ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager))
        output, weights = implementation(module, query, key, value, attention_mask, **kwargs)
        if self.keep_graph:
            role, layer = self._targets[module]
            self._graph["tokens" if role == "yolos" else role][layer] = weights
        scaling = kwargs.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        with torch.no_grad():
            self._store_interface(module, query.detach(), key.detach(), attention_mask,
                                  scaling, None if weights is None else weights.detach())
        return output, weights

    def _store_interface(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                         mask: torch.Tensor | None, scaling: float, weights: torch.Tensor | None) -> None:
        role, layer = self._targets[module]

        def rows(selection: slice) -> torch.Tensor:
            if weights is not None:  # eager computed them already: the weights the model used
                # a copy, never a view: a view of YOLOS's rows would keep every layer's full
                # (heads, N, N) weights alive (GBs at 800x1333, and the forward slows down)
                return weights[..., selection, :].to(torch.float32, copy=True)
            return _softmax_rows(query[..., selection, :], key, _mask_rows(mask, selection), scaling)

        if role != "yolos":
            if self._recorded(role):
                self._roles[role][layer] = rows(slice(None))
            return
        detections = int(self.model.config.num_detection_tokens)
        tokens = int(key.shape[-2])
        patches = slice(1, tokens - detections)
        detection_rows = rows(slice(tokens - detections, tokens))  # (B, heads, D, N)
        self.token_rows[layer] = detection_rows
        self._roles["cross"][layer] = detection_rows[..., patches]
        if self.decoder_self:
            self._roles["decoder_self"][layer] = detection_rows[..., tokens - detections:]
        if self.encoder:
            self._roles["encoder"][layer] = rows(patches)[..., patches]

    # -- hooks: the weights route (DAB-DETR, Table Transformer) ------------------------------------
    def _ask_for_weights(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("output_attentions"):
            return None
        if "output_attentions" not in kwargs and len(args) > 1:
            return None  # called positionally: leave it alone; record() then reports nothing captured
        self._forced.add(module)
        return args, {**kwargs, "output_attentions": True}

    def _take_weights(self, module: nn.Module, args: tuple, output: Any) -> Any:
        forced = module in self._forced
        self._forced.discard(module)
        if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
            role, layer = self._targets[module]
            if self._recorded(role):
                self._roles[role][layer] = output[1].detach().float()
            if self.keep_graph:
                self._graph[role][layer] = output[1]
        if forced and isinstance(output, tuple) and len(output) > 1:
            return (output[0], None, *output[2:])  # callers that did not ask get what they got before
        return None

    # -- the record -------------------------------------------------------------------------------
    def _recorded(self, role: str) -> bool:
        """Whether the record holds `role` (keep_graph hooks every role, the record only those asked)."""
        return role == "cross" or (role == "encoder" and self.encoder) or (role == "decoder_self" and self.decoder_self)

    def _nothing_message(self, what: str) -> str:
        return (f"DenseCapture: {what} for model type {self.family!r} with transformers {_transformers_version()}; "
                "the Hugging Face attention modules no longer route attention the way this capture expects")

    def _stacked(self, role: str, layers: int) -> torch.Tensor:
        captured = self._roles[role]
        if sorted(captured) != list(range(layers)):
            raise RuntimeError(self._nothing_message(
                f"captured {role} attention of layers {sorted(captured)} (expected {layers} layers)"))
        return torch.stack([captured[i] for i in range(layers)])

    def graph(self) -> AttentionGraph:
        """The kept weight tensors of the last forward pass (`keep_graph=True`; see the class)."""
        if not self.keep_graph:
            raise RuntimeError("DenseCapture.graph() needs keep_graph=True")
        decoder_layers, encoder_layers = self._expected_layers()

        def layers(role: str, count: int) -> tuple[torch.Tensor, ...]:
            kept = self._graph[role]
            if sorted(kept) != list(range(count)):
                raise RuntimeError(self._nothing_message(f"kept {role} weights of layers {sorted(kept)} "
                                                         f"(expected {count} layers)"))
            return tuple(kept[i] for i in range(count))

        if self.family == "yolos":
            return AttentionGraph(tokens=layers("tokens", decoder_layers),
                                  detection_tokens=int(self.model.config.num_detection_tokens))
        return AttentionGraph(cross=layers("cross", decoder_layers), decoder_self=layers("decoder_self", decoder_layers),
                              encoder=layers("encoder", encoder_layers))

    def record(self, outputs: Any, *, input_size: tuple[int, int], image_sizes: torch.Tensor,
               padding_mask: torch.Tensor | None) -> AttentionRecord:
        """The dense record of the last forward pass in this context (see the class docstring).

        outputs: what hf_model(...) returned (checked for its query count); input_size (H, W) of
        pixel_values; image_sizes (B, 2) (h, w) before padding; padding_mask (B, H, W) True on
        padding or None (the feature mask is the one the model computed from its pixel_mask).
        """
        if not self._grid:
            raise RuntimeError(self._nothing_message("no backbone / patch grid was seen"))
        decoder_layers, encoder_layers = self._expected_layers()
        cross = self._stacked("cross", decoder_layers)  # (L, B, heads, Q, K)
        height, width = (int(v) for v in self._grid["size"])
        if tuple(int(v) for v in input_size) != tuple(int(v) for v in self._grid["input_size"]):
            raise ValueError(f"input_size {tuple(input_size)} differs from the model's input "
                             f"{self._grid['input_size']}")
        if cross.shape[-1] != height * width:
            raise RuntimeError(self._nothing_message(
                f"cross-attention over {cross.shape[-1]} keys for a {height}x{width} feature grid"))
        logits = getattr(outputs, "logits", None)
        if logits is not None and logits.shape[1] != cross.shape[3]:
            raise RuntimeError(self._nothing_message(f"{cross.shape[3]} captured queries for {logits.shape[1]} logits"))
        image_sizes = torch.as_tensor(image_sizes, dtype=torch.int64).reshape(-1, 2).cpu()
        if self.family == "yolos":
            stride = int(self.model.config.patch_size)
            feature_padding, image_sizes = self._patch_padding(image_sizes, (height, width), stride)
        else:
            stride = _grid_stride(input_size, (height, width))
            feature_padding = self._grid["padding"]
        return AttentionRecord(
            decoder_cross=cross.reshape(*cross.shape[:-1], height, width),
            feature_padding_mask=feature_padding.to(cross.device),
            feature_stride=stride,
            input_size=(int(input_size[0]), int(input_size[1])),
            image_sizes=image_sizes.to(cross.device),
            encoder_self=self._stacked("encoder", encoder_layers) if self.encoder else None,
            decoder_self=self._stacked("decoder_self", decoder_layers) if self.decoder_self else None,
        )

    @staticmethod
    def _patch_padding(image_sizes: torch.Tensor, grid: tuple[int, int],
                       stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """YOLOS: patches holding no image pixel are padding; sizes clipped to the patches' extent."""
        height, width = grid
        covered = torch.tensor([height * stride, width * stride])
        clipped = torch.minimum(image_sizes, covered)
        if not torch.equal(clipped, image_sizes):
            logger.debug("YOLOS patches cover %s input pixels; image sizes %s clipped to it",
                         covered.tolist(), image_sizes.tolist())
        rows = torch.arange(height).view(1, height, 1) * stride >= clipped[:, 0].view(-1, 1, 1)
        cols = torch.arange(width).view(1, 1, width) * stride >= clipped[:, 1].view(-1, 1, 1)
        return rows | cols, clipped


def _grid_stride(input_size: tuple[int, int], grid: tuple[int, int]) -> int:
    """The power-of-two stride s of a conv backbone: ceil(H / s) == h and ceil(W / s) == w."""
    for exponent in range(8):
        stride = 2 ** exponent
        if math.ceil(input_size[0] / stride) == grid[0] and math.ceil(input_size[1] / stride) == grid[1]:
            return stride
    raise RuntimeError(f"no power-of-two stride maps input {tuple(input_size)} to the feature grid {grid}")


__all__ = ["DenseCapture", "FAMILIES"]
