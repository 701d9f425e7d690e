"""Loading a base as (model, tokenizer): fp32/bf16 or 4-bit NF4; never fp16 for Gemma, never remote code."""

from __future__ import annotations

from pathlib import Path

import torch

from gemtune.base.families import family_of
from gemtune.base.provision import DEFAULT_MODEL, pull
from gemtune.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype == torch.float16:
            raise UserError("fp16 overflows in Gemma's activations; use bfloat16 or float32", field="dtype")
        return dtype
    if dtype in ("float16", "fp16", "half"):
        raise UserError("fp16 overflows in Gemma's activations; use bfloat16 or float32", field="dtype")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; expected float32 or bfloat16", field="dtype")
    return DTYPES[dtype]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model: str | Path = DEFAULT_MODEL, *, dtype: str = "float32", quant: str | None = None, device: str = "cpu"):
    """Return (model, tokenizer) for a base name, directory or hub id.

    `quant="4bit"` loads NF4 weights with bitsandbytes (double quantisation, compute in `dtype`) for QLoRA.
    """
    from transformers import AutoModelForCausalLM

    path = pull(str(model))
    torch_dtype = resolve_dtype(dtype)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=False)
    if quant in ("4bit", "nf4"):
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("4-bit loading needs bitsandbytes: pip install 'gemtune[quant]'", field="quant") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
            llm_int8_skip_modules=["lm_head", "embed_tokens", "vision_tower", "audio_tower"],
        )
        kwargs["device_map"] = {"": device}
    elif quant not in (None, "none"):
        raise UserError(f"unknown quantisation {quant!r}; expected 4bit or none", field="quant")
    try:
        m = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from {path}: {e}", field="model") from None
    family_of(m)  # refuses non-Gemma model types with a clear message
    m.eval()
    return m, load_tokenizer(path)
