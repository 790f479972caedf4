"""OWL-ViT behind the detector contract: a text prompt's phrases are the classes, the image's patch
tokens are the queries, and the last vision layer's self-attention is the dense attention record.

`OwlDetector` holds the tokenized prompt (one row per phrase) and runs transformers'
`OwlViTForObjectDetection` as HF's processor + model do; `text_token_scores` attributes a
detection's logit to the prompt's tokens (gradient x input on the token embeddings).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from detection.models.contract import PreprocessSpec
from detection.models.hf.detector import HFDetector, image_sizes_from_mask
from detection.models.hf.families import Family
from detection.models.hf.prompt import PromptedDetector, PromptError, PromptedConfig, check_phrases
from detection.models.outputs import AttentionGraph, AttentionRecord
from detection.models.transformer_inputs import KeptInputs

#: What a detection's query_index means for OWL (run.json's model_config records it).
OWL_QUERY_MEANING = ("patch token: the vision encoder's patch (row-major over the patch grid, [CLS] "
                     "excluded) whose box head predicted the box")


@dataclass(frozen=True)
class PromptTokens:
    """The tokenized prompt: input_ids / attention_mask (P, S), one row per phrase (padded to S);
    layout: per phrase, (position, text) of its real tokens (no special or padding token);
    limit: the text encoder's most tokens per phrase."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    layout: tuple[tuple[tuple[int, str], ...], ...]
    limit: int


def tokenize_prompt(tokenizer: Any, phrases: Sequence[str], limit: int, title: str) -> PromptTokens:
    """Each phrase tokenized as HF's OwlViTProcessor does (padding to `limit`); PromptError naming
    the limit when a phrase needs more tokens than the text encoder has positions."""
    phrases = check_phrases(phrases)
    for phrase in phrases:
        count = len(tokenizer(phrase)["input_ids"])
        if count > limit:
            raise PromptError(f"the phrase {phrase!r} has {count} tokens; {title}'s text encoder takes at most "
                              f"{limit} tokens per phrase (special tokens included): shorten it")
    encoded = tokenizer(list(phrases), padding="max_length", max_length=limit, return_tensors="pt")
    ids = encoded["input_ids"].to(torch.int64)
    mask = encoded["attention_mask"].to(torch.int64)
    special = set(tokenizer.all_special_ids)
    layout = tuple(
        tuple((position, tokenizer.decode([token]).strip())
              for position, (token, real) in enumerate(zip(row.tolist(), row_mask.tolist()))
              if real and token not in special)
        for row, row_mask in zip(ids, mask))
    return PromptTokens(ids, mask, layout, limit)


