"""The one generation helper: batched, left-padded decoding on whatever device and dtype the model has.

Eval (`evals.engine`), the privacy probe's greedy extraction and PII sampling, and `chat` all decode through
`generate_batch`; tests use `chat` as the unbatched reference for the batched paths.

- Inputs are created on the model's device (`device.model_device`: its input embeddings' device), never on the
  CPU and moved later, so a GPU (or the `meta` device in tests) sees no tensor from elsewhere.
- Prompts are left-padded; position ids count real tokens only (0 on padding), so a padded row decodes exactly as
  it would alone. Without padding no attention mask is passed at all, as transformers' `generate` does.
- Logits are computed for the last position only (`logits_to_keep=1`; a 262k-vocab head would otherwise dominate)
  and processed in fp32 whatever the model's dtype.
- Greedy decoding is deterministic. Sampling (temperature, top-k, top-p) draws from a `torch.Generator` seeded
  with `seed` on the model's device: the same prompts, seed and batch plan give the same tokens, and the global
  RNG (training's stream) is never touched.
- A row ends at its first stop token, at `max_new_tokens`, or when a stopping criterion (transformers'
  `StoppingCriteria` protocol: `(input_ids, scores) -> bool tensor per row`) says so; a batch ends when its last
  row does. Finished rows are padded while the others run on.

The loop reproduces transformers' `generate` token for token on these settings (greedy, and sampling with the
same seed on the CPU; `tests/base/test_generate.py` checks both), while owning what `generate` does not offer:
per-row lengths, no read of a tensor value before the first forward (so a model on `meta` gets as far as its
forward), and independence from a base's `generation_config.json` (every decoding knob is explicit here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from gemtune.base.device import model_device
from gemtune.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """Sampling knobs; `None` where a helper takes `sampling` means greedy decoding."""

    temperature: float = 1.0
    top_k: Optional[int] = None  # None or 0: off
    top_p: float = 1.0  # 1.0: off

    def processors(self):
        """transformers' own warpers, in the order `generate` applies them."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        procs = LogitsProcessorList()
        if self.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            procs.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return procs


def stop_and_pad_ids(tokenizer, family) -> tuple[list[int], int]:
    """(stop token ids of the family's chat template, the pad id): the tokenizer's pad, else the last stop id."""
    from gemtune.base.templates import stop_token_ids

    stops = stop_token_ids(tokenizer, family)
    pad = tokenizer.pad_token_id
    return stops, (pad if pad is not None else stops[-1])


