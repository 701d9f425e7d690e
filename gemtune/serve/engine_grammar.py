"""Constrained decoding in the engine: grammars compiled with xgrammar, one matcher per constrained row, token masks.

Why xgrammar: `bench/grammar.py` (results in bench/results/grammar.json, docs/stages/serve.md) measured the mask
work per token at Gemma's 262k vocabulary and batch 64 for both installed libraries; xgrammar's batched fill plus
advance costs less per token than llguidance's (llguidance compiles lazily, so its compile is cheaper, but compile
is paid once per schema and cached here; the mask is paid every token).

- `Grammars` compiles a `GrammarSpec` (engine_stream) for the engine's tokenizer (the OpenAI layer checked the
  schema already: `structured.check_schema`, size and nesting caps, the JSON Schema meta-schema); a schema that
  cannot compile is a `GrammarError` (a UserError naming the request field: HTTP 400). Compiled grammars sit in a bounded LRU keyed by
  (kind, schema text, wrapper), so a repeated `response_format` compiles once.
- Each constrained row holds a `xgrammar.GrammarMatcher` (`Engine` creates it at submit and drops it on every exit
  path: finish, cancel, failure, shutdown; `stats()["grammar_states"]` counts the live ones).
- `constrain_tokens` runs inside `engine_sampling.choose_tokens` for the constrained rows only: their bitmasks are
  filled in one batched call; a greedy row keeps the unconstrained argmax when the mask allows it (the common case
  for a trained model: no extra head work) and otherwise takes the argmax over its allowed ids of the fp32 logits;
  a sampled row samples from its logits with forbidden tokens at -inf. Free rows are never touched.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

import torch

from gemtune.serve.engine_stream import GrammarSpec
from gemtune.serve.structured import MAX_SCHEMA_CHARS, GrammarError, xgrammar_grammar

GRAMMAR_CACHE = 64  # compiled grammars kept (LRU)
EXPAND_WORDS = 2048  # a row whose mask has more non-zero 32-token words than this is unpacked whole


def _clean(msg: str) -> str:
    """xgrammar's C++ messages start with a timestamp and a source path; keep the sentence."""
    msg = re.sub(r"^\[[0-9:]+\]\s*\S+:\d+:\s*", "", str(msg).strip())
    return msg.splitlines()[0][:300] if msg else "cannot compile"


class Grammars:
    """Compiled grammars for one tokenizer and vocabulary (thread-safe; the xgrammar tokenizer info is built at the
    first constrained request, ~1 s for Gemma's 262k vocabulary, so a server without one pays nothing)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], *, cache_size: int = GRAMMAR_CACHE,
                 threads: int = 2):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, list(stop_ids)
        self.cache_size, self.threads = cache_size, threads
        self._cache: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = self._batch = None
        self.compiles = 0

    def _ensure(self):
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.threads, cache_enabled=False)
                self._batch = xgr.BatchGrammarMatcher(max_threads=self.threads)
        return self._compiler

    def compile(self, spec: GrammarSpec):
        """The compiled grammar for `spec` (cached); GrammarError when it cannot be compiled."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        if len(spec.schema) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the schema is {len(spec.schema)} characters; at most {MAX_SCHEMA_CHARS}",
                               field=spec.field)
        compiler = self._ensure()
        try:
            compiled = compiler.compile_grammar(xgrammar_grammar(spec))
        except GrammarError:
            raise
        except Exception as e:  # xgrammar: RuntimeError / InvalidJSONError with the converter's reason
            raise GrammarError(f"the schema cannot be compiled into a grammar: {_clean(e)}",
                               field=spec.field) from None
        with self._lock:
            self.compiles += 1
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec):
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))

    def cached(self) -> int:
        with self._lock:
            return len(self._cache)

    # ----------------------------------------------------------------------------------------------- masks
    def fill(self, matchers: list) -> torch.Tensor:
        """[len(matchers), ceil(V/32)] int32 bitmask of the tokens each matcher allows next."""
        import xgrammar as xgr

        self._ensure()
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)
        return bitmask


