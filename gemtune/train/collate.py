"""Turn dataset records into training tensors: the family template, labels on assistant turns only (end-of-turn
included), left truncation of the prompt (never the answer), optional packing that keeps examples from attending
to each other (position ids restart per example; transformers builds a block-diagonal mask from them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemtune.base.families import Family
from gemtune.base.templates import render

IGNORE = -100


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_record(record: dict, tokenizer, family: Family, max_len: int) -> Example | None:
    """One record → Example; None when even the last answer cannot fit in max_len."""
    r = render(record["messages"], tokenizer, family, tools=record.get("tools") or None)
    ids = r.input_ids
    mask = r.assistant_mask()
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    if len(ids) > max_len:
        excess = len(ids) - max_len
        last_start = r.assistant_spans[-1][0] if r.assistant_spans else len(ids)
        keep_head = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        # drop prompt tokens right after <bos>; the final answer (and its header) must survive whole
        if keep_head + excess > last_start - 1:
            return None
        ids = ids[:keep_head] + ids[keep_head + excess:]
        labels = labels[:keep_head] + labels[keep_head + excess:]
    return Example(id=str(record.get("id", "")), input_ids=ids, labels=labels)


def encode_records(records, tokenizer, family: Family, max_len: int) -> tuple[list[Example], int]:
    out, skipped = [], 0
    for rec in records:
        ex = encode_record(rec, tokenizer, family, max_len)
        if ex is None or ex.n_supervised == 0:
            skipped += 1
        else:
            out.append(ex)
    return out, skipped


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. Causal attention never looks right, so real tokens never see the padding and no
    attention mask is needed (SDPA keeps its fast causal path)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
    pos = torch.arange(T).unsqueeze(0).expand(len(examples), T).contiguous()
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def pack(examples: list[Example], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Pack into as few rows of at most max_len tokens as fit, balanced so the rows are about equally long (the
    batch is padded to its longest row); positions restart per example."""
    order = sorted(examples, key=lambda e: -len(e.input_ids))
    total = sum(len(e.input_ids) for e in examples)
    k = max(1, -(-total // max_len))
    while True:  # longest-first onto the currently shortest row; one more row whenever something does not fit
        rows: list[list[Example]] = [[] for _ in range(k)]
        lens = [0] * k
        for e in order:
            i = min(range(k), key=lens.__getitem__)
            if lens[i] + len(e.input_ids) > max_len:
                break
            rows[i].append(e)
            lens[i] += len(e.input_ids)
        else:
            break
        k += 1
    rows = [r for r in rows if r]
    lens = [n for n in lens if n]
    T = max(lens)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        off = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, off:off + n] = torch.tensor(e.input_ids)
            labels[r, off:off + n] = torch.tensor(e.labels)
            pos[r, off:off + n] = torch.arange(n)
            off += n
        pos[r, off:] = torch.arange(T - off)  # padding forms its own (unsupervised) sequence
    return {"input_ids": ids, "labels": labels, "position_ids": pos}
