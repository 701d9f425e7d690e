"""`gemtune merge`: merged safetensors model whose greedy outputs equal the unmerged adapter's (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from gemtune.errors import UserError
from gemtune.registry.synthetic import make_random_adapter
from gemtune.serve.merge import merge_adapter


@pytest.fixture(scope="module")
def adapter(tiny_gemma3, tmp_path_factory):
    return make_random_adapter(tiny_gemma3, tmp_path_factory.mktemp("merge") / "a", seed=5, scale=3.0)


def _greedy(model, ids, n=12):
    x = torch.tensor([ids])
    with torch.inference_mode():
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return y[0, len(ids):].tolist()


def test_merge_parity_and_merged_model_is_plain_safetensors(tiny_gemma3, adapter, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    report = merge_adapter(adapter, out, base=str(tiny_gemma3), max_new_tokens=12)
    assert report["parity"] is True and report["saved"] is True
    assert all(r["equal"] for r in report["prompts"]) and len(report["prompts"]) == 4
    assert report["max_abs_logit_diff"] < 1e-3
    keys = []
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            keys += list(st.keys())
    assert keys and not any("lora" in k for k in keys)
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "gemtune-merge.json").read_text())["parity"] is True
    # independent check: reload both from disk and compare greedy outputs on a fresh prompt
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = [2, 105] + [300 + ord(c) for c in "user\nwhat is up?"] + [106, 300 + 10, 105]
    assert _greedy(merged, ids) == _greedy(peft, ids)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3), dtype=torch.float32).eval()
    assert _greedy(plain, ids) != _greedy(merged, ids)  # the adapter really changed the model


def test_merge_cli_prints_parity_and_custom_prompts(tiny_gemma3, adapter, tmp_path, capsys):
    from gemtune.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "abc"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "x"},
                                                {"role": "assistant", "content": "y"}]}) + "\n")
    main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--base", str(tiny_gemma3),
          "--prompts", str(prompts), "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert "parity: holds" in out and str(tmp_path / "m") in out


def test_merge_refuses_bad_inputs(tiny_gemma3, tmp_path):
    with pytest.raises(UserError, match="not a PEFT adapter"):
        (tmp_path / "empty").mkdir()
        merge_adapter(tmp_path / "empty", tmp_path / "o", base=str(tiny_gemma3))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    from gemtune.serve.merge import load_prompts

    with pytest.raises(UserError, match="bad.jsonl:1"):
        load_prompts(bad)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_merge_parity_on_real_gemma3_270m(real_base, tmp_path):
    """fp32 greedy parity on the real model (tied embeddings, 262k vocab); the merged dir is plain safetensors."""
    from safetensors import safe_open

    adapter = make_random_adapter(real_base, tmp_path / "a", seed=3, r=16, scale=0.5)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "My card payment was declined."}) + "\n")
    report = merge_adapter(adapter, tmp_path / "merged", prompts=prompts, max_new_tokens=10)
    assert report["parity"] is True and report["base"] == str(real_base)
    assert report["max_abs_logit_diff"] < 1e-2 and report["prompts"][0]["tokens"] > 0
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text"
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as st:
        keys = list(st.keys())
    assert any(k.endswith("q_proj.weight") for k in keys) and not any("lora" in k for k in keys)


def test_merge_out_refuses_a_foreign_directory_and_an_adapter_inside_it(tiny_gemma3, adapter, tmp_path, capsys):
    """Checked before any model is loaded; nothing in the refused directory is touched (issue #12)."""
    from gemtune.cli import main

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["merge", "--adapter", str(adapter), "--out", str(foreign), "--base", str(tiny_gemma3)])
    assert e.value.code == 2
    assert f'{foreign}: field "--out": is not empty and was not written by gemtune' in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match=f"input {adapter} lies inside the output directory"):
        merge_adapter(adapter, adapter.parent, base=str(tiny_gemma3), overwrite=True)
    assert (adapter / "adapter_model.safetensors").is_file()


def test_merge_replaces_its_own_output_and_overwrite_replaces_a_foreign_one(tiny_gemma3, adapter, tmp_path):
    from gemtune.utils import OUTPUT_MARKER

    out = tmp_path / "m"
    merge_adapter(adapter, out, base=str(tiny_gemma3), max_new_tokens=2)
    assert json.loads((out / OUTPUT_MARKER).read_text())["writer"] == "gemtune merge"
    (out / "stale.bin").write_text("old")
    merge_adapter(adapter, out, base=str(tiny_gemma3), max_new_tokens=2)  # its own output: replaced whole
    assert not (out / "stale.bin").exists()
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    merge_adapter(adapter, foreign, base=str(tiny_gemma3), max_new_tokens=2, overwrite=True)
    assert not (foreign / "x").exists() and (foreign / "gemtune-merge.json").is_file()


# ------------------------------------------------------------------------------- base dtype, shards (issue #14)
@pytest.fixture(scope="module")
def bf16_base(tiny_gemma3, tmp_path_factory):
    """The tiny base stored in bfloat16, as real Gemma checkpoints are."""
    from transformers import AutoModelForCausalLM

    from gemtune.base.tiny import tiny_tokenizer

    d = tmp_path_factory.mktemp("bf16-base")
    AutoModelForCausalLM.from_pretrained(str(tiny_gemma3), dtype=torch.float32).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer("gemma3").save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    return d


PROMPTS = ["what is up?", "my card was declined", "hello there", "12 times 7"]


def _ids(text: str) -> list[int]:
    return [2, 105] + [300 + ord(c) for c in "user\n" + text] + [106, 300 + 10, 105]


