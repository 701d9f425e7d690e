"""Generation behind one small interface, so the serving stage's engine can replace the local decoder later.

`Generator.generate(prompts, max_new_tokens) -> list[str]` takes already-rendered prompt ids and returns the
answers in the same order. `LocalGenerator` is a thin user of `gemtune.base.generate` (the one generation helper):
batched greedy decoding on the model's own device and dtype, prompts sorted by length so a batch carries little
padding, left padding, each row stopping at the family's end-of-turn (or eos), logits for the last position only.
Greedy decoding with a fixed batch plan gives identical outputs on rerun. `placement` (device + dtype the model
really runs in) is part of the eval output-cache key, so CPU and GPU outputs never mix.

`generate_constrained(prompts, schemas, max_new_tokens)` (`eval.constrained`) decodes each prompt greedily under its
JSON Schema, as the server does for `response_format` json_schema: an xgrammar matcher per row (same options as
`serve/structured.py`: compact JSON, strict), the greedy token chosen among the tokens the grammar allows, the row
ending when the grammar does. It goes through the same helper (`gemtune.base.generate`), whose sampling hook takes
the grammar's choice as a one-point distribution, so batching, padding and stopping are the free decoding's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from gemtune.base import generate as gen_lib
from gemtune.base.device import Placement, placement_of
from gemtune.base.families import Family, family_of
from gemtune.base.generate import left_pad, plan_batches  # noqa: F401 - re-exported for older importers (bench/)


class Generator(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]: ...


@dataclass
class LocalGenerator:
    """Batched greedy decoding with `gemtune.base.generate` on a (possibly PEFT-wrapped) causal LM."""

    model: object
    tokenizer: object
    family: Family
    batch_size: int = 16
    seed: int = 0
    name: str = "gemtune-generate"
    last_new_tokens: list[int] = field(default_factory=list)  # tokens generated per prompt (stop token included)
    placement: Optional[Placement] = None  # default: where the model's weights are

    def __post_init__(self):
        self.stops, self.pad_id = gen_lib.stop_and_pad_ids(self.tokenizer, self.family)
        if self.placement is None:
            self.placement = placement_of(self.model)

    def generation_config(self, max_new_tokens: int):
        """transformers' `GenerationConfig` that `model.generate` decodes with identically (benchmarks compare)."""
        from transformers import GenerationConfig

        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                eos_token_id=self.stops, pad_token_id=self.pad_id,
                                temperature=None, top_p=None, top_k=None)

    def generate_batch(self, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """New token ids per row, cut after the row's first stop token."""
        return gen_lib.generate_batch(self.model, batch, max_new_tokens, stops=self.stops, pad_id=self.pad_id)

    def decode(self, new_ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in new_ids if t not in self.stops], skip_special_tokens=True).strip()

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        rows = gen_lib.generate(self.model, prompts, max_new_tokens, stops=self.stops, pad_id=self.pad_id,
                                batch_size=self.batch_size, seed=self.seed)
        self.last_new_tokens = [len(r) for r in rows]
        return [self.decode(r) for r in rows]

    def generate_constrained(self, prompts: list[list[int]], schemas: list[Any], max_new_tokens: int) -> list[str]:
        """Greedy answers, each decoded under its JSON Schema (a dict or JSON text); in input order."""
        compiled = [self._grammars().compile(schema_text(s)) for s in schemas]
        out: list[list[int]] = [[] for _ in prompts]
        for idx in gen_lib.plan_batches(prompts, self.batch_size):
            proc = GrammarChoice([compiled[i] for i in idx], self.stops, self.pad_id)
            rows = gen_lib.generate_batch(self.model, [prompts[i] for i in idx], max_new_tokens, stops=self.stops,
                                          pad_id=self.pad_id, sampling=proc, seed=self.seed)
            for i, row in zip(idx, rows):
                out[i] = row
        self.last_new_tokens = [len(r) for r in out]
        return [self.decode(r) for r in out]

    def _grammars(self) -> "SchemaCompiler":
        if getattr(self, "_compiler", None) is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]  # the logits' width
            self._compiler = SchemaCompiler(self.tokenizer, vocab, self.stops)
        return self._compiler


# ----------------------------------------------------------------------------------------------- constrained
def schema_text(schema: Any) -> str:
    """A schema (dict or JSON text) as the JSON text it compiles from (key order kept: keys are emitted in it)."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


class SchemaCompiler:
    """xgrammar compiles for one tokenizer; a compiled grammar per distinct schema text."""

    def __init__(self, tokenizer, vocab_size: int, stops: list[int]):
        import xgrammar as xgr

        self.vocab_size = vocab_size
        info = getattr(tokenizer, "xgrammar_info", None)  # a LeanTokenizer's, built while its tokenizer was loaded
        if info is None:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stops))
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._cache: dict[str, Any] = {}

    def compile(self, text: str):
        if text not in self._cache:
            self._cache[text] = self.compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        return self._cache[text]


class GrammarChoice:
    """A `Sampling` stand-in for `gemtune.base.generate`: its one logits processor keeps, per row, only the greedy
    token among those the row's grammar allows (all other scores -inf, so the draw is that token with probability
    1), and advances the row's matcher with the token chosen at the previous step."""

    def __init__(self, compiled: list, stops: list[int], pad_id: int):
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(c) for c in compiled]
        self.stops, self.pad_id = set(stops), pad_id
        self.done = [False] * len(compiled)
        self.calls = 0

    def processors(self):
        from transformers import LogitsProcessorList

        return LogitsProcessorList([self])

    def __call__(self, input_ids, scores):
        import torch
        import xgrammar as xgr

        if self.calls:
            for r, t in enumerate(input_ids[:, -1].tolist()):
                if self.done[r]:
                    continue
                m = self.matchers[r]
                if t in self.stops or not m.accept_token(t) or m.is_terminated():
                    self.done[r] = True
        self.calls += 1
        cpu = scores.detach().float().cpu()
        bitmask = xgr.allocate_token_bitmask(len(self.matchers), cpu.shape[1])
        live = [r for r in range(len(self.matchers)) if not self.done[r]]
        for r in live:
            self.matchers[r].fill_next_token_bitmask(bitmask, r)
        xgr.apply_token_bitmask_inplace(cpu, bitmask, indices=live or None)
        pick = cpu.argmax(-1)
        for r in range(len(self.matchers)):
            if self.done[r]:
                pick[r] = self.pad_id
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(pick), device=scores.device), pick.to(scores.device)] = 0.0
        return out


def make_generator(model, tokenizer, *, batch_size: int = 16, seed: int = 0, family: Family | None = None,
                   placement: Placement | None = None) -> LocalGenerator:
    return LocalGenerator(model, tokenizer, family or family_of(model), batch_size=batch_size, seed=seed,
                          placement=placement)
