"""Acceptance (issue #14): no stage hands the model a tensor on a device other than the model's.

The model is a tiny random Gemma built on the `meta` device: its tensors have shapes and a device but no values.
A forward pre-hook records the device of every tensor the model's forward receives and then raises `Reached`,
so each call stops at the first forward (a meta model cannot produce values to decode anyway). A stage that builds
an input on the CPU and forgets to put it on the model's device shows up as a "cpu" in the record, and the test
fails; a stage that reads a tensor's value before the forward fails with "cannot be called on meta tensors".

Covered: the generation helper (greedy and sampling, padded batches), eval's generator through the runner (render,
cache lookup, generate), the probe's greedy extraction and PII sampling, the canary scorer, and `chat`.
"""

import pytest
import torch

from gemtune.base.families import family_of


class Reached(Exception):
    """The forward was reached with the recorded inputs."""


@pytest.fixture(params=["gemma3", "gemma4"])
def meta_model(request):
    from transformers import AutoModelForCausalLM

    from gemtune.base.tiny import tiny_config, tiny_tokenizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(request.param)).eval()
    seen: list[dict] = []

    def hook(module, args, kwargs):
        devices = {f"arg{i}": a.device.type for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        devices.update({k: v.device.type for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        seen.append(devices)
        raise Reached

    model.register_forward_pre_hook(hook, with_kwargs=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    return model, tiny_tokenizer(request.param), seen


def reached_on_meta(seen: list[dict], *required: str) -> dict:
    """The one forward reached; every tensor it got is on meta, and the expected inputs were among them."""
    assert len(seen) == 1, seen
    devices = seen[0]
    assert set(required) <= set(devices), devices
    off = {k: d for k, d in devices.items() if d != "meta"}
    assert not off, f"tensors handed to the model on another device than its own (meta): {off}"
    return devices


def test_generation_helper_greedy_and_sampling(meta_model):
    from gemtune.base import generate as gl

    model, _, seen = meta_model
    batch = [[2, 310, 311, 312], [2, 320]]  # padded: attention mask and position ids both built
    with pytest.raises(Reached):
        gl.generate_batch(model, batch, 4, stops=[1, 106], pad_id=0)
    reached_on_meta(seen, "input_ids", "attention_mask", "position_ids")
    seen.clear()
    with pytest.raises(Reached):
        gl.generate(model, batch, 4, stops=[1, 106], pad_id=0, sampling=gl.Sampling(0.8, 10), seed=1)
    reached_on_meta(seen, "input_ids", "attention_mask", "position_ids")


def test_eval_generation_step(meta_model, tmp_path, monkeypatch):
    import json

    from gemtune.evals.cache import OutputCache
    from gemtune.evals.config import EvalConfig
    from gemtune.evals.engine import make_generator
    from gemtune.evals.runner import ModelUnderTest, generate_outputs
    from gemtune.evals.suite import load_suite

    model, tok, seen = meta_model
    fam = family_of(model)
    cfg = EvalConfig(max_new_tokens=4, batch_size=4)
    monkeypatch.setenv("GEMTUNE_HOME", str(tmp_path / "home"))
    rows = [{"id": f"c{i}", "prompt": "route " * i + "this", "expected": "x"} for i in range(3)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = load_suite(tmp_path / "s.jsonl", cfg)
    gen = make_generator(model, tok, batch_size=cfg.batch_size)
    assert gen.placement.device.type == "meta"
    mut = ModelUnderTest("meta", gen, tok, fam, "tiny", "sha")
    with pytest.raises(Reached):
        generate_outputs(suite, mut, OutputCache(tmp_path / "cache"))
    reached_on_meta(seen, "input_ids", "attention_mask", "position_ids")


def test_probe_extraction_pii_sampling_and_canaries(meta_model):
    from gemtune.privacy import canary as cp
    from gemtune.privacy import extraction as ex
    from gemtune.privacy import regurgitation as rg

    model, tok, seen = meta_model
    fam = family_of(model)
    probes = [ex.Probe(0, "prompt", [2, 310, 311, 312, 313], [320, 321, 322]),
              ex.Probe(1, "prompt", [2, 330], [340, 341])]
    with pytest.raises(Reached):
        ex.greedy_outputs(model, tok, fam, probes, batch_size=4, near=0.9)
    reached_on_meta(seen, "input_ids", "attention_mask", "position_ids")
    seen.clear()
    with pytest.raises(Reached):
        rg.sample_outputs(model, tok, fam, [[2, 310, 311], [2, 312]], max_new_tokens=4, temperature=1.0, top_k=5,
                          seed=0, batch_size=2)
    reached_on_meta(seen, "input_ids", "attention_mask", "position_ids")
    seen.clear()
    with pytest.raises(Reached):
        cp.continuation_logprobs(model, [2, 310, 311, 312], [[320, 321], [322]], max_positions=8)
    reached_on_meta(seen, "input_ids")


def test_chat(meta_model):
    from gemtune.base.generate import chat

    model, tok, seen = meta_model
    with pytest.raises(Reached):
        chat(model, tok, [{"role": "user", "content": "hello"}], max_new_tokens=3)
    reached_on_meta(seen, "input_ids", "position_ids")
