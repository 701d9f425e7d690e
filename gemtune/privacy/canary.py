"""Canary exposure (Carlini et al. 2019, "The Secret Sharer").

`gemtune data build --canaries N` appended "<prefix> <secret>" to N training answers and recorded the secrets outside
the dataset. For each canary we take the training text up to the secret as context, and rank the true secret among
R-1 random secrets of the same format by the model's log-likelihood of the secret given that context:

    exposure = log2 R - log2 rank        (rank 1 = the true secret is the most likely of all R)

An unmemorised secret ranks uniformly at random, so its expected exposure is about 1.4 bits and P(exposure >= t)
is about 2^-t; a memorised one ranks first and reaches log2 R. Because log2 R caps what R candidates can show, the
report also gives the paper's extrapolation: fit a distribution to the candidates' log-likelihoods and read off how
far into its tail the true secret lies (-log2 of the tail probability), which can exceed log2 R. That is what the
default gate uses, so a modest R (scoring costs R x secret tokens per canary and model) still separates a
memorised secret (tens of bits) from an unmemorised one (about 1.4 bits on average).

Scoring is exact and cheap: the context is run once and its KV cache repeated over a batch of candidates, so each
candidate costs only its own few tokens; the lm_head runs only on the positions that predict secret tokens.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from gemtune.base.families import Family
from gemtune.base.templates import render
from gemtune.data import canaries as canary_mod
from gemtune.errors import UserError


@dataclass
class CanaryTask:
    """One canary, tokenised: the shared context and every candidate's continuation (true secret first)."""

    index: int
    row_id: str
    prefix: list[int]  # token ids shared by every candidate's full text
    continuations: list[list[int]]  # [true secret, candidates...]


def format_pattern(fmt: str) -> re.Pattern:
    parts = []
    for c in fmt:
        parts.append(f"[{re.escape(canary_mod.ALPHABET[c])}]" if c in canary_mod.ALPHABET else re.escape(c))
    return re.compile("".join(parts))


