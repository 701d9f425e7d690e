"""Privacy fixtures: a tiny dataset with a canary and an e-mail address each repeated many times, an adapter trained
by gemtune's trainer until it has memorised both, and a fresh adapter (LoRA B = 0: exactly the base)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

QUEUES = ["bill", "refund", "login", "ship"]
EMAIL = "dana.whitfield@example.org"
COPIES = 12


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run far faster on one thread when the CPU is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Memorised:
    base: Path
    data: Path
    canaries: Path
    adapter: Path
    secret: str
    raw: Path
    email: str = EMAIL


def routing_rows(n: int = 16) -> list[dict]:
    return [{"id": f"r{i}", "task": "route", "label": QUEUES[i % 4],
             "messages": [{"role": "user", "content": f"Route ticket {i}: my {QUEUES[i % 4]} issue"},
                          {"role": "assistant", "content": QUEUES[i % 4]}]} for i in range(n)]


def write_dataset(root: Path, *, copies: int = COPIES) -> tuple[Path, Path, str, Path]:
    """A dataset dir whose train.jsonl holds one canary row and one e-mail row `copies` times each, plus short routing
    rows; the canaries file in the format `data build --canaries` writes; a raw input file that dataset.json lists
    by a relative path (as `data build` records what it was given)."""
    from gemtune.data import canaries as cm

    rows = routing_rows()
    entries = cm.plant(rows, [0], 1, seed=3)
    canary_row = rows[0]
    for k in range(1, copies):
        rows.append({**json.loads(json.dumps(canary_row)), "id": f"r0-copy{k}"})
    for k in range(copies):
        rows.append({"id": f"e{k}", "task": "route", "label": "refund", "messages": [
            {"role": "user", "content": "Who handles refunds?"},
            {"role": "assistant", "content": f"refund\nplease write to {EMAIL}"}]})
    data = root / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in routing_rows(20)[16:]))
    raw = root / "raw.jsonl"
    raw.write_text(json.dumps({"input": "Who handles refunds?", "output": f"refund, please write to {EMAIL}"}) + "\n")
    (data / "dataset.json").write_text(json.dumps({"version": 1, "inputs": [{"file": "raw.jsonl", "rows": 1}]}))
    canaries = root / "data.canaries.json"
    canaries.write_text(json.dumps(cm.canary_document(entries, data)))
    return data, canaries, entries[0]["secret"], raw


@pytest.fixture(scope="session")
def memorised(tiny_gemma3, tmp_path_factory) -> Memorised:
    """Trained with a high learning rate for 60 steps: the tiny model reproduces the canary row and the e-mail."""
    from gemtune.train.config import TrainConfig
    from gemtune.train.trainer import train

    root = tmp_path_factory.mktemp("memorised")
    data, canaries, secret, raw = write_dataset(root)
    cfg = TrainConfig(base=str(tiny_gemma3), batch_size=8, lr=1e-2, seed=1, warmup_ratio=0.0, scheduler="constant",
                      max_steps=60)
    res = train(data, root / "run", cfg, progress=False)
    return Memorised(tiny_gemma3, data, canaries, res.adapter_dir, secret, raw)


def zero_adapter(base: Path, out: Path, data: Path | None = None) -> Path:
    """A PEFT LoRA adapter as PEFT initialises it (B = 0): its outputs are exactly the base's."""
    from peft import LoraConfig, get_peft_model

    from gemtune.base.families import family_of, target_modules
    from gemtune.base.loader import load_base

    model, _ = load_base(base)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules(family_of(model))))
    pm.save_pretrained(out)
    side = {"base_model": str(base)}
    if data is not None:
        side["dataset"] = {"dir": str(data)}
    (out / "gemtune.json").write_text(json.dumps(side))
    return out


@pytest.fixture(scope="session")
def fresh(memorised, tmp_path_factory) -> Path:
    """An untrained adapter for the same base and dataset as `memorised`."""
    return zero_adapter(memorised.base, tmp_path_factory.mktemp("fresh") / "adapter", memorised.data)


@pytest.fixture(scope="session")
def make_zero_adapter():
    return zero_adapter


@pytest.fixture(scope="session")
def dataset_writer():
    return write_dataset


@pytest.fixture
def cli():
    """`gemtune …` in-process through the real entry point; returns the exit code."""
    from gemtune.cli import main

    def run(argv: list[str]) -> int:
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    return run
