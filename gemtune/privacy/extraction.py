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
counts as extracted when any of its probes does. Decoding stops as soon as a near reproduction is impossible (most
rows after a few tokens), so reported similarities of unextracted probes are those of the tokens generated.
Answers shorter than `min_answer_tokens` (labels, yes/no) are not probed: reproducing a label is the task, not a
leak. Every number is reported for the base too, because text the base reproduces unaided (boilerplate, famous
quotes) is predictable rather than memorised by fine-tuning.
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


def decode(tokenizer, ids: list[int], *, skip_special_tokens: bool = True) -> str:
    """Token ids to text. A tokenizer without a decoder has literal tokens (the tiny test tokenizer): join them,
    instead of the space-joined fallback that would hide a reproduced string from the PII scanner and the masks."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.decoder is None:
        return "".join(tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens))
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


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


def allowed_edits(length: int, near: float) -> int:
    """Most edits that still leave similarity >= near against a held-out text of `length` tokens."""
    return int((1.0 - near) * length + 1e-9)


class NearMissStop:
    """A transformers stopping criterion that ends a row once a near reproduction is ruled out.

    Keeps, per row, the Levenshtein DP row of the tokens generated so far against the held-out tokens. The minimum
    of a DP row never decreases as tokens are appended, so once it exceeds the allowed edits no continuation can be
    "nearly" the held-out text. A row also ends at a stop token and after len(held-out) tokens (only those are
    compared). Memorised rows run to the end; everything else stops after a few tokens, and a batch ends when its
    last row does. The tokens each row generated are recorded here: later positions of a stopped row are padding.
    """

    def __init__(self, targets: list[list[int]], near: float, stops: list[int]):
        self.targets = targets
        self.allowed = [allowed_edits(len(t), near) for t in targets]
        self.rows = [list(range(len(t) + 1)) for t in targets]
        self.generated: list[list[int]] = [[] for _ in targets]
        self.done = [len(t) == 0 for t in targets]
        self.stops = set(stops)

    def _step(self, r: int, tok: int) -> None:
        if tok in self.stops:
            self.done[r] = True
            return
        self.generated[r].append(tok)
        target, prev = self.targets[r], self.rows[r]
        cur = [prev[0] + 1]
        for j, want in enumerate(target, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (tok != want)))
        self.rows[r] = cur
        if min(cur) > self.allowed[r] or len(self.generated[r]) >= len(target):
            self.done[r] = True

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        last = input_ids[:, -1].tolist()
        for r, tok in enumerate(last):
            if not self.done[r]:
                self._step(r, tok)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def greedy_outputs(model, tokenizer, family: Family, probes: list[Probe], *, batch_size: int, near: float,
                   progress: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
    """Greedy continuations (token ids, stop token removed) of every probe, batched by context length, each row
    generated only as long as it could still reproduce its held-out text (see NearMissStop). Decoding is
    `gemtune.base.generate`'s, on the model's device."""
    from gemtune.base.generate import generate_batch, plan_batches, stop_and_pad_ids

    stops, pad = stop_and_pad_ids(tokenizer, family)
    out: list[list[int]] = [[] for _ in probes]
    done = 0
    for idx in plan_batches([p.context for p in probes], batch_size):
        targets = [probes[i].target for i in idx]
        crit = NearMissStop(targets, near, stops)
        generate_batch(model, [probes[i].context for i in idx], max(len(t) for t in targets), stops=stops,
                       pad_id=pad, stopping=[crit])
        for i, row in zip(idx, crit.generated):
            out[i] = row
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
            "extraction_rate": round(extracted / n, 6) if n else None}


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
