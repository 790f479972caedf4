"""Small prompted (open-vocabulary) HF detectors with lively random weights and their tokenizer files,
written by the test (no download): OWL-ViT with a CLIP byte-level BPE tokenizer (vocab.json +
merges.txt). Used by tests/test_prompted_owl.py."""
from __future__ import annotations

import json
from pathlib import Path

import hf_dense_models
import torch

# a few words the test prompts use get merged tokens; every other word is spelt byte by byte
WORDS = ("cat", "dog", "remote", "control", "red", "car", "bicycle")
IMAGE_SIZE, PATCH = 64, 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = chars[:]
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(chars, (chr(c) for c in codes)))


def write_clip_tokenizer(folder: Path, max_length: int) -> None:
    """vocab.json + merges.txt + tokenizer_config.json of a tiny CLIP tokenizer: every byte alone and
    with '</w>', the merges spelling WORDS, then the special tokens (end-of-text has the highest id,
    as OWL's text pooling expects: it takes the argmax of the ids)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # pad "!" (id 0), as google/owlvit-* tokenizers pad; read back from the files just written
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, pad_token="!")
    tokenizer.save_pretrained(folder)


def owlvit_config(vocab_size: int, max_length: int = 16):
    import transformers

    # the tokenizer's last two ids are start- and end-of-text; "!" (id 0) pads
    text = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_length)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    return transformers.OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32)


def owlvit_folder(folder: Path, seed: int = 1, max_length: int = 16) -> Path:
    """A Hub-style OWL-ViT folder: lively random weights, the processor (fixed 64x64 resize) and the
    tokenizer files."""
    import transformers

    write_clip_tokenizer(folder, max_length)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)  # the default initialisation, then the seeded noise: the same weights every run
    model = transformers.OwlViTForObjectDetection(owlvit_config(len(tokenizer), max_length)).eval()
    hf_dense_models.liven(model, seed=seed)
    with torch.no_grad():  # boxes of a few patches' size, not saturated at 0 or 1
        model.box_head.dense2.weight.mul_(0.02)
        model.box_head.dense2.bias.zero_()
        # logits = (cosine + shift) * scale with shift near 0 and scale near 3: scores spread in (0, 1)
        for head, bias in ((model.class_head.logit_shift, 0.0), (model.class_head.logit_scale, 2.0)):
            head.weight.mul_(0.05)
            head.bias.fill_(bias)
    model.save_pretrained(folder)
    image_processor = transformers.OwlViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    transformers.OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_bert_tokenizer(folder: Path) -> None:
    """vocab.txt (+ tokenizer_config.json) of a tiny lower-case BERT WordPiece tokenizer: the special
    tokens, '.', '?', WORDS, 'a', and every lower-case letter as a word and as '##' continuation."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", *WORDS, *[c for c in letters if c not in WORDS],
             *[f"##{c}" for c in letters]]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    transformers.BertTokenizer.from_pretrained(folder, do_lower_case=True).save_pretrained(folder)


def grounding_dino_config(vocab_size: int, model_type: str = "grounding-dino"):
    import transformers
    from hf_sampled_models import _resnet

    text = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64)
    config_class = transformers.GroundingDinoConfig if model_type == "grounding-dino" else transformers.MMGroundingDinoConfig
    return config_class(
        backbone_config=_resnet(), use_timm_backbone=False, use_pretrained_backbone=False, text_config=text,
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=12, num_feature_levels=4, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32, fusion_dropout=0.0, fusion_droppath=0.0, text_enhancer_dropout=0.0)


def grounding_dino_folder(folder: Path, seed: int = 1, model_type: str = "grounding-dino") -> Path:
    """A Hub-style Grounding DINO (or MM-Grounding-DINO) folder: lively random weights, the processor
    (shortest edge 64, longest 96) and a BERT vocab.txt."""
    import transformers

    write_bert_tokenizer(folder)
    tokenizer = transformers.BertTokenizer.from_pretrained(folder)
    model_class = (transformers.GroundingDinoForObjectDetection if model_type == "grounding-dino"
                   else transformers.MMGroundingDinoForObjectDetection)
    torch.manual_seed(0)
    model = model_class(grounding_dino_config(len(tokenizer), model_type)).eval()
    hf_dense_models.liven(model, seed=seed)
    with torch.no_grad():  # logits = decoder output . text output: smaller decoder outputs spread the scores
        model.model.decoder.layer_norm.weight.mul_(0.08)
        model.model.decoder.layer_norm.bias.mul_(0.08)
    model.save_pretrained(folder)
    image_processor = transformers.GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    transformers.GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
