"""The real embedded Gemma 3 270M: provisioned, loaded, generates greedily and deterministically."""

import pytest
import torch

from gemtune.base.loader import load_base, resolve_dtype
from gemtune.errors import UserError


def test_fp16_refused():
    with pytest.raises(UserError, match="fp16"):
        resolve_dtype("float16")
    with pytest.raises(UserError, match="fp16"):
        resolve_dtype(torch.float16)


def test_tiny_load_bf16_and_4bit(tiny_gemma3):
    m, tok = load_base(tiny_gemma3, dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and tok.pad_token_id == 0
    pytest.importorskip("bitsandbytes")
    m4, _ = load_base(tiny_gemma3, quant="4bit")
    kinds = {type(mod).__name__ for mod in m4.modules()}
    assert "Linear4bit" in kinds
    out = m4(input_ids=torch.tensor([[2, 105, 400]]))
    assert torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_real_270m_generates_greedily(real_base):
    from gemtune.base.generate import chat

    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (real_base / name).is_file()
    m, tok = load_base(real_base)
    assert m.config.model_type == "gemma3_text" and m.config.vocab_size == 262144
    msgs = [{"role": "user", "content": "Say hello."}]
    a = chat(m, tok, msgs, max_new_tokens=8)
    b = chat(m, tok, msgs, max_new_tokens=8)
    assert a == b and len(a) > 0