_BITS8 = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def is_allowed(mask_row: torch.Tensor, token: int) -> bool:
    return bool((int(mask_row[token // 32]) >> (token % 32)) & 1)


def allowed_ids(mask_row: torch.Tensor, vocab: int, sparse_only: bool = False) -> torch.Tensor | None:
    """The token ids a [W] int32 bitmask row allows (ascending), below `vocab`; with `sparse_only`, None when the
    row allows tokens in more than EXPAND_WORDS words (then a whole-row mask is cheaper)."""
    words = mask_row.nonzero().flatten()
    if len(words) > EXPAND_WORDS:
        if sparse_only:
            return None
        return unpack(mask_row, vocab).nonzero().flatten()
    b = (mask_row[words].view(torch.uint8).view(-1, 4)[:, :, None] & _BITS8).bool().view(len(words), 32)
    r, c = b.nonzero(as_tuple=True)
    ids = words[r] * 32 + c
    return ids[ids < vocab]


def unpack(mask_row: torch.Tensor, vocab: int) -> torch.Tensor:
    """A [W] int32 bitmask row as a [vocab] bool mask."""
    return (mask_row.view(torch.uint8)[:, None] & _BITS8).bool().flatten()[:vocab]


def constrain_tokens(grammars: Grammars, runner, hidden: torch.Tensor, seqs: list, tokens: list, errors: dict,
                     idx: list[int], scores: dict, sampler) -> None:
    """Choose the tokens of the constrained rows `idx` among those their grammars allow.

    `tokens[i]` of a greedy row holds its free argmax, kept when the grammar allows it (no extra work). Otherwise
    the argmax over the allowed ids is exact fp32: computed directly from the head's rows for those ids when they
    are few, else by the bf16-screened head over the row's kept screen with the forbidden tokens masked (or from
    its fp32 logits on the plain head path). A sampled row draws from its logits over the allowed ids only
    (`sampler(logits, seq)` gives an index into them; one draw, as a free row). `scores[i]` is ("screen" |
    "logits", the row's tensor) from the free pass. Errors go into `errors[i]` as in choose_tokens.
    """
    masks = grammars.fill([seqs[i].grammar for i in idx])
    vocab = runner.lm_head.out_features
    weight, softcap = runner.lm_head.weight, runner.softcap
    screened: list[tuple[int, int]] = []  # (row, mask index): greedy rows for the masked screen
    for k, i in enumerate(idx):
        s = seqs[i]
        greedy = s.gen is None
        if greedy and is_allowed(masks[k], tokens[i]):
            continue
        try:
            kind, row = scores[i]
            ids = allowed_ids(masks[k], vocab, sparse_only=greedy and kind == "screen")
            if ids is None:
                screened.append((i, k))
                continue
            if len(ids) == 0:
                errors[i] = ("engine", "the grammar allows no next token")
            elif not greedy:
                tokens[i] = int(ids[sampler(row[ids], s)])
            elif kind == "logits":
                tokens[i] = int(ids[int(row[ids].argmax())])
            else:  # exact fp32 logits of the few allowed tokens (ids ascending: ties go to the lowest id)
                exact = (weight[ids] * hidden[i]).sum(dim=-1)
                if softcap is not None:
                    exact = torch.tanh(exact / softcap) * softcap
                tokens[i] = int(ids[int(exact.argmax())])
        except Exception as e:  # this row only
            errors[i] = ("sampling", f"sampling failed: {type(e).__name__}: {e}")
    if screened:
        rows = [i for i, _ in screened]
        allowed = torch.stack([unpack(masks[k], vocab) for _, k in screened])
        screen = torch.stack([scores[i][1] for i in rows])
        for i, t in zip(rows, runner.screened_head.argmax(hidden[rows], allowed=allowed, screen=screen).tolist()):
            tokens[i] = t
