"""Choosing next tokens: greedy argmax, or temperature / top-p sampling with each request's own generator.

A seeded request draws only from its own `torch.Generator`, one draw per step on its own logits row, so what else is
in the batch never changes its random stream.

The LM head (262k x 640 for Gemma 3 270M) is most of a decode step's work. For greedy rows of an fp32 model we
screen the vocabulary with a bf16 GEMM (3-4x faster on CPUs with AVX512-BF16) and then recompute the few tokens
that could still be the argmax in fp32. The screen is exact, not a heuristic: with unit roundoff u = 2^-8, the bf16
logit of token j differs from the fp32 one by at most E = (2u + u^2 + 2n 2^-24) |h| max_j |w_j| plus the output
rounding 2u |logit|, so when the K-th best screened logit, raised by that bound, stays below the best one lowered by
it, the true argmax is among the top K and an fp32 recomputation of those K finds it. Rows where the bound does not
separate (flat distributions) fall back to the full fp32 head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemtune.serve.threads import NO_POLICY

SCREEN_K = 64


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


class ScreenedHead:
    """Exact greedy argmax of an fp32 LM head, computed mostly in bf16 (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, softcap: float | None = None, k: int = SCREEN_K, threads=NO_POLICY):
        self.threads = threads
        self.weight = weight  # [V, H] fp32
        self.softcap = softcap  # monotone, but applied before tie-breaking exactly as the full head would
        wb = weight.to(torch.bfloat16)
        self.dwmax = float((weight - wb.float()).norm(dim=1).max())  # the weights' own rounding residual
        self.wb, self.packed = wb, None
        try:  # oneDNN's blocked layout: the same numbers, ~18% less CPU than F.linear on this 262k x 640 GEMM
            self.packed = torch.ops.mkldnn._reorder_linear_weight(wb, None)
            self.wb = None
        except (RuntimeError, AttributeError):
            pass
        self.k = min(k, weight.shape[0])
        self.wmax = float(weight.norm(dim=1).max())
        self.acc = 2 * weight.shape[1] * 2.0 ** -24  # fp32 accumulation, screen and recomputation
        self.fallbacks = 0

    def bound(self, h: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
        """Per row, the largest possible |bf16 screen logit - exact logit| before output rounding:
        h.w = hb.wb + (h - hb).w + hb.(w - wb), each residual term bounded by Cauchy-Schwarz."""
        hbf = hb.float()
        return ((h - hbf).norm(dim=1) * self.wmax + hbf.norm(dim=1) * self.dwmax
                + self.acc * hbf.norm(dim=1) * self.wmax * 1.01)

    def argmax(self, h: torch.Tensor) -> torch.Tensor:
        """[M, H] fp32 final hidden states -> [M] argmax token ids of `h @ weight.T` (fp32 semantics)."""
        hb = h.to(torch.bfloat16)
        with self.threads.wide():
            if self.packed is not None:  # bf16 output: rounded, relative error <= 2^-8
                lb = torch.ops.mkldnn._linear_pointwise(hb, self.packed, None, "none", [], "")
            else:
                lb = F.linear(hb, self.wb)
            vals, idx = lb.topk(self.k, dim=-1)  # descending; bf16 topk is 4x faster than on a float copy
        vals = vals.float()
        e = self.bound(h, hb)
        top, kth = vals[:, 0], vals[:, -1]
        r = 2.0 ** -8 * 1.01
        # every token outside the top k has screen <= kth, so true logit <= kth + r|kth| + e (x + r|x| is increasing)
        separated = kth + r * kth.abs() + e < top - r * top.abs() - e
        exact = torch.einsum("mkh,mh->mk", self.weight[idx], h)  # fp32 logits of the candidates
        if self.softcap is not None:
            exact = torch.tanh(exact / self.softcap) * self.softcap
        best = exact.max(dim=-1, keepdim=True).values
        ids = torch.where(exact == best, idx, torch.iinfo(idx.dtype).max).min(dim=-1).values  # ties: lowest id
        if not bool(separated.all()):
            rows = (~separated).nonzero().flatten()
            self.fallbacks += len(rows)
            with self.threads.wide():
                full = F.linear(h[rows], self.weight)
            if self.softcap is not None:
                full = torch.tanh(full / self.softcap) * self.softcap
            ids[rows] = full.argmax(-1)
        return ids


def choose_tokens(runner, hidden: torch.Tensor, seqs: list) -> list[int]:
    """Next token for each row of `hidden` (final-normed states of the rows that need one)."""
    if not seqs:
        return []
    sampled = [i for i, s in enumerate(seqs) if s.req.temperature > 0]
    greedy = [i for i, s in enumerate(seqs) if s.req.temperature <= 0]
    tokens = [0] * len(seqs)
    if greedy:
        hg = hidden if not sampled else hidden[greedy]
        head = runner.screened_head
        ids = head.argmax(hg) if head is not None else runner.logits(hg).argmax(-1)
        for i, t in zip(greedy, ids.tolist()):
            tokens[i] = t
    if sampled:
        logits = runner.logits(hidden[sampled])
        for row, i in enumerate(sampled):
            s = seqs[i]
            tokens[i] = sample_row(logits[row], s.req.temperature, s.req.top_p, s.gen)
    return tokens
