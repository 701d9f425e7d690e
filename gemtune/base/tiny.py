"""Tiny random Gemma 3 / Gemma 4 models and a character-level tokenizer with Gemma's special tokens.

Tests build these in seconds; no weights are fetched. The tokenizer maps every printable ASCII character `c` to
id `CHAR_OFFSET + ord(c)`, so reference token sequences in tests can be checked by hand. Special tokens sit at the
ids the real Gemma vocabularies use (<pad>=0, <eos>=1, <bos>=2, <unk>=3, turn markers at 105/106).
"""

from __future__ import annotations

from pathlib import Path

TINY_VOCAB = 512
CHAR_OFFSET = 300
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def char_id(c: str) -> int:
    if c == "\n":
        return CHAR_OFFSET + 10
    if c == "\t":
        return CHAR_OFFSET + 9
    return CHAR_OFFSET + ord(c)


def tiny_tokenizer(family: str = "gemma3"):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    turn = ("<start_of_turn>", "<end_of_turn>") if family == "gemma3" else ("<|turn>", "<turn|>")
    specials = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, turn[0]: 105, turn[1]: 106}
    vocab = {}
    for i in range(TINY_VOCAB):
        vocab[f"<unused{i}>"] = i
    inv = {v: k for k, v in vocab.items()}
    for tok, i in specials.items():
        del vocab[inv[i]]
        vocab[tok] = i
    for c in CHARS:
        i = char_id(c)
        del vocab[inv[i]]
        vocab[c] = i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        additional_special_tokens=list(turn),
    )
    tok.padding_side = "left"
    return tok


def tiny_config(family: str = "gemma3", *, multimodal: bool = False, kv_shared: bool = True, layers: int = 4, hidden: int = 64):
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16, max_position_embeddings=1024,
            layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"], query_pre_attn_scalar=32,
            pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
        )
    from transformers.models.gemma4 import Gemma4TextConfig

    text = Gemma4TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32, sliding_window=16,
        max_position_embeddings=1024, layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
        vocab_size_per_layer_input=TINY_VOCAB, hidden_size_per_layer_input=8,
        num_kv_shared_layers=2 if kv_shared else 0, pad_token_id=0, eos_token_id=[1, 106], bos_token_id=2,
        tie_word_embeddings=True,
    )
    if not multimodal:
        return text
    from transformers.models.gemma4 import Gemma4Config, Gemma4VisionConfig

    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16)
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                        boi_token_id=5, eoi_token_id=6, image_token_id=7, video_token_id=8, boa_token_id=9,
                        eoa_token_index=10, audio_token_id=11)


def tiny_model(family: str = "gemma3", *, multimodal: bool = False, kv_shared: bool = True, seed: int = 0, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, multimodal=multimodal, kv_shared=kv_shared, **kw)
    if multimodal:
        from transformers.models.gemma4 import Gemma4ForConditionalGeneration

        return Gemma4ForConditionalGeneration(cfg).eval()
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny(path: str | Path, family: str = "gemma3", *, multimodal: bool = False, seed: int = 0, **kw) -> Path:
    """Write a loadable tiny base directory (config, safetensors, tokenizer.json)."""
    path = Path(path)
    model = tiny_model(family, multimodal=multimodal, seed=seed, **kw)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(family).save_pretrained(path)
    return path