class OwlDetector(PromptedDetector, HFDetector):
    """OWL-ViT with a prompt, through the contract.

    forward(images (B, 3, H, W) normalised, padding_mask None or all False): pred_logits
    (B, P, C) for the P = h*w patch tokens and the C phrases (HF's logits: masked phrases at the
    float minimum), pred_boxes (B, P, 4) cxcywh relative to the input (= the image: the processor
    resizes to a fixed size). With cross_attention the record holds ONE layer, the last vision
    layer's self-attention rows of the patch tokens over the patch tokens ((1, B, heads, P, h, w),
    the [CLS] column left out, rows not renormalised), stride = the patch size. keep_graph also
    returns every vision layer's weights (B, heads, 1 + P, 1 + P) as the graph's `tokens` ([CLS]
    first, then the P patch tokens as the detection tokens), for relevance; plain inference hooks
    the last layer only. keep_features (with cross_attention): the record's `kept_inputs` are the
    class head's inputs (`detection_text_logits`).
    """

    gradient_capture = "graph"
    #: the record holds one layer (the last vision layer): rollout (raw attention of every layer) refuses
    last_layer_attention_only = True
    #: the gradient graph holds every layer (keep_graph): relevance applies
    every_layer_in_graph = True

    tokenize = staticmethod(tokenize_prompt)  # PromptedDetector.with_prompt
    recorded = "the last vision layer's self-attention"  # PromptedDetector._checked_padding

    def __init__(self, hf_model: nn.Module, family: Family, preprocess: PreprocessSpec, config: PromptedConfig,
                 prompt: PromptTokens, tokenizer: Any) -> None:
        super().__init__(hf_model, family, preprocess, config)
        self.tokenizer = tokenizer
        self.register_buffer("input_ids", prompt.input_ids, persistent=False)
        self.register_buffer("text_attention_mask", prompt.attention_mask, persistent=False)
        self._layout = prompt.layout
        self.token_limit = prompt.limit

    # -- the HF modules read ----------------------------------------------------------------------
    def _base(self) -> str:
        return self.family.model_type  # OwlViTForObjectDetection.owlvit, Owlv2ForObjectDetection.owlv2

    def vision_attentions(self) -> list[nn.Module]:
        """Every vision layer's self-attention module, first to last."""
        layers = self._internal(f"{self._base()}.vision_model.encoder.layers")
        return [self._internal_of(layer, "self_attn") for layer in layers]

    def last_vision_attention(self) -> nn.Module:
        return self.vision_attentions()[-1]

    def token_embedding(self) -> nn.Module:
        return self._internal(f"{self._base()}.text_model.embeddings.token_embedding")

    def _internal_of(self, module: nn.Module, name: str) -> nn.Module:
        found = getattr(module, name, None)
        if found is None:
            raise RuntimeError(f"{self.family.title}: {type(module).__name__} has no '{name}': the module this "
                               "code reads was renamed; the OWL support needs updating")
        return found

    def prompt_layout(self) -> tuple[tuple[tuple[int, str], ...], ...]:
        """Per phrase, (position in its token row, token text) of its real tokens."""
        return self._layout

    def patch_grid(self) -> tuple[int, int]:
        vision = self.hf_model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return side, side

    # -- forward ----------------------------------------------------------------------------------
    def text_inputs(self, batch: int) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask (batch * C, S): the prompt once per image, image-major (HF's layout)."""
        return {"input_ids": self.input_ids.repeat(batch, 1), "attention_mask": self.text_attention_mask.repeat(batch, 1)}

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                cross_attention: bool = False, encoder_attention: bool = False,
                decoder_self_attention: bool = False, keep_graph: bool = False,
                keep_features: bool = False) -> dict[str, Any]:
        batch, _, height, width = images.shape
        padding_mask = self._checked_padding(images, padding_mask, cross_attention=cross_attention,
                                             encoder_attention=encoder_attention,
                                             decoder_self_attention=decoder_self_attention, keep_graph=keep_graph,
                                             keep_features=keep_features)
        kwargs = {"pixel_values": images, **self.text_inputs(batch)}
        if not cross_attention:
            outputs = self.hf_model(**kwargs)
            return {"pred_logits": outputs.logits, "pred_boxes": outputs.pred_boxes, "aux_outputs": [],
                    "attention": None}
        # plain inference hooks the last layer only; the gradient graph (relevance) holds every layer
        modules = self.vision_attentions() if keep_graph else [self.last_vision_attention()]
        captured: list[list[torch.Tensor | None]] = [[] for _ in modules]
        handles = []
        for slot, module in zip(captured, modules):
            def take(_module: nn.Module, _args: tuple, output: Any, slot: list = slot) -> None:
                slot.append(output[1] if isinstance(output, tuple) and len(output) > 1 else None)
            handles.append(module.register_forward_hook(take))
        head_inputs: list[tuple] = []
        if keep_features:
            handles.append(self._internal("class_head").register_forward_pre_hook(
                lambda _module, args: head_inputs.append(args)))
        try:
            outputs = self.hf_model(**kwargs)
        finally:
            for handle in handles:
                handle.remove()
        layers = [slot[-1] if slot else None for slot in captured]
        if any(weights is None for weights in layers):
            raise RuntimeError(f"{self.family.title}: a vision layer returned no attention weights (the model "
                               "must run eager attention; load it with load_model)")
        record = self._record(layers[-1], (int(height), int(width)), padding_mask)
        if keep_features:
            if len(head_inputs) != 1 or len(head_inputs[0]) != 3:
                raise RuntimeError(f"{self.family.title}: the class head was not called once with (image features, "
                                   "query embeddings, query mask): the OWL support needs updating")
            image_feats, query_embeds, query_mask = (tensor.detach() for tensor in head_inputs[0])
            record = dataclasses.replace(record, kept_inputs=KeptInputs(
                {"image_feats": image_feats, "query_embeds": query_embeds, "query_mask": query_mask}))
        result = {"pred_logits": outputs.logits, "pred_boxes": outputs.pred_boxes, "aux_outputs": [],
                  "attention": record}
        if keep_graph:  # every layer's (B, heads, 1 + P, 1 + P); the P patch tokens are the "detection tokens"
            result["attention_graph"] = AttentionGraph(tokens=tuple(layers),
                                                       detection_tokens=int(layers[-1].shape[-1]) - 1)
        return result

    def _record(self, weights: torch.Tensor, input_size: tuple[int, int], padding_mask: torch.Tensor) -> AttentionRecord:
        """(B, heads, 1 + h*w, 1 + h*w) -> the one-layer dense record of the patch rows over the patches."""
        grid_h, grid_w = self.patch_grid()
        if weights.shape[-1] != 1 + grid_h * grid_w:
            raise RuntimeError(f"{self.family.title}: last-layer attention over {weights.shape[-1]} tokens for a "
                               f"{grid_h}x{grid_w} patch grid (+ [CLS]): the vision model changed")
        rows = weights.detach()[:, :, 1:, 1:].to(torch.float32, copy=True)
        cross = rows.reshape(1, *rows.shape[:3], grid_h, grid_w)
        batch = weights.shape[0]
        return AttentionRecord(
            decoder_cross=cross,
            feature_padding_mask=torch.zeros((batch, grid_h, grid_w), dtype=torch.bool, device=cross.device),
            feature_stride=int(self.hf_model.config.vision_config.patch_size),
            input_size=input_size, image_sizes=image_sizes_from_mask(padding_mask).to(cross.device))

    def detection_text_logits(self, kept: KeptInputs, query_index: Sequence[int], labels: Sequence[int]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each detection's logit from one image's kept class-head inputs (`forward(..., keep_features=True)`):
        the vision tower does not run again; the text tower runs here on one token row per detection
        (row n = phrase labels[n], without the padding after the rows' last real token: its token
        embedding (N, S', D) is computed once, S' <= S, and logit n depends on row n only, so one
        backward of their sum gives every detection's gradient).

        kept: image_feats (1, P, D_v), query_embeds (1, C, D_t) the normalised text embeddings,
        query_mask (1, C). Returns (logits (N,) in the graph of the text tower, phrase logits (N, C)
        the detections' logits for every phrase, from the kept query embeddings, no graph).
        RuntimeError when the recomputed text embeddings are not the kept ones (renamed HF internals).
        """
        queries = torch.as_tensor(list(query_index), dtype=torch.int64, device=kept.per_image["image_feats"].device)
        rows = torch.as_tensor(list(labels), dtype=torch.int64, device=queries.device)
        image_feats = kept.per_image["image_feats"][0, queries][None]  # (1, N, D_v)
        head = self._internal("class_head")
        with torch.no_grad():
            phrase_logits = head(image_feats, kept.per_image["query_embeds"], kept.per_image["query_mask"])[0][0]
        input_ids, attention_mask = self.input_ids[rows], self.text_attention_mask[rows]
        # the text model's attention is causal and it pools the token at input_ids' argmax (the end
        # token): the padding after both changes nothing of the pooled output, so it is not run
        # (the check below holds the result to the inference pass's)
        length = int(max(attention_mask.sum(-1).max(), input_ids.argmax(-1).max() + 1))
        base = self._internal(self._base())
        text = base.get_text_features(input_ids=input_ids[:, :length], attention_mask=attention_mask[:, :length])
        text = text.pooler_output if hasattr(text, "pooler_output") else text
        text = text / torch.linalg.norm(text, ord=2, dim=-1, keepdim=True)  # as OwlViTModel.forward's text_embeds
        expected = kept.per_image["query_embeds"][0, rows]
        if not torch.allclose(text.detach().to(expected.dtype), expected, rtol=1e-3, atol=1e-5):
            raise RuntimeError(f"{self.family.title}: the text embeddings recomputed for the token scores differ from "
                               "the inference pass's (largest difference "
                               f"{float((text.detach() - expected).abs().max()):.3g}): the OWL support needs updating")
        logits = head(image_feats, text[None], kept.per_image["query_mask"][:, rows])[0][0]  # (N, N): patch n, row m
        return logits.diagonal(), phrase_logits

    def prompt_chunks(self, phrases: Sequence[str]) -> list[tuple[str, ...]]:
        """One prompt: OWL encodes each phrase apart, so any number of phrases fits (each phrase is
        checked against the per-phrase limit; PromptError names it)."""
        phrases = check_phrases(phrases)
        tokenize_prompt(self.tokenizer, phrases, self.token_limit, self.family.title)
        return [phrases]


def build_owl_detector(hf_model: nn.Module, family: Family, preprocess: PreprocessSpec, tokenizer: Any,
                       phrases: Sequence[str], name: str, source: str) -> OwlDetector:
    """An OwlDetector for `phrases` (PromptError when empty or a phrase is beyond the text encoder's limit)."""
    phrases = check_phrases(phrases)
    limit = int(hf_model.config.text_config.max_position_embeddings)
    prompt = tokenize_prompt(tokenizer, phrases, limit, family.title)
    side = int(hf_model.config.vision_config.image_size) // int(hf_model.config.vision_config.patch_size)
    config = PromptedConfig(name=name, model_type=family.model_type, class_names=phrases,
                            category_ids=tuple(range(len(phrases))), num_queries=side * side, source=source,
                            prompt=phrases, query_meaning=OWL_QUERY_MEANING)
    return OwlDetector(hf_model.eval(), family, preprocess, config, prompt, tokenizer)
