"""Plain greedy chat generation on a (model, tokenizer): used by the demo and as a reference in tests."""

from __future__ import annotations

import torch

from gemtune.base.families import family_of
from gemtune.base.templates import render_prompt, stop_token_ids


@torch.inference_mode()
def chat(model, tokenizer, messages, max_new_tokens: int = 64) -> str:
    fam = family_of(model)
    prompt = render_prompt(messages, tokenizer, fam)
    ids = torch.tensor([prompt.input_ids], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop_token_ids(tokenizer, fam), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