def plan_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` grouped into batches of similar length (longest first: memory peaks early, if at all).

    Ties keep input order, so the plan — and hence every output — depends only on the prompts and the batch size.
    """
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(batch: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), left-padded to the longest row, created on `device` (default: the CPU)."""
    width = max(len(p) for p in batch)
    ids = [[pad_id] * (width - len(p)) + list(p) for p in batch]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in batch]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.long, device=device))


def position_ids(batch: Sequence[Sequence[int]], device: torch.device | str | None = None) -> torch.Tensor:
    """Positions of left-padded rows: 0, 1, ... over each row's real tokens, 0 on its padding."""
    width = max(len(p) for p in batch)
    return torch.tensor([[0] * (width - len(p)) + list(range(len(p))) for p in batch], dtype=torch.long,
                        device=device)


def check_model_dtype(model) -> None:
    from gemtune.base.device import model_dtype

    if model_dtype(model) == torch.float16:
        raise UserError("the model is in float16, which overflows in Gemma's activations; load it in bfloat16 or "
                        "float32", field="dtype")


Criterion = Callable[..., torch.Tensor]


class SeededDraws:
    """A `torch.Generator` seeded with `seed`, made on the model's device at the first draw (not before: greedy
    decoding never needs one, and a model on `meta` has no generator) and then kept, so consecutive batches
    continue one stream."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.generator: Optional[torch.Generator] = None

    def on(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator


@torch.inference_mode()
def generate_batch(model, batch: Sequence[Sequence[int]], max_new_tokens: int, *, stops: Sequence[int], pad_id: int,
                   sampling: Optional[Sampling] = None, generator: "torch.Generator | SeededDraws | None" = None,
                   seed: int = 0, stopping: Sequence[Criterion] = ()) -> list[list[int]]:
    """New token ids per row of one batch: up to and including the row's first stop token, or up to where a
    stopping criterion ended it, else `max_new_tokens` of them.

    `sampling=None` is greedy. With sampling, tokens are drawn from `generator` (a `SeededDraws` continues one
    stream across batches), else from a fresh generator seeded with `seed` on the model's device.
    """
    if max_new_tokens < 1 or not batch:
        return [[] for _ in batch]
    check_model_dtype(model)
    device = model_device(model)
    ids, mask = left_pad(batch, pad_id, device=device)
    padded = any(len(p) < ids.shape[1] for p in batch)
    pos = position_ids(batch, device=device)
    procs = sampling.processors() if sampling is not None else None
    stop_t = torch.tensor(list(stops), dtype=torch.long, device=device)
    rows = len(batch)
    alive = [True] * rows
    lengths = [max_new_tokens] * rows
    unfinished = torch.ones(rows, dtype=torch.long, device=device)
    seq = ids
    kwargs: dict = {"input_ids": ids, "position_ids": pos, "use_cache": True, "logits_to_keep": 1,
                    "return_dict": True}
    if padded:
        kwargs["attention_mask"] = mask
    for step in range(max_new_tokens):
        out = model(**kwargs)
        # fp32 whatever the model computes in; on the inputs' device (a model split over GPUs ends on another)
        logits = out.logits[:, -1].to(device=device, dtype=torch.float32, copy=True)
        if procs is None:
            nxt = torch.argmax(logits, dim=-1)
        else:
            scores = procs(seq, logits)
            if not isinstance(generator, torch.Generator):
                generator = (generator or SeededDraws(seed)).on(device)
            probs = torch.nn.functional.softmax(scores, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        nxt = nxt * unfinished + pad_id * (1 - unfinished)  # finished rows are padded
        seq = torch.cat([seq, nxt[:, None]], dim=-1)
        done = torch.isin(nxt, stop_t)
        for crit in stopping:
            done = done | crit(seq, None).to(device)
        unfinished = unfinished & ~done
        now = unfinished.tolist()
        for r in range(rows):
            if alive[r] and not now[r]:
                alive[r], lengths[r] = False, step + 1
        if not any(alive) or step == max_new_tokens - 1:
            break
        cache_key = "cache" if "cache" in out else "past_key_values"
        kwargs = {"input_ids": nxt[:, None], "position_ids": pos[:, -1:] + 1, cache_key: out[cache_key],
                  "use_cache": True, "logits_to_keep": 1, "return_dict": True}
        pos = kwargs["position_ids"]
        if padded:
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=-1)
            kwargs["attention_mask"] = mask
    new = seq[:, ids.shape[1]:].tolist()
    return [row[:n] for row, n in zip(new, lengths)]


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, stops: Sequence[int], pad_id: int,
             batch_size: int = 16, sampling: Optional[Sampling] = None, seed: int = 0,
             stopping: Optional[Callable[[list[int]], Sequence[Criterion]]] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
    """New token ids for every prompt (input order), generated in length-sorted batches of `batch_size`.

    `stopping(indices)` may return stopping criteria for the batch of those prompt indices. Sampling uses one
    generator seeded with `seed` for the whole call, consumed batch after batch in plan order.
    """
    out: list[list[int]] = [[] for _ in prompts]
    gen = SeededDraws(seed)
    done = 0
    for idx in plan_batches(prompts, batch_size):
        crits = stopping(idx) if stopping is not None else ()
        rows = generate_batch(model, [prompts[i] for i in idx], max_new_tokens, stops=stops, pad_id=pad_id,
                              sampling=sampling, generator=gen, stopping=crits)
        for i, row in zip(idx, rows):
            out[i] = row
        done += len(idx)
        if progress:
            progress(done, len(prompts))
    return out


def strip_stop(row: Sequence[int], stops: Sequence[int]) -> list[int]:
    """A row's tokens before its first stop token."""
    cut = next((k for k, t in enumerate(row) if t in stops), len(row))
    return list(row[:cut])


def chat(model, tokenizer, messages, max_new_tokens: int = 64) -> str:
    """Greedy answer to one conversation, rendered with the family's chat template: the unbatched reference."""
    from gemtune.base.families import family_of
    from gemtune.base.templates import render_prompt

    fam = family_of(model)
    stops, pad = stop_and_pad_ids(tokenizer, fam)
    prompt = render_prompt(messages, tokenizer, fam)
    (row,) = generate_batch(model, [prompt.input_ids], max_new_tokens, stops=stops, pad_id=pad)
    return tokenizer.decode(strip_stop(row, stops), skip_special_tokens=True).strip()
