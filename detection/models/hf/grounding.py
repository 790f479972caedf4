"""Grounding DINO and MM-Grounding-DINO behind the detector contract: the prompt is one BERT
sequence ("cat. remote control."), the decoder's queries are the queries, and each phrase's logit
is the maximum of its tokens' logits.

`GroundingDetector` runs transformers' `*GroundingDinoForObjectDetection` as HF's processor +
model do; its decoder image cross-attention is captured as sampled points (`SampledCapture`), its
decoder text cross-attention (dense, queries over prompt tokens) by forward hooks.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from detection.models.contract import PreprocessSpec
from detection.models.hf.capture_sampled import SampledCapture
from detection.models.hf.detector import HFDetector, image_sizes_from_mask
from detection.models.hf.families import Family
from detection.models.hf.prompt import PromptedDetector, PromptError, PromptedConfig, check_phrases, prompt_text
from detection.models.transformer_inputs import KeptInputs

#: What a detection's query_index means for Grounding DINO (run.json's model_config records it).
GROUNDING_QUERY_MEANING = "decoder query (of config.num_queries, chosen by the encoder's two-stage selection)"
#: HF's `post_process_grounded_object_detection` default text threshold (its text labels).
TEXT_THRESHOLD = 0.25


@dataclasses.dataclass(frozen=True)
class GroundingPrompt:
    """The tokenized prompt (one row): input_ids, token_type_ids, attention_mask (1, S);
    phrase_of_token: int64 (S,) the phrase of each position (-1: [CLS], [SEP], '.', padding);
    layout: per phrase, (position, text) of its tokens; limit: the most tokens the text encoder takes."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    phrase_of_token: torch.Tensor
    layout: tuple[tuple[tuple[int, str], ...], ...]
    limit: int


