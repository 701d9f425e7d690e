"""PII regurgitation: sample from the model on training-style prompts and scan what it writes for PII.

Greedy decoding shows the single most likely answer; leaks often sit a little further down the distribution, so this
probe samples (seeded temperature + top-k) from the prompts of a seeded sample of training rows and scans every
generation with the data stage's detector (`gemtune.data.pii`), the same one that redacted the training set.

Two counts come out. *Hits*: every PII value of any type, mostly invented (a 270M model writes plausible phone
numbers), so the base's count on the same prompts is the reference. *Leaks*: hits whose value also occurs in the
raw input files the dataset was built from (found through dataset.json) or in train.jsonl itself (what redaction
missed) — a value the model can only know from the data. Values are compared normalised (digits only for numbers,
lower case for e-mail addresses) and never written to the report in full.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from gemtune.base.families import Family
from gemtune.base.templates import render_prompt
from gemtune.privacy.extraction import decode, last_answer

NUMERIC = ("PHONE", "SSN", "CREDIT_CARD")


def normalise(kind: str, value: str) -> str:
    if kind in NUMERIC:
        return re.sub(r"\D", "", value)
    if kind == "IBAN":
        return re.sub(r"\s", "", value).upper()
    return value.strip().lower()


def mask(value: str) -> str:
    """Enough of a value to recognise it in the raw data by eye, not enough to reuse it."""
    return value[:2] + "…" + value[-2:] if len(value) > 6 else "…"


def training_prompts(records: list[dict], n: int, seed: int, tokenizer, family: Family) -> tuple[list[str], list[list[int]]]:
    """Prompt ids of `n` seeded training rows (cycling when the set is smaller): the conversation before the last
    answer, rendered with the generation header exactly as serving renders it."""
    usable = [r for r in records if last_answer(r.get("messages") or []) not in (None, 0)]
    if not usable or n <= 0:
        return [], []
    rng = random.Random(f"pii:{seed}")
    order = rng.sample(range(len(usable)), len(usable))
    ids, prompts = [], []
    for k in range(n):
        rec = usable[order[k % len(order)]]
        turn = last_answer(rec["messages"])
        ids.append(str(rec.get("id", "")))
        prompts.append(render_prompt(rec["messages"][:turn], tokenizer, family).input_ids)
    return ids, prompts


def sample_outputs(model, tokenizer, family: Family, prompts: list[list[int]], *, max_new_tokens: int,
                   temperature: float, top_k: Optional[int], seed: int, batch_size: int,
                   progress: Optional[Callable[[int, int], None]] = None) -> list[str]:
    """Seeded sampling (`gemtune.base.generate`, on the model's device, from a generator of its own: the global
    RNG is left alone), batched by prompt length; the same prompts, seed and batch plan give the same texts."""
    from gemtune.base.generate import Sampling, generate, stop_and_pad_ids, strip_stop

    stops, pad = stop_and_pad_ids(tokenizer, family)
    rows = generate(model, prompts, max_new_tokens, stops=stops, pad_id=pad, batch_size=batch_size,
                    sampling=Sampling(temperature=temperature, top_k=top_k or None), seed=seed, progress=progress)
    return [decode(tokenizer, strip_stop(row, stops)).strip() for row in rows]


@dataclass
class KnownValues:
    """Normalised PII values the model could only have learned from the data, and where they were looked for."""

    values: dict[str, set] = field(default_factory=dict)  # type -> normalised values
    sources: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def add_text(self, text: str, find) -> None:
        for kind, _, _, value in find(text):
            self.values.setdefault(kind, set()).add(normalise(kind, value))

    def __contains__(self, hit: tuple[str, str]) -> bool:
        kind, value = hit
        return normalise(kind, value) in self.values.get(kind, ())

    def count(self) -> int:
        return sum(len(v) for v in self.values.values())


def known_values(records: list[dict], meta: dict, data_dir: Path, find) -> KnownValues:
    """PII in the raw inputs listed by dataset.json (paths as recorded, else beside the dataset) and in train.jsonl."""
    from gemtune.data.readers import read_rows
    from gemtune.errors import UserError

    kv = KnownValues()
    for inp in meta.get("inputs") or []:
        name = inp.get("file") if isinstance(inp, dict) else None
        if not name:
            continue
        p = Path(name)
        cands = [p] if p.is_absolute() else [p, data_dir.parent / p, data_dir.parent / p.name]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            kv.missing.append(name)
            continue
        try:
            for row in read_rows(found):
                kv.add_text(row.raw, find)
        except UserError:
            kv.missing.append(name)
            continue
        kv.sources.append(str(found))
    for r in records:
        for m in r.get("messages") or []:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                kv.add_text(m["content"], find)
    kv.sources.append("train.jsonl")
    return kv


def scan(outputs: list[str], ids: list[str], known: KnownValues, find, redact, *, limit: int = 10) -> dict:
    """Typed hit and leak counts over the generations, plus a few redacted examples of each."""
    by_type: dict[str, int] = {}
    leaks_by_type: dict[str, int] = {}
    examples, leaks = [], []
    for i, text in enumerate(outputs):
        found = find(text)
        for kind, _, _, value in found:
            by_type[kind] = by_type.get(kind, 0) + 1
            leaked = (kind, value) in known
            if leaked:
                leaks_by_type[kind] = leaks_by_type.get(kind, 0) + 1
            row = {"sample": i, "prompt_id": ids[i], "type": kind, "value": mask(value), "leak": leaked,
                   "output_redacted": redact(text)[0][:300]}
            (leaks if leaked else examples).append(row)
    return {"samples": len(outputs), "samples_with_pii": sum(1 for t in outputs if find(t)),
            "hits": sum(by_type.values()), "hits_by_type": by_type,
            "leaks": sum(leaks_by_type.values()), "leaks_by_type": leaks_by_type,
            "examples": (leaks + examples)[:limit]}


def secrets_in(outputs: list[str], secrets: list[str]) -> int:
    """Generations containing any canary secret verbatim."""
    return sum(1 for t in outputs if any(s in t for s in secrets))
