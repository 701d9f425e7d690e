"""Loading a base as (model, tokenizer) on a device in a dtype: fp32/bf16 or 4-bit NF4; never fp16 for Gemma, never
remote code. Device and dtype follow the one policy of `gemtune.base.device` (auto | cpu | cuda[:N],
auto | bfloat16 | float32)."""

from __future__ import annotations

from pathlib import Path

import torch

from gemtune.base.device import DTYPES, Placement, check_dtype_spec, cpu_has_native_bf16, resolve
from gemtune.base.families import family_of
from gemtune.base.provision import DEFAULT_MODEL, pull
from gemtune.errors import UserError

__all__ = ["DTYPES", "load_base", "load_tokenizer", "resolve_dtype"]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """An explicit dtype (float32 or bfloat16, by name or as a torch.dtype); fp16 and unknown names are refused.
    `auto` needs a device: use `gemtune.base.device.resolve_dtype`."""
    try:
        s = check_dtype_spec(dtype)
    except ValueError as e:
        raise UserError(str(e), field="dtype") from None
    if s == "auto":
        raise UserError("dtype auto depends on the device; resolve it with gemtune.base.device.resolve", field="dtype")
    return DTYPES[s]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model: str | Path = DEFAULT_MODEL, *, dtype: str | torch.dtype = "float32", quant: str | None = None,
              device: str | torch.device = "cpu", placement: Placement | None = None, tokenizer: bool = True):
    """Return (model, tokenizer) for a base name, directory or hub id, with the model on `device` in `dtype`
    (each may be "auto"; `placement`, an already resolved Placement, wins over both).

    On a GPU the weights are loaded straight onto it (no host copy of the whole model). `quant="4bit"` loads NF4
    weights with bitsandbytes (double quantisation, compute in `dtype`) for QLoRA, on `device`. `tokenizer=False`
    returns (model, None) for a caller that holds the tokenizer already.
    """
    from transformers import AutoModelForCausalLM

    place = placement or resolve(device, dtype)
    if place.dtype == torch.bfloat16 and place.device.type == "cpu" and not cpu_has_native_bf16():
        from gemtune.config import warn

        warn("bfloat16 on this CPU is emulated (no AVX512-BF16/AMX): it runs slower than float32; "
             "dtype auto picks float32 here")
    path = pull(str(model))
    kwargs = dict(dtype=place.dtype, trust_remote_code=False)
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
            bnb_4bit_compute_dtype=place.dtype,
            llm_int8_skip_modules=["lm_head", "embed_tokens", "vision_tower", "audio_tower"],
        )
        kwargs["device_map"] = {"": str(place.device)}
    elif quant not in (None, "none"):
        raise UserError(f"unknown quantisation {quant!r}; expected 4bit or none", field="quant")
    elif place.device.type != "cpu":
        kwargs["device_map"] = {"": str(place.device)}  # materialised on the GPU, never whole in host RAM
    try:
        m = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from {path}: {e}", field="model") from None
    family_of(m)  # refuses non-Gemma model types with a clear message
    m.eval()
    return m, (load_tokenizer(path) if tokenizer else None)  # Gemma's 262k tokenizer takes seconds: only when asked