def tokenize_grounding_prompt(tokenizer: Any, phrases: Sequence[str], limit: int, title: str) -> GroundingPrompt:
    """The prompt "p1. p2. ... pC." tokenized as HF's GroundingDinoProcessor does; each phrase's tokens
    are those between consecutive '.' tokens. PromptError naming the limit when the sequence is longer
    than the text encoder takes, or when the tokenizer splits the phrases differently."""
    phrases = check_phrases(phrases)
    encoded = tokenizer(prompt_text(phrases), return_token_type_ids=True, return_tensors="pt")
    ids = encoded["input_ids"].to(torch.int64)
    if ids.shape[1] > limit:
        raise PromptError(f"the prompt has {ids.shape[1]} tokens; {title}'s text encoder takes at most {limit} "
                          f"tokens (special tokens and the '.' separators included): shorten it or split it")
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(".")}
    phrase_of_token = torch.full((ids.shape[1],), -1, dtype=torch.int64)
    layout: list[list[tuple[int, str]]] = [[]]
    for position, token in enumerate(ids[0].tolist()):
        if token == tokenizer.convert_tokens_to_ids("."):
            layout.append([])
        elif token not in special:
            layout[-1].append((position, tokenizer.decode([token]).strip()))
            phrase_of_token[position] = len(layout) - 1
    layout = [pieces for pieces in layout if pieces]
    if len(layout) != len(phrases):
        raise PromptError(f"the tokenizer split the prompt into {len(layout)} phrases, not the {len(phrases)} given "
                          f"({list(phrases)}): a phrase without any token, or one with a '.' token inside")
    return GroundingPrompt(ids, encoded["token_type_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64),
                           phrase_of_token, tuple(tuple(pieces) for pieces in layout), limit)


class GroundingDetector(PromptedDetector, HFDetector):
    """Grounding DINO / MM-Grounding-DINO with a prompt, through the contract.

    forward(images (B, 3, H, W), padding_mask (B, H, W) True on padding): pred_logits (B, Q, C) the
    logit of each phrase = the maximum over its tokens' logits; pred_score_logits (B, Q) the maximum
    over every prompt position ([CLS], '.' and [SEP] included), whose sigmoid is HF's score;
    token_logits (B, Q, S) HF's logits over the prompt's S positions; pred_boxes (B, Q, 4) cxcywh
    relative to each image's unpadded extent. With cross_attention, `attention` is the sampled
    record of the decoder's image cross-attention and `text_attention` the decoder's text
    cross-attention, (L, B, heads, Q, S) softmax weights over the prompt positions. keep_features
    (with cross_attention): the record's `kept_inputs` are the last decoder layer's inputs and the
    class head's text inputs (`replay_last_decoder_layer`).
    """

    gradient_capture = "graph"

    tokenize = staticmethod(tokenize_grounding_prompt)  # PromptedDetector.with_prompt

    def __init__(self, hf_model: nn.Module, family: Family, preprocess: PreprocessSpec, config: PromptedConfig,
                 prompt: GroundingPrompt, tokenizer: Any) -> None:
        super().__init__(hf_model, family, preprocess, config)
        self.tokenizer = tokenizer
        self.token_limit = prompt.limit
        self._layout = prompt.layout
        self.register_buffer("input_ids", prompt.input_ids, persistent=False)
        self.register_buffer("token_type_ids", prompt.token_type_ids, persistent=False)
        self.register_buffer("text_attention_mask", prompt.attention_mask, persistent=False)
        self.register_buffer("phrase_of_token", prompt.phrase_of_token, persistent=False)

    def prompt_layout(self) -> tuple[tuple[tuple[int, str], ...], ...]:
        """Per phrase, (position in the prompt's token row, token text) of its tokens."""
        return self._layout

    def token_embedding(self) -> nn.Module:
        return self._internal("model.text_backbone.embeddings.word_embeddings")

    def text_cross_attention_modules(self) -> list[nn.Module]:
        layers = self._internal("model.decoder.layers")
        modules = [getattr(layer, "encoder_attn_text", None) for layer in layers]
        if any(module is None for module in modules):
            raise self._renamed("model.decoder.layers[i].encoder_attn_text")
        return modules

    def hf_text_label(self, token_logits: torch.Tensor) -> str:
        """HF's own label of a query (`post_process_grounded_object_detection`, text threshold
        TEXT_THRESHOLD): its tokens with probability above the threshold, the first and the
        max_text_len-th position left out, decoded together (may be partial or merge phrases)."""
        keep = token_logits.detach().float().sigmoid() > TEXT_THRESHOLD
        keep[0] = False
        keep[int(self.hf_model.config.max_text_len) - 1:] = False
        return self.tokenizer.decode(self.input_ids[0, keep].tolist())

    def phrase_logits(self, token_logits: torch.Tensor) -> torch.Tensor:
        """(B, Q, S) token logits -> (B, Q, C): each phrase's maximum over its tokens."""
        return torch.stack([token_logits[..., [p for p, _ in pieces]].max(-1).values for pieces in self._layout], -1)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                cross_attention: bool = False, encoder_attention: bool = False,
                decoder_self_attention: bool = False, keep_graph: bool = False,
                keep_features: bool = False) -> dict[str, Any]:
        batch, _, height, width = images.shape
        if padding_mask is None:
            padding_mask = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
        if encoder_attention:
            raise ValueError(f"{self.family.title}'s encoder is deformable: no dense encoder self-attention to record")
        if (keep_graph or keep_features) and not cross_attention:
            raise ValueError("keep_graph / keep_features go in the attention record: ask for one "
                             "(cross_attention=True)")
        kwargs = {"pixel_values": images, "pixel_mask": (~padding_mask).long(),
                  "input_ids": self.input_ids.repeat(batch, 1), "token_type_ids": self.token_type_ids.repeat(batch, 1),
                  "attention_mask": self.text_attention_mask.repeat(batch, 1)}
        record = graph = None
        text_weights: list[torch.Tensor | None] = []
        if cross_attention:
            capture = SampledCapture(self.hf_model, cross=True, decoder_self=decoder_self_attention,
                                     keep_graph=keep_graph)
            handles = [module.register_forward_hook(
                lambda _m, _a, out: text_weights.append(out[1] if isinstance(out, tuple) and len(out) > 1 else None))
                for module in self.text_cross_attention_modules()]
            kept: dict[str, dict] = {}
            keep_handles = self._keep_last_layer_inputs(kept) if keep_features else []
            try:
                with capture:
                    outputs = self.hf_model(**kwargs)
            finally:
                for handle in handles + keep_handles:
                    handle.remove()
            record = capture.record(outputs, input_size=(int(height), int(width)),
                                    image_sizes=image_sizes_from_mask(padding_mask), padding_mask=padding_mask)
            graph = capture.graph() if keep_graph else None
            if keep_features:
                record = dataclasses.replace(record, kept_inputs=self._kept_inputs(kept, batch))
            if len(text_weights) != len(handles) or any(w is None for w in text_weights):
                raise self._renamed("the decoder's text cross-attention weights")
        else:
            outputs = self.hf_model(**kwargs)
        token_logits = outputs.logits[..., : self.input_ids.shape[1]]
        result = {"pred_logits": self.phrase_logits(token_logits), "pred_boxes": outputs.pred_boxes,
                  "pred_score_logits": outputs.logits.max(-1).values, "token_logits": token_logits,
                  "text_labeler": lambda image, query: self.hf_text_label(token_logits[image, query]),
                  "aux_outputs": [], "attention": record}
        if cross_attention:
            result["text_attention"] = torch.stack([w.detach().float() for w in text_weights])
        if keep_graph:
            result["attention_graph"] = graph
            result["text_attention_graph"] = tuple(text_weights)
        return result

    def prompt_chunks(self, phrases: Sequence[str]) -> list[tuple[str, ...]]:
        """`phrases` split, in order, into the fewest consecutive prompts that each fit the text
        encoder (greedy), for eval's zero-shot protocol with many category names; PromptError
        when one phrase alone does not fit."""
        chunks: list[tuple[str, ...]] = []
        for phrase in check_phrases(phrases):
            candidate = (*chunks[-1], phrase) if chunks else (phrase,)
            if chunks and self._fits(candidate):
                chunks[-1] = candidate
            elif self._fits((phrase,)):
                chunks.append((phrase,))
            else:
                tokenize_grounding_prompt(self.tokenizer, (phrase,), self.token_limit, self.family.title)  # raises
        return chunks

    def _fits(self, phrases: tuple[str, ...]) -> bool:
        return len(self.tokenizer(prompt_text(phrases))["input_ids"]) <= self.token_limit

    #: the last decoder layer's arguments every image of a batch shares (the others are batch-first tensors)
    SHARED_LAYER_INPUTS = ("spatial_shapes", "spatial_shapes_list", "level_start_index")

    def _last_layer_and_head(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(the last decoder layer, the decoder's layer norm, the class head of the last level)."""
        layers = self._internal("model.decoder.layers")
        return layers[-1], self._internal("model.decoder.layer_norm"), self._internal("class_embed")[len(layers) - 1]

    def _keep_last_layer_inputs(self, kept: dict[str, dict]) -> list[Any]:
        """Forward pre-hooks that put the last decoder layer's and the last class head's keyword
        arguments in kept["layer"] / kept["head"] (a head shared by every level: the last call wins)."""
        layer, _, head = self._last_layer_and_head()

        def keep(name: str) -> Any:
            def hook(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
                kept[name] = dict(kwargs)
            return hook

        def logits(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            kept["logits"] = {"token_logits": output}
        return [layer.register_forward_pre_hook(keep("layer"), with_kwargs=True),
                head.register_forward_pre_hook(keep("head"), with_kwargs=True), head.register_forward_hook(logits)]

    def _kept_inputs(self, kept: dict[str, dict], batch: int) -> KeptInputs:
        if set(kept) != {"layer", "head", "logits"} or "hidden_states" not in kept["layer"]:
            raise self._renamed("model.decoder.layers[-1](hidden_states=...) / class_embed[-1](text_hidden_state=...)")
        per_image, shared = {}, {}
        for name, value in kept["layer"].items():
            if name in self.SHARED_LAYER_INPUTS:
                shared[name] = value
            elif isinstance(value, torch.Tensor):
                if value.shape[0] != batch:
                    raise self._renamed(f"model.decoder.layers[-1]({name}=...) (not batch-first)")
                per_image[f"layer.{name}"] = value.detach()
            elif value is not None and name != "output_attentions":
                raise self._renamed(f"model.decoder.layers[-1]({name}=...) (not a tensor)")
        for name in ("text_hidden_state", "text_token_mask"):
            if not isinstance(kept["head"].get(name), torch.Tensor):
                raise self._renamed(f"class_embed[-1]({name}=...)")
            per_image[f"head.{name}"] = kept["head"][name].detach()
        per_image["check.token_logits"] = kept["logits"]["token_logits"].detach()  # the replay must give them again
        return KeptInputs(per_image, shared)

    def replay_last_decoder_layer(self, kept: KeptInputs) -> dict[str, Any]:
        """The last decoder layer, the decoder's layer norm and the class head run again on one
        image's kept inputs (`forward(..., keep_features=True)`), with a graph from the layer's
        input on: {"pred_logits": (1, Q, C) the phrase logits, "text_attention_graph": (the layer's
        text cross-attention (1, heads, Q, S),)} -- what `text_gradient_forward` returns of a whole
        forward. kept: on the model's device, ordinary tensors (`KeptInputs.to(device, copy=True)`)."""
        layer, norm, head = self._last_layer_and_head()
        arguments = {name.split(".", 1)[1]: value for name, value in kept.per_image.items()
                     if name.startswith("layer.")}
        arguments["hidden_states"] = arguments["hidden_states"].detach().requires_grad_(True)
        weights: list[torch.Tensor] = []
        handle = self.text_cross_attention_modules()[-1].register_forward_hook(
            lambda _m, _a, out: weights.append(out[1] if isinstance(out, tuple) and len(out) > 1 else None))
        try:
            with torch.enable_grad():
                hidden = layer(**arguments, **kept.shared, output_attentions=False)[0]
                token_logits = head(vision_hidden_state=norm(hidden),
                                    text_hidden_state=kept.per_image["head.text_hidden_state"],
                                    text_token_mask=kept.per_image["head.text_token_mask"])
        finally:
            handle.remove()
        if len(weights) != 1 or weights[0] is None or not weights[0].requires_grad:
            raise self._renamed("the last decoder layer's text cross-attention weights")
        expected = kept.per_image["check.token_logits"]
        finite = expected.isfinite()
        if not torch.allclose(token_logits.detach()[finite], expected[finite], rtol=1e-3, atol=1e-4):
            raise self._renamed("the last decoder layer's inputs (its replay does not give the inference pass's "
                                "logits)")
        return {"pred_logits": self.phrase_logits(token_logits[..., : self.input_ids.shape[1]]),
                "text_attention_graph": (weights[0],)}

    def text_gradient_forward(self, images: torch.Tensor) -> dict[str, Any]:
        """forward(images, cross_attention=True, keep_graph=True) whose autograd graph starts at the
        last decoder layer's input (made a leaf): what the gradient of a logit with respect to that
        layer's text cross-attention needs, without recording (or back-propagating through) the
        rest of the model."""
        layer = self._internal("model.decoder.layers")[-1]

        def leaf(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            hidden = kwargs.get("hidden_states")
            return None if hidden is None else (args, {**kwargs, "hidden_states": hidden.detach().requires_grad_(True)})

        handle = layer.register_forward_pre_hook(leaf, with_kwargs=True)
        try:
            with torch.enable_grad():
                outputs = self(images, cross_attention=True, keep_graph=True)
        finally:
            handle.remove()
        if not outputs["text_attention_graph"][-1].requires_grad:
            raise self._renamed("model.decoder.layers[-1](hidden_states=...)")
        return outputs


def build_grounding_detector(hf_model: nn.Module, family: Family, preprocess: PreprocessSpec, tokenizer: Any,
                             phrases: Sequence[str], name: str, source: str) -> GroundingDetector:
    """A GroundingDetector for `phrases` (PromptError: empty, or beyond the text encoder's limit)."""
    phrases = check_phrases(phrases)
    config = hf_model.config
    limit = min(int(config.max_text_len), int(config.text_config.max_position_embeddings))
    prompt = tokenize_grounding_prompt(tokenizer, phrases, limit, family.title)
    detector_config = PromptedConfig(name=name, model_type=family.model_type, class_names=phrases,
                                     category_ids=tuple(range(len(phrases))), num_queries=int(config.num_queries),
                                     source=source, prompt=phrases, query_meaning=GROUNDING_QUERY_MEANING)
    return GroundingDetector(hf_model.eval(), family, preprocess, detector_config, prompt, tokenizer)