def test_bf16_base_merges_in_bf16_into_shards_that_match_peft(bf16_base, adapter, tmp_path):
    """dtype auto = the base's own (bf16); sharded safetensors with tokenizer and chat template; the reloaded merged
    model gives PEFT's greedy outputs in bf16 (a divergence only at a near-tie, as the merge's own check allows)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemtune.serve.merge import BF16_TIE, _near_tie

    out = tmp_path / "m16"
    report = merge_adapter(adapter, out, base=str(bf16_base), max_new_tokens=12, device="cpu",
                           max_shard_size="100KB")
    assert report["parity"] is True and (report["dtype"], report["device"]) == ("bfloat16", "cpu")
    side = json.loads((out / "gemtune-merge.json").read_text())
    assert (side["dtype"], side["device"], side["placement"]["dtype"]) == ("bfloat16", "cpu", "bfloat16")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and side["files"] == [p.name for p in shards]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for f in shards:
        with safe_open(str(f), framework="pt") as st:
            assert all(st.get_tensor(k).dtype == torch.bfloat16 and "lora" not in k for k in st.keys())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    base16 = AutoModelForCausalLM.from_pretrained(str(bf16_base), dtype=torch.bfloat16)
    peft = PeftModel.from_pretrained(base16, str(adapter)).eval()
    equal = 0
    for text in PROMPTS:
        ids = _ids(text)
        want, got = _greedy(peft, ids), _greedy(merged, ids)
        if want == got:
            equal += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        with torch.inference_mode():
            ref = peft(input_ids=torch.tensor([ids + want])).logits[0, len(ids) + k - 1].float()
        assert _near_tie(ref, want[k], got[k], BF16_TIE)[0], (text, k)
    assert equal >= 3
    plain = AutoModelForCausalLM.from_pretrained(str(bf16_base), dtype=torch.bfloat16).eval()
    assert sum(_greedy(plain, _ids(t)) != _greedy(merged, _ids(t)) for t in PROMPTS) >= 3  # the adapter is in


def test_bf16_parity_check_refuses_a_merge_that_lost_the_adapter(bf16_base, adapter):
    """The near-tie allowance does not let a wrong merge through: the plain base in place of the merged model
    parts from the adapter where it was confident, and the check says no."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gemtune.base.tiny import tiny_tokenizer
    from gemtune.serve.merge import BF16_TIE, _logits, parity_rows

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(bf16_base), dtype=torch.bfloat16),
                                     str(adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(bf16_base), dtype=torch.bfloat16).eval()
    ids_list = [_ids(t) for t in PROMPTS]
    before = [_greedy(peft, ids) for ids in ids_list]
    after = [_greedy(plain, ids) for ids in ids_list]
    unmerged = [_logits(peft, ids + a) for ids, a in zip(ids_list, before)]
    convs = [[{"role": "user", "content": t}] for t in PROMPTS]
    rows, diff = parity_rows(unmerged, plain, convs, ids_list, before, after, tiny_tokenizer("gemma3"), BF16_TIE)
    assert not all(r["passed"] for r in rows) and diff > 0
    same, _ = parity_rows(unmerged, peft, convs, ids_list, before, before, tiny_tokenizer("gemma3"), BF16_TIE)
    assert all(r["passed"] and r["equal"] for r in same)


def test_merged_chat_template_renders_as_gemtune_does():
    """The template written beside a merged model gives exactly gemtune's own rendering (both families)."""
    from gemtune.base.families import family_for
    from gemtune.base.templates import render_text
    from gemtune.base.tiny import tiny_tokenizer
    from gemtune.serve.chat_template import ensure_chat_template

    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {
                 "city": "Paris", "days": 2, "ratio": 1.5, "opts": {"Unit": "C", "flags": [1, True, None], "b": "é"}}}},
             {"id": "c2", "type": "function", "function": {"name": "time", "arguments": {}}}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}},
             {"type": "function", "function": {"name": "time"}}]
    tool_conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                 {"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": "c1", "content": " sunny "},
                 {"role": "tool", "tool_call_id": "c2", "name": "time", "content": "noon"},
                 {"role": "assistant", "content": "Sunny at noon."}]
    convs = [([{"role": "user", "content": " hi "}], None),
             ([{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "x"},
               {"role": "assistant", "content": "y "}, {"role": "user", "content": "z\nw"}], None),
             (tool_conv, tools), (tool_conv[1:], None), (tool_conv[:5], tools), (tool_conv[1:3], tools),
             ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me look.", "tool_calls": calls[1:]},
               {"role": "tool", "tool_call_id": "c2", "content": "noon"}], None)]
    for name, model_type in (("gemma3", "gemma3_text"), ("gemma4", "gemma4_text")):
        tok, fam = tiny_tokenizer(name), family_for(model_type)
        assert ensure_chat_template(tok, fam) is True and ensure_chat_template(tok, fam) is False
        for msgs, tl in convs:
            for gen in (True, False):
                assert tok.apply_chat_template(msgs, tools=tl, tokenize=False, add_generation_prompt=gen) == \
                    render_text(msgs, fam, bos=tok.bos_token, add_generation_prompt=gen, tools=tl)
        # the tool definitions and calls really are in the text (the equality above is not between two empties)
        text = tok.apply_chat_template(tool_conv, tools=tools, tokenize=False)
        assert "get_weather" in text and "Paris" in text and "noon" in text and "Weather in a city" in text


def test_merge_refuses_a_bad_shard_size_before_loading(tiny_gemma3, adapter, tmp_path):
    with pytest.raises(UserError, match='field "max_shard_size"'):
        merge_adapter(adapter, tmp_path / "o", base=str(tiny_gemma3), max_shard_size="lots")
    assert not (tmp_path / "o").exists()
