"""OmDet-Turbo behind the detector contract: a prompt's phrases are the classes (each phrase encoded
apart and pooled into one embedding), the decoder's queries are the queries.

`OmDetDetector` runs transformers' `OmDetTurboForObjectDetection` as HF's `OmDetTurboProcessor` +
model do (its task prompt "Detect p1, p2." by default); its decoder image cross-attention is
captured as sampled points (`OmDetCapture`). With gradients on, HF's text caches are bypassed so
that each phrase's embedding joins the autograd graph (`phrase_embedding`, for the phrase scores).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from detection.models.contract import PostprocessRule, PreprocessSpec
from detection.models.hf.backbone_strides import hf_backbone_strides
from detection.models.hf.capture_sampled import SampledCapture
from detection.models.hf.detector import HFDetector, image_sizes_from_mask
from detection.models.hf.families import Family
from detection.models.hf.prompt import PromptedDetector, PromptError, PromptedConfig, check_phrases
from detection.models.transformer_inputs import KeptInputs

#: What a detection's query_index means for OmDet-Turbo (run.json's model_config records it).
OMDET_QUERY_MEANING = "decoder query (of config.num_queries, chosen by the encoder's top-k query selection)"
#: OmDetTurboProcessor's text settings: every phrase and the task padded / truncated to 77 tokens.
PROCESSOR_MAX_LENGTH = 77
#: HF's `post_process_grounded_object_detection` default NMS threshold (class-wise).
NMS_THRESHOLD = 0.5
#: What the text-side scores are (TokenScores.token_method / phrase_method, the tokens npz's metadata).
PHRASE_TOKEN_METHOD = ("gradient x input on each phrase's pooled text embedding (OmDet-Turbo encodes each "
                       "phrase apart into ONE embedding: each phrase is one token here; HF's text cache bypassed)")
PHRASE_LOGIT_METHOD = "logit (scaled cosine of the query's feature and the phrase's projected embedding)"


def default_task(phrases: Sequence[str]) -> str:
    """OmDetTurboProcessor's default task prompt for `phrases`: 'Detect p1, p2.'."""
    return f"Detect {', '.join(phrases)}."


@dataclasses.dataclass(frozen=True)
class OmDetConfig(PromptedConfig):
    """A PromptedConfig plus the task prompt the model is given (part of the run's fingerprint)."""

    task: str = ""


@dataclasses.dataclass(frozen=True)
class OmDetPrompt:
    """The tokenized prompt: classes_input_ids / classes_attention_mask (C, L), one row per phrase;
    tasks_input_ids / tasks_attention_mask (1, L), the task prompt (truncated to L as HF's processor
    does); task: its text; limit: the most tokens per phrase (L)."""

    classes_input_ids: torch.Tensor
    classes_attention_mask: torch.Tensor
    tasks_input_ids: torch.Tensor
    tasks_attention_mask: torch.Tensor
    task: str
    limit: int


def tokenize_omdet_prompt(tokenizer: Any, phrases: Sequence[str], limit: int, title: str) -> OmDetPrompt:
    """Each phrase, and the default task prompt, tokenized as OmDetTurboProcessor does (padded to and
    truncated at `limit`); PromptError naming the limit when a phrase needs more tokens than that."""
    phrases = check_phrases(phrases)
    for phrase in phrases:
        count = len(tokenizer(phrase)["input_ids"])
        if count > limit:
            raise PromptError(f"the phrase {phrase!r} has {count} tokens; {title}'s text encoder takes at most "
                              f"{limit} tokens per phrase (special tokens included): shorten it")
    settings = dict(padding="max_length", truncation=True, max_length=limit, return_tensors="pt")
    classes = tokenizer(list(phrases), **settings)
    task = default_task(phrases)
    tasks = tokenizer([task], **settings)
    return OmDetPrompt(classes["input_ids"].to(torch.int64), classes["attention_mask"].to(torch.int64),
                       tasks["input_ids"].to(torch.int64), tasks["attention_mask"].to(torch.int64), task, limit)


