"""Tool-use conversations train: labels on the assistant's calls and answers only (token by token, both families),
and a real training step on a tiny model gives a finite loss over exactly those tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gemtune.base.families import GEMMA3_TEXT, GEMMA4_TEXT
from gemtune.base.templates import format_tool_calls
from gemtune.base.tiny import tiny_tokenizer
from gemtune.train.collate import IGNORE, encode_record, encode_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = [("gemma3", GEMMA3_TEXT), ("gemma4", GEMMA4_TEXT)]


def record(i: int) -> dict:
    city = ["Paris", "Oslo", "Lima", "Rome"][i % 4]
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    return {"id": f"t{i}", "task": "weather", "messages": [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"call_{i}", "name": "get_weather", "content": f"{10 + i} C, dry"},
        {"role": "assistant", "content": f"{city}: {10 + i} C."},
    ]}


def expected_runs(rec: dict, family: str) -> list[str]:
    calls = format_tool_calls(rec["messages"][2]["tool_calls"], family)
    answer = rec["messages"][4]["content"]
    if family == "gemma3":
        return [calls + "<end_of_turn>", answer + "<end_of_turn>"]
    return [calls + "<|tool_response>", answer + "<turn|>"]


def label_runs(tok, labels: list[int]) -> list[str]:
    runs, cur = [], []
    for t in labels + [IGNORE]:
        if t != IGNORE:
            cur.append(t)
        elif cur:
            runs.append("".join(tok.convert_ids_to_tokens(cur)))
            cur = []
    return runs


@pytest.mark.parametrize("family,fam", FAMILIES)
def test_labels_are_the_calls_and_answers_only(family, fam):
    tok = tiny_tokenizer(family)
    rec = record(1)
    ex = encode_record(rec, tok, fam, max_len=2048)
    assert label_runs(tok, ex.labels) == expected_runs(rec, family)
    assert all(l == i for l, i in zip(ex.labels, ex.input_ids) if l != IGNORE)
    text = "".join(tok.convert_ids_to_tokens(ex.input_ids))
    # what is never labelled really is in the example: the tool result, the user turn, the system text
    for unlabelled in ("11 C, dry", "Weather in Oslo?", "Use the tools."):
        assert unlabelled in text and all(unlabelled not in r for r in label_runs(tok, ex.labels))


def write_tool_dataset(d: Path, n_train: int = 8, n_eval: int = 2) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    recs = [record(i) for i in range(n_train + n_eval)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:n_train]))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[n_train:]))
    (d / "eval.lock.json").write_text(json.dumps({"ids": [r["id"] for r in recs[n_train:]]}))
    return d


@pytest.mark.parametrize("family,fam", FAMILIES)
def test_a_tool_use_conversation_trains(family, fam, request, tmp_path):
    from gemtune.train.config import TrainConfig
    from gemtune.train.trainer import train

    base = request.getfixturevalue(f"tiny_{family}")
    data = write_tool_dataset(tmp_path / "data")
    recs = [json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()]
    tok = tiny_tokenizer(family)
    exs, skipped = encode_records(recs, tok, fam, 1024)
    assert skipped == 0
    for rec, ex in zip(recs, exs):  # what the trainer will supervise: the calls and answers, nothing else
        assert label_runs(tok, ex.labels) == expected_runs(rec, family)
    cfg = TrainConfig(base=str(base), batch_size=4, lr=1e-3, seed=7, max_len=1024)
    result = train(data, tmp_path / "run", cfg, stop_after=2, progress=False)
    assert result.steps == 2 and len(result.losses) == 2
    assert all(math.isfinite(x) and x > 0 for x in result.losses)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