def validate_document(doc: dict, path: Path, records_by_id: dict[str, dict]) -> list[dict]:
    """Every canary entry well-formed and present, verbatim, at the end of its training answer."""
    alphabet = doc.get("alphabet")
    if alphabet is not None and alphabet != canary_mod.ALPHABET:
        raise UserError("custom canary alphabets are not supported; rebuild with `gemtune data build --canaries N`",
                        file=str(path), field="alphabet")
    entries = doc["canaries"]
    if not entries:
        raise UserError("the canaries list is empty", file=str(path), field="canaries")
    for i, e in enumerate(entries):
        where = f"canaries[{i}]"
        if not isinstance(e, dict):
            raise UserError("expected an object", file=str(path), field=where)
        for key in ("secret", "row_id", "prefix", "text"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise UserError("missing or not a string", file=str(path), field=f"{where}.{key}")
        fmt = e.get("format") or doc.get("format")
        if not isinstance(fmt, str) or not fmt:
            raise UserError("no secret format (entry or document `format`)", file=str(path), field=f"{where}.format")
        if not format_pattern(fmt).fullmatch(e["secret"]):
            raise UserError(f"secret does not match its format {fmt!r}", file=str(path), field=f"{where}.secret")
        if e["text"] != f"{e['prefix']} {e['secret']}":
            raise UserError('expected text == "<prefix> <secret>"', file=str(path), field=f"{where}.text")
        rec = records_by_id.get(str(e["row_id"]))
        if rec is None:
            raise UserError(f"training row {e['row_id']!r} is not in train.jsonl: were the canaries planted in "
                            "another dataset?", file=str(path), field=f"{where}.row_id")
        turn = e.get("turn")
        msgs = rec["messages"]
        if not isinstance(turn, int) or not (0 <= turn < len(msgs)) or msgs[turn].get("role") != "assistant":
            raise UserError(f"turn {turn!r} is not an assistant turn of row {e['row_id']!r}", file=str(path),
                            field=f"{where}.turn")
        if not msgs[turn]["content"].rstrip().endswith(e["text"]):
            raise UserError(f"row {e['row_id']!r} does not end its answer with this canary: was the dataset rebuilt "
                            "without it?", file=str(path), field=f"{where}.text")
    return entries


def candidate_strings(entry: dict, fmt: str, count: int, seed: int, index: int, exclude: tuple[str, ...],
                      path: Path) -> list[str]:
    """`count` random secrets of the canary's format, none equal to a true secret; seeded per canary."""
    try:
        return canary_mod.candidates(fmt, count, seed=seed * 100_003 + index, exclude=exclude)
    except ValueError:
        raise UserError(f"the format {fmt!r} allows only {canary_mod.space_size(fmt)} secrets; lower --candidates "
                        f"(asked for {count + 1})", file=str(path), field="candidates") from None


def context_text(messages: list[dict], entry: dict, tokenizer, family: Family) -> str:
    """The training text up to (and including the space before) the secret, rendered as training rendered it."""
    turn = entry["turn"]
    r = render(messages[:turn + 1], tokenizer, family)
    span = r.char_spans[-1]
    where = r.text.rfind(entry["text"], span[0], span[1])
    if where < 0:  # validate_document checked the raw content; the template strips only the outside
        raise UserError(f"canary text not found in the rendered row {entry['row_id']!r}", field="canaries")
    return r.text[:where + len(entry["prefix"]) + 1]


def tokenize_task(index: int, entry: dict, context: str, strings: list[str], tokenizer) -> CanaryTask:
    """Tokenise context+candidate for every candidate (as training would) and split off the common prefix.

    BPE may merge the space before the secret into the secret's first token, so the split point is the longest
    common token prefix that ends before the secret, not the tokenisation of the context alone.
    """
    enc = tokenizer([context + s for s in strings], add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    secret_start = len(context)
    before = min(sum(1 for (s, e) in o if e <= secret_start) for o in offs)
    common = 0
    first = ids[0]
    while common < before and all(len(x) > common and x[common] == first[common] for x in ids):
        common += 1
    common = max(common, 1)  # <bos> at least: the first secret token is predicted from the prefix's last position
    return CanaryTask(index, str(entry["row_id"]), list(first[:common]), [list(x[common:]) for x in ids])


@torch.inference_mode()
def continuation_logprobs(model, prefix: list[int], conts: list[list[int]], *, max_positions: int = 256) -> list[float]:
    """log P(cont | prefix) for every continuation.

    The prefix runs once: its last position gives every continuation's first-token log-probability, and its KV
    cache, repeated over a batch, is the context for the remaining tokens. lm_head runs only on positions that
    predict a continuation token (`logits_to_keep`), at most `max_positions` of them per batch.
    """
    device = getattr(model, "device", torch.device("cpu"))
    out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    result = [float(first[c[0]]) if c else 0.0 for c in conts]
    order = sorted((i for i in range(len(conts)) if len(conts[i]) > 1), key=lambda i: len(conts[i]))
    i = 0
    while i < len(order):  # ascending lengths: a batch's last continuation is its longest
        j = i + 1
        while j < len(order) and (j + 1 - i) * (len(conts[order[j]]) - 1) <= max_positions:
            j += 1
        idx = order[i:j]
        width = len(conts[order[j - 1]])
        batch = torch.zeros((len(idx), width), dtype=torch.long)
        for r, k in enumerate(idx):
            batch[r, :len(conts[k])] = torch.tensor(conts[k])
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(len(idx))
        # right padding is harmless: causal attention never lets a later pad influence an earlier position
        logits = model(input_ids=batch.to(device), cache=c, use_cache=True,
                       logits_to_keep=torch.arange(width - 1, device=device)).logits.float()
        tgt = batch[:, 1:].to(device)
        picked = logits.gather(2, tgt[:, :, None]).squeeze(2) - torch.logsumexp(logits, dim=-1)
        for r, k in enumerate(idx):
            result[k] += float(picked[r, :len(conts[k]) - 1].sum())
        i = j
    return result


def exposure(rank: int, total: int) -> float:
    return math.log2(total) - math.log2(rank)


def extrapolated_exposure(true_lp: float, others: list[float]) -> Optional[float]:
    """-log2 P(a random secret is at least as likely as the true one), from a normal model of the candidates'
    log-likelihoods (a sum of per-token terms, so close to normal). The tail is the predictive Student t
    (n-1 degrees of freedom, scale s*sqrt(1+1/n)) rather than the plug-in normal, so with few candidates an
    unmemorised secret still exceeds t bits with probability 2^-t instead of more often."""
    import numpy as np
    from scipy.stats import t as student_t

    x = np.asarray(others, dtype=np.float64)
    n = len(x)
    if n < 3 or float(x.std()) == 0.0:
        return None
    z = (true_lp - float(x.mean())) / (float(x.std(ddof=1)) * math.sqrt(1.0 + 1.0 / n))
    return round(float(-student_t.logsf(z, df=n - 1) / math.log(2)), 4)


def rank_of(true_lp: float, others: list[float]) -> int:
    return 1 + sum(1 for v in others if v > true_lp)


def score_tasks(model, tasks: list[CanaryTask], *, progress: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    """Rank and exposure of every canary under `model`."""
    rows = []
    for n, t in enumerate(tasks, 1):
        lps = continuation_logprobs(model, t.prefix, t.continuations)
        true_lp, others = lps[0], lps[1:]
        r = rank_of(true_lp, others)
        total = len(lps)
        rows.append({"rank": r, "exposure": round(exposure(r, total), 4),
                     "exposure_extrapolated": extrapolated_exposure(true_lp, others),
                     "log_likelihood": round(true_lp, 4)})
        if progress:
            progress(n, len(tasks))
    return rows


def load_tasks(doc: dict, path: Path, records: list[dict], tokenizer, family: Family, *, candidates: int,
               seed: int) -> list[CanaryTask]:
    by_id = {str(r.get("id")): r for r in records}
    entries = validate_document(doc, path, by_id)
    secrets = tuple(e["secret"] for e in entries)
    tasks = []
    for i, e in enumerate(entries):
        fmt = e.get("format") or doc["format"]
        others = candidate_strings(e, fmt, candidates - 1, seed, i, secrets, path)
        ctx = context_text(by_id[str(e["row_id"])]["messages"], e, tokenizer, family)
        tasks.append(tokenize_task(i, e, ctx, [e["secret"]] + others, tokenizer))
    return tasks


def summarise(rows: list[dict]) -> dict:
    exp = [r["exposure"] for r in rows]
    ext = [r["exposure_extrapolated"] for r in rows if r["exposure_extrapolated"] is not None]
    return {"max_exposure": max(exp) if exp else None, "mean_exposure": round(sum(exp) / len(exp), 4) if exp else None,
            "max_exposure_extrapolated": max(ext) if ext else None, "rank1": sum(1 for r in rows if r["rank"] == 1)}


DEFINITION = ("exposure = log2 R - log2 rank of the true secret among R secrets of the same format (R-1 random), ranked "
              "by the model's log-likelihood of the secret given its training context (Carlini et al. 2019); "
              "extrapolated = -log2 of the tail probability of the true secret's log-likelihood under a normal model of the "
              "candidates' (Student t predictive tail).")