class PhraseEmbedding(nn.Module):
    """The language backbone's class path: input_ids (R, L) -> (R, 1, D), each row's pooled and
    projected embedding (one "token" per phrase, the shape `gradient_x_input` attributes over).
    Holds the backbone without registering it (its weights stay the HF model's alone)."""

    def __init__(self, language_backbone: nn.Module) -> None:
        super().__init__()
        self._backbone = (language_backbone,)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # each distinct row encoded once; CLIP's text model attends causally and the class path pools
        # the end token (the row's largest id, first occurrence), so the padding after the last end
        # token changes nothing and is not run (the phrase scores check the result against HF's pass)
        unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        length = int(unique.argmax(-1).max()) + 1
        return self._backbone[0](unique[:, :length], encode_type="class")[inverse][:, None, :]


class _NoCache:
    """Stands in for HF's OmDetTurboLRUCache: never holds anything."""

    def has(self, key: Any) -> bool:
        return False

    def get(self, key: Any) -> None:
        return None

    def put(self, key: Any, value: Any) -> None:
        return None


class OmDetCapture(SampledCapture):
    """SampledCapture for OmDet-Turbo: its decoder at `hf_model.decoder` (not `.model.decoder`), each
    layer's deformable image cross-attention `cross_attn` calling the nn.Module `attn` (hooked as
    for Deformable DETR); the input takes no padding mask; level strides from the vision backbone."""

    def __init__(self, hf_model: nn.Module, *, keep_graph: bool = False) -> None:
        self.family, self.model = "omdet-turbo", hf_model
        self.cross, self.encoder, self.decoder_self, self.keep_graph = True, False, False, keep_graph
        self._graph, self._undo, self._active_layer = {}, [], None
        self._cross, self._self, self._encoder_layers = {}, {}, []
        self._encoder_grid = self._encoder_stride = None
        layers = getattr(getattr(hf_model, "decoder", None), "layers", None)
        if layers is None:
            raise self._nothing("no 'decoder.layers' on the model")
        self._decoder_layers = list(layers)

    def _install(self) -> None:
        for index, layer in enumerate(self._decoder_layers):
            core = getattr(getattr(layer, "cross_attn", None), "attn", None)
            if isinstance(core, nn.Module):
                self._hook(core, self._core_hook(index), with_kwargs=True)

    def level_strides(self, levels: int) -> tuple[int, ...]:
        """The hybrid encoder keeps each backbone level's size: the strides are the backbone's."""
        backbone = getattr(getattr(self.model, "vision_backbone", None), "vision_backbone", None)
        if backbone is None:
            raise self._nothing("no 'vision_backbone.vision_backbone' on the model")
        info = getattr(getattr(backbone, "_backbone", None), "feature_info", None)  # timm (the published Swin)
        strides = [int(s) for s in info.reduction()] if info is not None else hf_backbone_strides(backbone)
        if len(strides) < levels:
            raise self._nothing(f"{levels} decoder levels for {len(strides)} backbone levels")
        return tuple(strides[:levels])


