"""Generation behind one small interface, so the serving stage's engine can replace HF `generate` later.

`Generator.generate(prompts, max_new_tokens) -> list[str]` takes already-rendered prompt ids and returns the
answers in the same order. The HF implementation is batched greedy decoding: prompts sorted by length so a batch
carries little padding, left padding, each row stopping at the family's end-of-turn (or eos), logits computed for
the last position only (transformers' `generate` passes `logits_to_keep=1`; the 262k-vocab head would otherwise
dominate). Greedy decoding with a fixed seed and a fixed batch plan gives identical outputs on rerun.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch

from gemtune.base.families import Family, family_of
from gemtune.base.templates import stop_token_ids
from gemtune.errors import UserError


class Generator(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]: ...


def plan_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` grouped into batches of similar length (longest first: memory peaks early, if at all).

    Ties keep input order, so the plan — and hence every output — depends only on the prompts and the batch size.
    """
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, p in enumerate(batch):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids, mask


@dataclass
class HFGenerator:
    """Batched greedy decoding with transformers' `generate` on a (possibly PEFT-wrapped) causal LM."""

    model: object
    tokenizer: object
    family: Family
    batch_size: int = 16
    seed: int = 0
    name: str = "hf-generate"
    last_new_tokens: list[int] = field(default_factory=list)  # tokens generated per prompt (stop token included)

    def __post_init__(self):
        self.stops = stop_token_ids(self.tokenizer, self.family)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stops[-1]

    def generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                eos_token_id=self.stops, pad_token_id=self.pad_id,
                                temperature=None, top_p=None, top_k=None)

    @torch.inference_mode()
    def generate_batch(self, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """New token ids per row, cut after the row's first stop token."""
        ids, mask = left_pad(batch, self.pad_id)
        device = getattr(self.model, "device", torch.device("cpu"))
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  generation_config=self.generation_config(max_new_tokens))
        rows = []
        for r in out[:, ids.shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(r) if t in self.stops), len(r))
            rows.append(r[:cut])
        return rows

    def decode(self, new_ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in new_ids if t not in self.stops], skip_special_tokens=True).strip()

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        outputs: list[Optional[str]] = [None] * len(prompts)
        counts = [0] * len(prompts)
        # Seed inside a forked RNG: an eval run in the middle of training must not change training's random stream.
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
            torch.manual_seed(self.seed)
            for idx in plan_batches(prompts, self.batch_size):
                for i, new in zip(idx, self.generate_batch([prompts[i] for i in idx], max_new_tokens)):
                    outputs[i] = self.decode(new)
                    counts[i] = len(new)
        self.last_new_tokens = counts
        return outputs  # type: ignore[return-value]


# ---------------------------------------------------------------- adapters

@contextlib.contextmanager
def attached_adapter(model, adapter_dir: Path) -> Iterator[object]:
    """The base with the LoRA adapter attached (unmerged, as vLLM applies it); the base is restored afterwards so
    one loaded base serves every checkpoint."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise UserError(f"cannot load the adapter onto this base: {type(e).__name__}: {e}", file=str(adapter_dir)) from None
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()


def make_generator(model, tokenizer, *, batch_size: int = 16, seed: int = 0) -> HFGenerator:
    return HFGenerator(model, tokenizer, family_of(model), batch_size=batch_size, seed=seed)
