"""Choosing next tokens: greedy argmax, or temperature / top-p sampling with each request's own generator.

A seeded request draws only from its own `torch.Generator`, one draw per step on its own logits row, so what else is
in the batch never changes its random stream.

The LM head (262k x 640 for Gemma 3 270M) is most of a decode step's work. For greedy rows of an fp32 model we
screen the vocabulary with a cheaper GEMM and then recompute in fp32 only the tokens that could still be the argmax
(`ScreenedHead`; `engine_model` chooses the kind from the hardware):
- "bf16" where bf16 is native (AVX512-BF16/AMX, a GPU): a bf16 GEMM, 3-6x faster than fp32 there;
- "fp16" where it is not (AVX2-only CPUs, where an emulated bf16 GEMM runs 3-4x *slower* than fp32): FBGEMM's
  fp16-weight GEMM, which keeps the activations in fp32 and computes with fp32 FMAs (no emulated math), reading half
  the bytes: ~2x faster than the fp32 head on an AVX2 CPU, and its error is ~30x smaller than bf16's.
The screen is exact, not a heuristic. For bf16, with unit roundoff u = 2^-8, the screen logit of token j differs
from the fp32 one by at most E = (2u + u^2 + 2n 2^-24) |h| max_j |w_j| plus the output rounding r |logit|
(r = 2^-8); for fp16, E = |h| (max_j |w_j - w16_j| + 2^-11 max_j |w_j|) + 2n 2^-24 |h| max_j |w_j| with r = 0,
where w16 are the weights FBGEMM really multiplies with (IEEE round-to-nearest fp16, checked against its packed copy
of sample rows; the 2^-11 term covers the activations too, should a kernel ever round them). Token j can only be the argmax if
screen_j + r|screen_j| + E >= top - r|top| - E, where top is the best screened logit. x + r|x| is increasing, so
that is a threshold on screen_j: one max per 256-token chunk finds the few chunks that reach it, and only their
tokens are compared and recomputed in fp32 (a full top-k over 262k logits cost 4x more). Rows where too many tokens
pass (flat distributions) fall back to the full fp32 head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemtune.serve.threads import NO_POLICY

SCREEN_CHUNK = 256  # vocabulary tokens per screened chunk
SCREEN_MAX_CANDIDATES = 4096  # per row; beyond it the full fp32 head is cheaper


SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS): 1/T would only amplify rounding


def is_sampled(req) -> bool:
    """Whether a request samples; a temperature in [0, SAMPLING_EPS) is greedy."""
    return req.temperature >= SAMPLING_EPS


def needs_generator(req) -> bool:
    return is_sampled(req)


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Sample one token from a [V] logits row: softmax(logits / T), restricted to the top-p nucleus.

    Finite for every finite row and every T > 0: the row is shifted so its maximum is exactly 0 before dividing
    by T, in float64 (any finite float32 difference over any positive double T is finite or -inf, and the max stays
    0), so the softmax's denominator is at least 1. A non-finite row raises ValueError (its caller fails that row).
    """
    x = logits.double()
    top = x.max()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the logits hold inf/NaN")
    probs = torch.softmax((x - top) / float(temperature), dim=-1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:  # cannot happen; never hand it on
        raise ValueError(f"temperature {temperature!r} gives no valid distribution")
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


def fp16_screen_available() -> bool:
    """Whether FBGEMM's fp16-weight GEMM (fp32 activations and FMAs) runs here: x86 builds of torch with FBGEMM."""
    q = torch.ops.quantized
    if "fbgemm" not in torch.backends.quantized.supported_engines or not all(
            hasattr(q, op) for op in ("linear_prepack_fp16", "linear_dynamic_fp16", "linear_unpack_fp16")):
        return False
    try:
        w = torch.linspace(-1, 1, 48 * 16).reshape(48, 16)
        x = torch.linspace(-2, 2, 3 * 16).reshape(3, 16)
        got = q.linear_dynamic_fp16(x, q.linear_prepack_fp16(w, None))
        return bool(torch.allclose(got, x @ w.half().float().T, atol=1e-4))
    except RuntimeError:
        return False


FP16_PACK_PARTS = 2  # FBGEMM packs on one thread: 262k x 640 took 4.5 s whole, 1.9 s as two blocks packed at once


def _pack_fp16(weight: torch.Tensor, parts: int = FP16_PACK_PARTS) -> list:
    """FBGEMM's packed fp16 copy of `weight` ([V, H]) as `parts` row blocks, packed concurrently (the op releases
    the GIL); the screen runs one GEMM per block and concatenates (measured no slower than one GEMM)."""
    from concurrent.futures import ThreadPoolExecutor

    V = weight.shape[0]
    per = -(-V // max(1, parts))  # rows per block, rounded up to whole screen chunks
    step = -(-per // SCREEN_CHUNK) * SCREEN_CHUNK
    blocks = [weight[i:i + step].contiguous() for i in range(0, V, step)]
    if len(blocks) == 1:
        return [torch.ops.quantized.linear_prepack_fp16(blocks[0], None)]
    with ThreadPoolExecutor(len(blocks)) as ex:
        return list(ex.map(lambda b: torch.ops.quantized.linear_prepack_fp16(b, None), blocks))


def _fp16_residual(weight: torch.Tensor, block: int = 16384) -> float:
    """max_j |w_j - w16_j|, w16 the weights FBGEMM multiplies with: IEEE round-to-nearest fp16, checked against
    FBGEMM's own packed copy of the rows holding the largest and the smallest weights (unpacking the whole head
    costs seconds). Weights beyond fp16's range are refused (FBGEMM would clamp them): ValueError."""
    resid, hi, lo = 0.0, (-1.0, 0), (float("inf"), 0)
    for i in range(0, weight.shape[0], block):
        w = weight[i:i + block]
        a = w.abs()
        rmax, rmin = a.amax(dim=1), a.amin(dim=1)
        j, k = int(rmax.argmax()), int(rmin.argmin())
        hi = max(hi, (float(rmax[j]), i + j))
        lo = min(lo, (float(rmin[k]), i + k))
        resid = max(resid, float((w - w.half().float()).norm(dim=1).max()))
    if not hi[0] < 65504.0:
        raise ValueError(f"LM head weights up to {hi[0]:g} exceed fp16's range")
    sample = weight[sorted({hi[1], lo[1], *range(min(64, weight.shape[0]))})].contiguous()
    q = torch.ops.quantized
    if not torch.equal(q.linear_unpack_fp16(q.linear_prepack_fp16(sample, None))[0], sample.half().float()):
        raise ValueError("FBGEMM's fp16 rounding differs from IEEE round-to-nearest here")
    return resid


class ScreenedHead:
    """Exact greedy argmax of an fp32 LM head, computed mostly with a cheaper `kind` of GEMM: "bf16" or "fp16"
    (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, softcap: float | None = None, threads=NO_POLICY,
                 chunk: int = SCREEN_CHUNK, max_candidates: int = SCREEN_MAX_CANDIDATES, kind: str = "bf16"):
        if kind not in ("bf16", "fp16"):
            raise ValueError(f"screen kind {kind!r}: bf16 or fp16")
        self.threads, self.kind = threads, kind
        self.weight = weight  # [V, H] fp32
        self.softcap = softcap  # monotone, but applied before tie-breaking exactly as the full head would
        self.wb = self.packed = self.packed16 = None
        self.wmax = float(weight.norm(dim=1).max())
        if kind == "bf16":
            wb = weight.to(torch.bfloat16)
            self.dwmax = float((weight - wb.float()).norm(dim=1).max())  # the weights' own rounding residual
            self.wb = wb
            self.r = 2.0 ** -8 * 1.01  # the screen's output rounding (bf16 output)
            try:  # oneDNN's blocked layout: the same numbers, ~18% less CPU than F.linear on this 262k x 640 GEMM
                self.packed = torch.ops.mkldnn._reorder_linear_weight(wb, None)
                self.wb = None
            except (RuntimeError, AttributeError):
                pass
        else:
            self.packed16 = _pack_fp16(weight.detach())
            self.dwmax = _fp16_residual(weight.detach())
            self.dwmax += 2.0 ** -11 * self.wmax  # activations rounded to fp16, should a kernel ever do so
            self.r = 0.0  # fp32 output: its rounding is in the accumulation term below
        self.vocab = weight.shape[0]
        self.chunk = min(chunk, self.vocab)
        self.max_candidates = max_candidates
        self.acc = 2 * weight.shape[1] * 2.0 ** -24  # fp32 accumulation, screen and recomputation
        self.fallbacks = 0

    def bound(self, h: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
        """Per row, the largest possible |screen logit - exact logit| before output rounding:
        h.w = hb.wb + (h - hb).w + hb.(w - wb), each residual term bounded by Cauchy-Schwarz (fp16: hb = h)."""
        hbf = hb.float()
        return ((h - hbf).norm(dim=1) * self.wmax + hbf.norm(dim=1) * self.dwmax
                + self.acc * hbf.norm(dim=1) * self.wmax * 1.01)

    def _screen(self, hb: torch.Tensor) -> torch.Tensor:
        with self.threads.wide():
            if self.packed16 is not None:  # fp32 output, one GEMM per packed row block
                parts = [torch.ops.quantized.linear_dynamic_fp16(hb, p) for p in self.packed16]
                return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            if self.packed is not None:  # bf16 output: rounded, relative error <= 2^-8
                return torch.ops.mkldnn._linear_pointwise(hb, self.packed, None, "none", [], "")
            return F.linear(hb, self.wb)

    def argmax(self, h: torch.Tensor, *, allowed: torch.Tensor | None = None, screen: torch.Tensor | None = None,
               keep_screen: bool = False):
        """[M, H] fp32 final hidden states -> [M] argmax token ids of `h @ weight.T` (fp32 semantics; ties: lowest id).

        `allowed` ([M, V] bool) restricts each row's argmax to its allowed tokens (a grammar's mask: forbidden
        screen logits are -inf, so the same exact bound picks among the allowed ones); `screen` reuses these rows'
        screen from an earlier call (`keep_screen=True` returns it too: (ids, screen))."""
        M, V, C = h.shape[0], self.vocab, self.chunk
        hb = h.to(torch.bfloat16) if self.kind == "bf16" else h
        lb = self._screen(hb) if screen is None else screen  # [M, V] bf16 or fp32
        kept = lb
        if allowed is not None:
            lb = lb.masked_fill(~allowed, float("-inf"))
        n_chunks = -(-V // C)
        if n_chunks * C != V:  # pad the last chunk with -inf (only vocabularies that are not a multiple of C)
            lb = torch.cat([lb, lb.new_full((M, n_chunks * C - V), float("-inf"))], dim=1)
        chunks = lb.view(M, n_chunks, C)
        with self.threads.wide():
            cmax = chunks.amax(dim=-1).float()  # [M, n_chunks]
        top = cmax.amax(dim=-1)
        r = self.r
        c = top - r * top.abs() - 2 * self.bound(h, hb)  # a candidate j needs screen_j + r|screen_j| >= c
        t = torch.where(c >= 0, c / (1 + r), c / (1 - r))  # the screen threshold (x + r|x| inverted) ...
        t = t - t.abs() * 1e-6 - 1e-30  # ... lowered past its own fp32 rounding
        crow, cidx = (cmax >= t[:, None]).nonzero(as_tuple=True)  # chunks holding a candidate
        vals = chunks[crow, cidx].float()  # [P, C]
        prow, pcol = (vals >= t[crow, None]).nonzero(as_tuple=True)
        rows, ids = crow[prow], cidx[prow] * C + pcol  # candidate (row, token) pairs, row-major
        counts = torch.bincount(rows, minlength=M)
        flat = counts > self.max_candidates
        if bool(flat.any()):  # drop those rows' candidates; they take the full fp32 head below
            keep = ~flat[rows]
            rows, ids = rows[keep], ids[keep]
        exact = (self.weight[ids] * h[rows]).sum(dim=-1)  # fp32 logits of the candidates
        if self.softcap is not None:
            exact = torch.tanh(exact / self.softcap) * self.softcap
        best = torch.full((M,), float("-inf"), dtype=exact.dtype).scatter_reduce(0, rows, exact, "amax")
        win = exact == best[rows]
        out = torch.full((M,), torch.iinfo(torch.long).max, dtype=torch.long)
        out = out.scatter_reduce(0, rows[win], ids[win], "amin")
        if bool(flat.any()):
            fb = flat.nonzero().flatten()
            self.fallbacks += len(fb)
            with self.threads.wide():
                full = F.linear(h[fb], self.weight)
            if self.softcap is not None:
                full = torch.tanh(full / self.softcap) * self.softcap
            if allowed is not None:
                full = full.masked_fill(~allowed[fb], float("-inf"))
            out[fb] = full.argmax(-1)
        return (out, kept) if keep_screen else out


def choose_tokens(runner, hidden: torch.Tensor, seqs: list,
                  grammars=None) -> tuple[list[int | None], dict[int, tuple[str, str]]]:
    """Next token for each row of `hidden` (final-normed states of the rows that need one).

    Rows whose sequence holds a grammar matcher (`seq.grammar`) get a token their grammar allows
    (`engine_grammar.constrain_tokens`, with `grammars`); the free rows are computed exactly as without them.

    Returns (tokens, errors): a row whose token cannot be chosen — its activations are inf/NaN, its sampling
    raised, or the head gave an id outside the vocabulary — gets token None and (reason, message) in `errors[i]`
    (reason "numerics", "sampling" or "engine", as RequestFailed.reason); the
    other rows' tokens are exactly what they would be without it (greedy rows are computed on their own states).
    """
    if not seqs:
        return [], {}
    errors: dict[int, tuple[str, str]] = {}
    finite = torch.isfinite(hidden).all(dim=-1).tolist()
    for i, ok in enumerate(finite):
        if not ok:
            errors[i] = ("numerics", "the model's activations became inf/NaN for this request")
    live = [i for i in range(len(seqs)) if i not in errors]
    constrained = {i for i in live if getattr(seqs[i], "grammar", None) is not None}
    sampled = [i for i in live if is_sampled(seqs[i].req)]
    greedy = [i for i in live if not is_sampled(seqs[i].req)]
    tokens: list[int | None] = [None] * len(seqs)
    scores: dict = {}  # constrained row -> what its free choice was made from, reused to constrain it
    if greedy:
        hg = hidden if len(greedy) == len(seqs) else hidden[greedy]
        head = runner.screened_head
        if head is not None:
            ids, screen = head.argmax(hg, keep_screen=True) if constrained else (head.argmax(hg), None)
        else:
            full = runner.logits(hg)
            ids, screen = full.argmax(-1), None
        for p, (i, t) in enumerate(zip(greedy, ids.tolist())):
            tokens[i] = t
            if i in constrained:
                scores[i] = ("screen", screen[p]) if screen is not None else ("logits", full[p])
    if sampled:
        logits = runner.logits(hidden[sampled])
        for row, i in enumerate(sampled):
            s = seqs[i]
            if i in constrained:
                scores[i] = ("logits", logits[row])
                continue
            try:
                tokens[i] = sample_row(logits[row], s.req.temperature, s.req.top_p, s.gen)
            except Exception as e:  # this row only: the batch goes on
                errors[i] = ("sampling", f"sampling failed: {type(e).__name__}: {e}")
    if constrained:
        from gemtune.serve.engine_grammar import constrain_tokens

        draw = lambda logits, s: sample_row(logits, s.req.temperature, s.req.top_p, s.gen)  # noqa: E731
        constrain_tokens(grammars, runner, hidden, seqs, tokens, errors, sorted(constrained), scores, draw)
    vocab = runner.lm_head.out_features
    for i, t in enumerate(tokens):
        if i not in errors and not (t is not None and 0 <= t < vocab):
            errors[i] = ("engine", f"the head chose token {t!r}, outside the vocabulary")
    for i in errors:
        tokens[i] = None
    return tokens, errors