class OmDetDetector(PromptedDetector, HFDetector):
    """OmDet-Turbo with a prompt, through the contract.

    forward(images (B, 3, H, W) normalised, padding_mask None or all False): pred_logits (B, Q, C)
    HF's `decoder_class_logits` (scaled cosine; sigmoid = score), pred_boxes (B, Q, 4) its
    `decoder_coord_logits` (already sigmoid: cxcywh relative to the input = the image, resized to a
    fixed size). With cross_attention, `attention` is the sampled record of every decoder layer's
    image cross-attention. Post-processing: HF's top-k over Q x C, class-wise NMS, clipped boxes.
    """

    gradient_capture = "graph"

    tokenize = staticmethod(tokenize_omdet_prompt)  # PromptedDetector.with_prompt
    recorded = "its decoder's image cross-attention (sampled points)"  # PromptedDetector._checked_padding

    def __init__(self, hf_model: nn.Module, family: Family, preprocess: PreprocessSpec, config: OmDetConfig,
                 prompt: OmDetPrompt, tokenizer: Any) -> None:
        super().__init__(hf_model, family, preprocess, dataclasses.replace(config, task=prompt.task))
        self.tokenizer = tokenizer
        self.token_limit = prompt.limit
        self._postprocess = PostprocessRule(kind="sigmoid_topk", top_k=config.num_queries, class_nms_iou=NMS_THRESHOLD)
        self.phrase_embedding = PhraseEmbedding(self._internal("language_backbone"))
        for name in ("classes_input_ids", "classes_attention_mask", "tasks_input_ids", "tasks_attention_mask"):
            self.register_buffer(name, getattr(prompt, name), persistent=False)

    token_method = PHRASE_TOKEN_METHOD
    phrase_method = PHRASE_LOGIT_METHOD

    def token_embedding(self) -> nn.Module:
        """The module whose output (C, 1, D) holds each phrase's embedding (row c = phrase c)."""
        return self.phrase_embedding

    def prompt_layout(self) -> tuple[tuple[tuple[int, str], ...], ...]:
        """Per phrase, one "token": the phrase itself, at position 0 of its row."""
        return tuple(((0, phrase),) for phrase in self.config.prompt)

    def prompt_chunks(self, phrases: Sequence[str]) -> list[tuple[str, ...]]:
        """One prompt: each phrase is encoded apart, so any number fits (each is checked against the
        per-phrase limit); the task prompt is truncated as HF's processor does."""
        phrases = check_phrases(phrases)
        tokenize_omdet_prompt(self.tokenizer, phrases, self.token_limit, self.family.title)
        return [phrases]

    @contextlib.contextmanager
    def _text_caches_bypassed(self) -> Iterator[None]:
        """HF keeps each phrase's and task's text features in LRU caches (computed once, constants
        after); while gradients are on, the phrases go through `phrase_embedding` and nothing is
        cached, so the gradient reaches each phrase's embedding."""
        model = self.hf_model
        for name in ("get_cached_class_embeddings", "language_cache_prompt", "language_cache_class"):
            if not hasattr(model, name):
                raise self._renamed(name)
        previous = model.language_cache_prompt
        model.get_cached_class_embeddings = lambda input_ids, _mask: self.phrase_embedding(input_ids)[:, 0]
        model.language_cache_prompt = _NoCache()
        try:
            yield
        finally:
            del model.get_cached_class_embeddings  # the instance attribute: the class's method again
            model.language_cache_prompt = previous

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                cross_attention: bool = False, encoder_attention: bool = False,
                decoder_self_attention: bool = False, keep_graph: bool = False,
                keep_features: bool = False) -> dict[str, Any]:
        batch, _, height, width = images.shape
        padding_mask = self._checked_padding(images, padding_mask, cross_attention=cross_attention,
                                             encoder_attention=encoder_attention,
                                             decoder_self_attention=decoder_self_attention, keep_graph=keep_graph,
                                             keep_features=keep_features)
        kwargs = {"pixel_values": images, "classes_input_ids": self.classes_input_ids.repeat(batch, 1),
                  "classes_attention_mask": self.classes_attention_mask.repeat(batch, 1),
                  "tasks_input_ids": self.tasks_input_ids.repeat(batch, 1),
                  "tasks_attention_mask": self.tasks_attention_mask.repeat(batch, 1),
                  "classes_structure": torch.full((batch,), self.classes_input_ids.shape[0], dtype=torch.int64,
                                                  device=images.device)}
        text = self._text_caches_bypassed() if torch.is_grad_enabled() else contextlib.nullcontext()
        record = graph = None
        with text:
            if cross_attention:
                capture = OmDetCapture(self.hf_model, keep_graph=keep_graph)
                kept: dict[str, list] = {"query_features": [], "class_projected": []}
                handles = self._keep_hooks(kept) if keep_features else []
                try:
                    with capture:
                        outputs = self.hf_model(**kwargs)
                finally:
                    for handle in handles:
                        handle.remove()
                # the record checks its queries against `logits`, which OmDet's output names decoder_class_logits
                record = capture.record(SimpleNamespace(logits=outputs.decoder_class_logits), input_size=(int(height), int(width)),
                                        image_sizes=image_sizes_from_mask(padding_mask), padding_mask=None)
                graph = capture.graph() if keep_graph else None
                if keep_features:
                    record = dataclasses.replace(record, kept_inputs=self._kept(kept))
            else:
                outputs = self.hf_model(**kwargs)
        result = {"pred_logits": outputs.decoder_class_logits, "pred_boxes": outputs.decoder_coord_logits,
                  "aux_outputs": [], "attention": record}
        if keep_graph:
            result["attention_graph"] = graph
        return result


    def _decoder_part(self, name: str) -> Any:
        decoder = getattr(self.hf_model, "decoder", None)
        if not hasattr(decoder, name):
            raise self._renamed(f"decoder.{name}")
        return getattr(decoder, name)

    def _keep_hooks(self, kept: dict[str, list]) -> list:
        """Hooks keeping what the phrase scores differentiate: the last decoder layer's query
        features (B, Q, H) and its class head's projected phrase embeddings (C, B, H)."""
        layer, head = self._decoder_part("layers")[-1], self._decoder_part("decoder_class_head")[-1]
        return [layer.register_forward_hook(lambda _m, _a, output: kept["query_features"].append(output[0])),
                head.register_forward_hook(lambda _m, _a, output: kept["class_projected"].append(output))]

    def _kept(self, kept: dict[str, list]) -> KeptInputs:
        if len(kept["query_features"]) != 1 or len(kept["class_projected"]) != 1:
            raise RuntimeError(f"{self.family.title}: the last decoder layer or its class head did not run once "
                               "per forward: the OmDet-Turbo support needs updating")
        return KeptInputs({"query_features": kept["query_features"][0].detach(),
                           "class_projected": kept["class_projected"][0].detach().permute(1, 0, 2)})

    def detection_text_logits(self, kept: KeptInputs, query_index: Sequence[int], labels: Sequence[int]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each detection's logit from one image's kept inputs (`forward(..., keep_features=True)`):
        the image side does not run again; the phrase path (language backbone -> the last class
        head) runs here on one phrase row per detection (row n = phrase labels[n]), and HF's own
        class similarity (cosine or dot, the decoder's `class_distance_type`) of detection n's query
        features with row n gives logit n (one backward of their sum: every detection's gradient).

        kept: query_features (1, Q, H), class_projected (1, C, H). Returns (logits (N,) in the graph,
        phrase logits (N, C) from the kept projections, no graph). RuntimeError when the recomputed
        projections are not the kept ones (renamed HF internals)."""
        features = kept.per_image["query_features"]
        queries = torch.as_tensor(list(query_index), dtype=torch.int64, device=features.device)
        rows = torch.as_tensor(list(labels), dtype=torch.int64, device=features.device)
        similarity = getattr(sys.modules[type(self.hf_model.decoder).__module__], "get_class_similarity", None)
        if similarity is None:
            raise self._renamed("get_class_similarity")
        distance = self._decoder_part("class_distance_type")
        query_features = features[0, queries][None]  # (1, N, H)
        projected = kept.per_image["class_projected"]  # (1, C, H)
        with torch.no_grad():
            phrase_logits = similarity(distance, query_features, projected.transpose(1, 2))[0]  # (N, C)
        embeddings = self.phrase_embedding(self.classes_input_ids[rows.to(self.classes_input_ids.device)])  # (N, 1, D)
        rows_projected = self._decoder_part("decoder_class_head")[-1](embeddings[:, 0])  # (N, H)
        expected = projected[0, rows]
        if not torch.allclose(rows_projected.detach().to(expected.dtype), expected, rtol=1e-3, atol=1e-5):
            raise RuntimeError(f"{self.family.title}: the phrase projections recomputed for the phrase scores differ "
                               "from the inference pass's: the OmDet-Turbo support needs updating")
        logits = similarity(distance, query_features, rows_projected.T[None])[0]  # (N, N): query n, row m
        return logits.diagonal(), phrase_logits


def build_omdet_detector(hf_model: nn.Module, family: Family, preprocess: PreprocessSpec, tokenizer: Any,
                         phrases: Sequence[str], name: str, source: str) -> OmDetDetector:
    """An OmDetDetector for `phrases` (PromptError: empty, or a phrase beyond the text encoder's limit)."""
    phrases = check_phrases(phrases)
    config = hf_model.config
    limit = min(PROCESSOR_MAX_LENGTH, int(config.text_config.max_position_embeddings))
    prompt = tokenize_omdet_prompt(tokenizer, phrases, limit, family.title)
    detector_config = OmDetConfig(name=name, model_type=family.model_type, class_names=phrases,
                                  category_ids=tuple(range(len(phrases))), num_queries=int(config.num_queries),
                                  source=source, prompt=phrases, query_meaning=OMDET_QUERY_MEANING, task=prompt.task)
    return OmDetDetector(hf_model.eval(), family, preprocess, detector_config, prompt, tokenizer)
