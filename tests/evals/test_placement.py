"""`eval.device` / `eval.dtype`: the base is loaded where the config says, the outputs record where they came from,
and the resolved device + dtype are part of the output-cache key, so outputs of one placement are never served for
another (CPU vs GPU, fp32 vs bf16) even when the config (auto/auto) is the same."""

import pytest
import torch

from gemtune.base.device import Placement
from gemtune.errors import UserError
from gemtune.evals.cache import OutputCache
from gemtune.evals.config import EvalConfig, load_eval_config
from gemtune.evals.pipeline import Evaluator
from gemtune.evals.suite import load_suite


@pytest.fixture(autouse=True)
def cpu_host(monkeypatch):
    """Decisions below are the CPU host's: CUDA is reported absent, on any machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def generated(doc) -> int:
    return doc["summary"]["generation"]["cases_generated"]


def outputs(doc):
    return [c["output"] for c in doc["cases"]]


def test_placement_is_part_of_the_cache_key(tiny_gemma3, tmp_path, suite_writer):
    suite_path = suite_writer(tmp_path / "suite.jsonl", n=6)
    cache = OutputCache()  # the test's isolated GEMTUNE_HOME
    cfg = EvalConfig(max_new_tokens=6, batch_size=3)
    suite = load_suite(suite_path, cfg)
    ev = Evaluator(tiny_gemma3, config=cfg, cache=cache)
    assert (ev.placement.device, ev.placement.dtype) == (torch.device("cpu"), torch.float32)
    assert ev.model.dtype == torch.float32
    first = ev.run(suite)
    assert generated(first) == 6 and generated(ev.run(suite)) == 0  # the rerun is served from the cache
    place = first["meta"]["placement"]
    assert place["device"] == "cpu" and place["dtype"] == "float32"
    assert place["requested"] == {"device": "auto", "dtype": "auto"} and first["summary"]["placement"] == place

    # the same config (auto/auto) resolved to a GPU elsewhere: the key differs, nothing is served from the CPU's
    # outputs (the generation itself still runs here; only the key is the GPU's)
    gpu = Placement(torch.device("cuda", 0), torch.bfloat16)
    with ev.model_under_test(None) as mut:
        mut.generator.placement = gpu
        from gemtune.evals.runner import evaluate

        on_gpu = evaluate(suite, mut, cache=cache)
    assert generated(on_gpu) == 6

    # a real bf16 run on this CPU: its own key, its own outputs; back to fp32: the fp32 outputs are hits again
    bf = Evaluator(tiny_gemma3, config=cfg.model_copy(update={"dtype": "bfloat16"}), cache=cache)
    assert bf.model.dtype == torch.bfloat16 and bf.placement.cache_key() == {"device": "cpu", "dtype": "bfloat16"}
    bf16_doc = bf.run(suite)
    assert generated(bf16_doc) == 6 and bf16_doc["meta"]["placement"]["dtype"] == "bfloat16"
    assert generated(bf.run(suite)) == 0
    again = Evaluator(tiny_gemma3, config=cfg.model_copy(update={"dtype": "float32", "device": "cpu"}),
                      cache=cache).run(suite)
    assert generated(again) == 0 and outputs(again) == outputs(first)
    assert first["meta"]["generation"]["device"] == "cpu" and first["meta"]["generation"]["dtype"] == "float32"
    assert on_gpu["meta"]["generation"]["device"] == "cuda"


def test_device_and_dtype_options_are_checked(tmp_path, tiny_gemma3):
    assert EvalConfig().device == "auto" and EvalConfig().dtype == "auto"
    assert EvalConfig(dtype="bf16", device="CUDA:1").model_dump()["dtype"] == "bfloat16"
    y = tmp_path / "gemtune.yaml"
    y.write_text("eval:\n  max_new_tokens: 8\n  dtype: float16\n")
    with pytest.raises(UserError, match=r'gemtune.yaml:3: field "eval.dtype".*fp16 overflows'):
        load_eval_config(y)
    y.write_text("eval:\n  device: tpu\n")
    with pytest.raises(UserError, match=r'gemtune.yaml:2: field "eval.device".*unknown device'):
        load_eval_config(y)
    y.write_text("eval:\n  device: cpu\n  dtype: bfloat16\n")
    assert load_eval_config(y).dtype == "bfloat16"
    with pytest.raises(UserError, match=r'field "device".*CUDA is not available'):
        Evaluator(tiny_gemma3, config=EvalConfig(device="cuda"))
