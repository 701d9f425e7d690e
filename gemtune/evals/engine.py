"""Generation behind one small interface, so the serving stage's engine can replace the local decoder later.

`Generator.generate(prompts, max_new_tokens) -> list[str]` takes already-rendered prompt ids and returns the
answers in the same order. `LocalGenerator` is a thin user of `gemtune.base.generate` (the one generation helper):
batched greedy decoding on the model's own device and dtype, prompts sorted by length so a batch carries little
padding, left padding, each row stopping at the family's end-of-turn (or eos), logits for the last position only.
Greedy decoding with a fixed batch plan gives identical outputs on rerun. `placement` (device + dtype the model
really runs in) is part of the eval output-cache key, so CPU and GPU outputs never mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

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


def make_generator(model, tokenizer, *, batch_size: int = 16, seed: int = 0, family: Family | None = None,
                   placement: Placement | None = None) -> LocalGenerator:
    return LocalGenerator(model, tokenizer, family or family_of(model), batch_size=batch_size, seed=seed,
                          placement=placement)
