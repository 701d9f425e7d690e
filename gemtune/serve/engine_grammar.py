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


def allowed_ids(mask_row: torch.Tensor, vocab: int) -> torch.Tensor:
    """The token ids a [W] int32 bitmask row allows (ascending), below `vocab`."""
    words = mask_row.nonzero().flatten()
    if len(words) > EXPAND_WORDS:
        bits = (mask_row.view(torch.uint8)[:, None] & _BITS8).bool().flatten()
        return bits[:vocab].nonzero().flatten()
    b = (mask_row[words].view(torch.uint8).view(-1, 4)[:, :, None] & _BITS8).bool().view(len(words), 32)
    r, c = b.nonzero(as_tuple=True)
    ids = words[r] * 32 + c
    return ids[ids < vocab]


def constrain_tokens(grammars: Grammars, runner, hidden: torch.Tensor, seqs: list, tokens: list, errors: dict,
                     idx: list[int], sampler) -> None:
    """Fix the tokens of the constrained rows `idx` (greedy and sampled) so each is one its grammar allows.

    `tokens[i]` for a greedy row holds its unconstrained argmax; a sampled constrained row's token is None here and
    drawn by `sampler(logits, seq)` (an index into `logits`) from its logits over the allowed ids only, one draw as
    a free row makes. Errors go into `errors[i]` as in choose_tokens.
    """
    masks = grammars.fill([seqs[i].grammar for i in idx])
    vocab = runner.lm_head.out_features
    need = [k for k, i in enumerate(idx) if tokens[i] is None or not is_allowed(masks[k], tokens[i])]
    if not need:
        return
    logits = runner.logits(hidden[[idx[k] for k in need]])
    for row, k in enumerate(need):
        i, s = idx[k], seqs[idx[k]]
        ids = allowed_ids(masks[k], vocab)
        if len(ids) == 0:
            errors[i] = ("engine", "the grammar allows no next token")
            continue
        try:
            if s.gen is None:  # greedy: argmax over the allowed ids (ties: the lowest id, as the free head)
                tokens[i] = int(ids[int(logits[row, ids].argmax())])
            else:
                tokens[i] = int(ids[sampler(logits[row, ids], s)])
        except Exception as e:  # this row only
            errors[i] = ("sampling", f"sampling failed: {type(e).__name__}: {e}")
