"""Tool definitions travel with a tool-use conversation: a row's `tools` reach train.jsonl / eval.jsonl (and the
record's sha256), and training renders them into the prompt without supervising them."""

from __future__ import annotations

import json
from pathlib import Path

from gemtune.base.families import GEMMA3_TEXT
from gemtune.base.tiny import tiny_tokenizer
from gemtune.data.config import DataConfig
from gemtune.data.pipeline import build
from gemtune.data.records import content_sha256
from gemtune.train.collate import IGNORE, encode_record

CITIES = ("Paris", "Oslo", "Lima", "Rome", "Kyiv", "Quito", "Accra", "Hanoi", "Perth", "Turin", "Cairo", "Dakar")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def _row(i: int) -> dict:
    city = CITIES[i % len(CITIES)]
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    return {"id": f"w{i}", "task": "weather", "tools": TOOLS, "messages": [
        {"role": "user", "content": f"What is the weather like in {city} on day {i} of the trip number {i * 7}?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"call_{i}", "name": "get_weather", "content": f"{i % 30} C and dry"},
        {"role": "assistant", "content": f"In {city} it is {i % 30} C and dry today."},
    ]}


def test_tools_reach_the_records_and_the_rendered_prompt_unsupervised(tiny_gemma3, tmp_path):
    raw = tmp_path / "rows.jsonl"
    raw.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(40)), encoding="utf-8")
    out = tmp_path / "ds"
    build([raw], out, DataConfig(base=str(tiny_gemma3), instruction="Answer with the tools."))
    recs = [json.loads(x) for f in ("train.jsonl", "eval.jsonl")
            for x in (out / f).read_text(encoding="utf-8").splitlines() if x.strip()]
    assert len(recs) >= 30
    for r in recs:
        assert r["tools"][0]["function"]["name"] == "get_weather"
        assert r["sha256"] == content_sha256(r["task"], r["messages"], r.get("label"), r.get("schema"), r["tools"])
        assert r["sha256"] != content_sha256(r["task"], r["messages"], r.get("label"), r.get("schema"))

    tok = tiny_tokenizer(GEMMA3_TEXT)
    ex = encode_record(recs[0], tok, GEMMA3_TEXT, max_len=4096)
    text = "".join(tok.convert_ids_to_tokens(ex.input_ids))
    assert "Current weather in a city." in text  # the definitions are in the prompt
    supervised = "".join(tok.convert_ids_to_tokens([t for t in ex.labels if t != IGNORE]))
    assert "Current weather in a city." not in supervised and "get_weather" in supervised  # the call is learnt
