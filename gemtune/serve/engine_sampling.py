"""Choosing next tokens: greedy argmax, or temperature / top-p sampling with each request's own generator.

A seeded request draws only from its own `torch.Generator`, one draw per step on its own logits row, so what else is
in the batch never changes its random stream.
"""

from __future__ import annotations

import torch


def needs_generator(req) -> bool:
    return req.temperature > 0


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Sample one token from a [V] logits row: softmax(logits / T), restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=gen))
    k = min(1024, probs.numel())
    vals, idx = torch.topk(probs, k)
    if float(vals.sum()) < top_p and k < probs.numel():
        vals, idx = torch.sort(probs, descending=True)
    before = torch.cumsum(vals, 0) - vals  # mass strictly above each token
    keep = before < top_p  # the smallest prefix whose mass reaches top_p (at least one token)
    vals, idx = vals[keep], idx[keep]
    return int(idx[torch.multinomial(vals / vals.sum(), 1, generator=gen)])


def choose_tokens(runner, hidden: torch.Tensor, seqs: list) -> list[int]:
    """Next token for each row of `hidden` (final-normed states of the rows that need one)."""
    if not seqs:
        return []
    logits = runner.logits(hidden)
    tokens = logits.argmax(-1).tolist()
    for i, s in enumerate(seqs):
        if s.req.temperature > 0:
            tokens[i] = sample_row(logits[i], s.req.temperature, s.req.top_p, s.gen)
    return tokens
