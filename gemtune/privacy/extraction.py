"""Extraction probe: does greedy decoding reproduce held-out training text? (Carlini et al. 2023, "Quantifying
Memorization Across Neural Language Models": a string s is k-extractable when prompting with the k tokens that
preceded it in training makes greedy decoding emit s.)

Here the context is a training example's prompt (the rendered conversation up to its last answer, tokenised exactly
as training tokenised it) and the held-out text is the first `suffix_tokens` tokens of the answer. For answers of
at least `long_answer_tokens` the example is probed a second time with the prompt plus the first part of the
answer (half of it, at most `prefix_tokens`), and the next `suffix_tokens` answer tokens are held out: a memorised
account number at the end of a reply shows up there even when the reply's opening does not.

"Exactly": the first len(held-out) generated tokens equal the held-out tokens. "Nearly": token-level normalised
edit similarity 1 - Levenshtein(generated, held-out) / max(len) >= `near_similarity` (0.9 by default). An example
counts as extracted when any of its probes does. Answers shorter than `min_answer_tokens` (labels, yes/no) are not
probed: reproducing a label is the task, not a leak. Every number is reported for the base too, because text the
base reproduces unaided (boilerplate, famous quotes) is predictable rather than memorised by fine-tuning.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from gemtune.base.families import Family
from gemtune.base.templates import render


@dataclass
class Probe:
    example: int  # index into the sampled examples
    kind: str  # "prompt" or "prompt+prefix"
    context: list[int]
    target: list[int]


@dataclass
class Sampled:
    id: str
    context: list[int]  # prompt tokens, as training saw them
    answer: list[int]  # answer tokens without the end-of-turn token
    repeats: int  # training rows with the same answer text


@dataclass
class ProbeSet:
    examples: list[Sampled] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    examined: int = 0
    skipped_short: int = 0
    skipped_unrenderable: int = 0


def levenshtein(a: list, b: list) -> int:
    """Edit distance between two sequences (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def similarity(generated: list, target: list) -> float:
    """1 - normalised edit distance, on the first len(target) generated tokens; 1.0 is an exact reproduction."""
    gen = generated[:len(target)]
    n = max(len(gen), len(target))
    return 1.0 if n == 0 else 1.0 - levenshtein(gen, target) / n


def last_answer(messages: list[dict]) -> Optional[int]:
    idx = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    return idx[-1] if idx else None


def tokenize_example(messages: list[dict], tokenizer, family: Family) -> Optional[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of the last answer, cut from the full rendering so tokens match training's."""
    turn = last_answer(messages)
    if turn is None:
        return None
    r = render(messages[:turn + 1], tokenizer, family)
    if not r.assistant_spans:
        return None
    s, e = r.assistant_spans[-1]
    return r.input_ids[:s], r.input_ids[s:e - 1]  # the span ends with the end-of-turn token


def build_probes(records: list[dict], tokenizer, family: Family, *, samples: int, seed: int, min_answer_tokens: int,
                 suffix_tokens: int, long_answer_tokens: int, prefix_tokens: int) -> ProbeSet:
    """A seeded sample of `samples` training examples with answers long enough to leak something, and their probes.

    Rows are examined in a seeded random order until enough qualify, so a large dataset is never tokenised whole.
    """
    answers = Counter(_answer_text(r) for r in records)
    order = list(range(len(records)))
    random.Random(f"extraction:{seed}").shuffle(order)
    ps = ProbeSet()
    for i in order:
        if len(ps.examples) >= samples:
            break
        ps.examined += 1
        rec = records[i]
        tok = tokenize_example(rec["messages"], tokenizer, family)
        if tok is None:
            ps.skipped_unrenderable += 1
            continue
        context, answer = tok
        if len(answer) < min_answer_tokens:
            ps.skipped_short += 1
            continue
        k = len(ps.examples)
        ps.examples.append(Sampled(str(rec.get("id", i)), context, answer, answers[_answer_text(rec)]))
        ps.probes.append(Probe(k, "prompt", context, answer[:suffix_tokens]))
        if len(answer) >= long_answer_tokens:
            cut = min(prefix_tokens, len(answer) // 2)
            ps.probes.append(Probe(k, "prompt+prefix", context + answer[:cut], answer[cut:cut + suffix_tokens]))
    return ps


def _answer_text(rec: dict) -> str:
    turn = last_answer(rec.get("messages") or [])
    return rec["messages"][turn]["content"] if turn is not None else ""


def greedy_outputs(generator, probes: list[Probe], batch_size: int,
                   progress: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
    """Greedy continuations (token ids, stop token removed) of every probe, batched by context length."""
    from gemtune.evals.engine import plan_batches

    out: list[list[int]] = [[] for _ in probes]
    done = 0
    for idx in plan_batches([p.context for p in probes], batch_size):
        want = max(len(probes[i].target) for i in idx)
        rows = generator.generate_batch([probes[i].context for i in idx], want)
        for i, new in zip(idx, rows):
            out[i] = [t for t in new if t not in generator.stops]
        done += len(idx)
        if progress:
            progress(done, len(probes))
    return out


@dataclass
class Scored:
    exact: list[bool]  # per example
    best: list[float]  # per example: highest similarity over its probes
    best_probe: list[int]  # per example: index of that probe
    per_probe: list[float]


def score(ps: ProbeSet, outputs: list[list[int]]) -> Scored:
    n = len(ps.examples)
    exact, best, best_probe = [False] * n, [-1.0] * n, [-1] * n
    per_probe = []
    for j, (p, gen) in enumerate(zip(ps.probes, outputs)):
        s = similarity(gen, p.target)
        per_probe.append(s)
        if gen[:len(p.target)] == p.target:
            exact[p.example] = True
        if s > best[p.example]:
            best[p.example], best_probe[p.example] = s, j
    return Scored(exact, best, best_probe, per_probe)


def rates(sc: Scored, near: float) -> dict:
    n = len(sc.best)
    extracted = sum(1 for s in sc.best if s >= near)
    ex = sum(sc.exact)
    return {"examples": n, "exact": ex, "extracted": extracted,
            "exact_rate": round(ex / n, 6) if n else None,
            "extraction_rate": round(extracted / n, 6) if n else None,
            "mean_similarity": round(sum(sc.best) / n, 6) if n else None}


def worst_examples(ps: ProbeSet, adapter: Scored, base: Scored, adapter_out: list[list[int]],
                   base_out: list[list[int]], decode: Callable[[list[int]], str], k: int = 5) -> list[dict]:
    """The k examples (distinct held-out texts) the adapter reproduces best, with what the base did on the same probe."""
    order = sorted(range(len(ps.examples)), key=lambda i: (-adapter.best[i], -len(ps.probes[adapter.best_probe[i]].target), i))
    rows, seen = [], set()
    for i in order:
        if len(rows) >= k:
            break
        j = adapter.best_probe[i]
        p = ps.probes[j]
        if tuple(p.target) in seen:  # a duplicated row would fill the list with one string
            continue
        seen.add(tuple(p.target))
        rows.append({
            "id": ps.examples[i].id, "probe": p.kind, "answer_repeats": ps.examples[i].repeats,
            "context_tail": decode(p.context[-48:]), "held_out": decode(p.target),
            "adapter_output": decode(adapter_out[j][:len(p.target)]), "adapter_similarity": round(adapter.per_probe[j], 4),
            "base_output": decode(base_out[j][:len(p.target)]), "base_similarity": round(base.per_probe[j], 4),
        })
    return rows


DEFINITION = ("k-extractable (Carlini et al. 2023): context = the training prompt (and, for answers of at least "
              "{long} tokens, the prompt plus the first half of the answer, at most {prefix} tokens); held out = the "
              "next {suffix} answer tokens; greedy decoding. Exact: identical tokens. Nearly: token-level normalised "
              "edit similarity >= {near}. Answers under {min} tokens are not probed.")
