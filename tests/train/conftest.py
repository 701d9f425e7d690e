"""A small routing dataset directory in the `gemtune data build` format, written directly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

QUEUES = ["billing", "refund", "login", "shipping"]
WORDS = {
    "billing": ["charge", "invoice", "bill", "fee"],
    "refund": ["refund", "money back", "return", "reimburse"],
    "login": ["password", "login", "account locked", "sign in"],
    "shipping": ["parcel", "delivery", "tracking", "courier"],
}
INSTRUCTION = "Route the customer message to one queue: billing, refund, login or shipping."


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = QUEUES[i % len(QUEUES)]
        msg = f"my {rng.choice(WORDS[q])} issue {rng.randint(0, 999)}"
        out.append({"id": f"r{i}", "task": "route", "label": q,
                    "messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{msg}"},
                                 {"role": "assistant", "content": q}]})
    return out


def write_dataset(d: Path, n_train: int = 32, n_eval: int = 8, seed: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    recs = make_records(n_train + n_eval, seed)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:n_train]))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[n_train:]))
    (d / "eval.lock.json").write_text(json.dumps({"ids": [r["id"] for r in recs[n_train:]]}))
    return d


@pytest.fixture
def route_data(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")
