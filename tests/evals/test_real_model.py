"""The harness on the real Gemma 3 270M: deterministic reruns, batched output equal to unbatched generation, a
LoRA adapter that loads onto the real architecture and changes its answers."""

import json

import pytest

from gemtune.evals.cache import OutputCache
from gemtune.evals.config import EvalConfig
from gemtune.evals.pipeline import Evaluator
from gemtune.evals.suite import load_suite


def _random_adapter(ev, out):
    """A rank-8 LoRA on the already loaded base (one load of the 270M, not two), saved, then detached."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: without a seed the test's outcome
    # depended on what ran before it in the process (a weak draw once left every greedy output unchanged)
    pm = get_peft_model(ev.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out)
    ev.model = pm.unload()
    return out


@pytest.mark.slow
def test_real_base_deterministic_batched_and_adapter(real_base, tmp_path):
    rows = [
        {"id": "colour", "prompt": "Name one primary colour. Answer with one word.", "expected": "red",
         "scorers": [{"type": "regex", "pattern": "(?i)red|blue|yellow"}]},
        {"id": "sum", "prompt": "What is 2+2? Answer with a number only.", "expected": "4", "scorers": ["contains"]},
        {"id": "card", "messages": [{"role": "system", "content": "Classify the banking message. Reply with the label only."},
                                    {"role": "user", "content": "I am still waiting on my card?"}],
         "expected": "card_arrival", "scorers": ["label"]},
    ]
    suite_path = tmp_path / "s.jsonl"
    suite_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(max_new_tokens=10, batch_size=3)
    suite = load_suite(suite_path, cfg)
    ev = Evaluator(real_base, config=cfg, cache=OutputCache(read=False, write=True))
    adapter = _random_adapter(ev, tmp_path / "adapter")
    base = ev.run(suite)
    cand = ev.run(suite, adapter)
    again = ev.run(suite, adapter)  # read=False: regenerated, not cached
    assert again["summary"]["generation"]["cases_generated"] == 3
    assert [c["output"] for c in again["cases"]] == [c["output"] for c in cand["cases"]]
    assert [c["output"] for c in cand["cases"]] != [c["output"] for c in base["cases"]]
    assert all(c["output"] and "<end_of_turn>" not in c["output"] for c in base["cases"])
    # batched, left-padded harness output == plain unbatched generate (the foundation's reference `chat`)
    from gemtune.base.generate import chat

    for case, row in zip(suite.cases, base["cases"]):
        assert row["output"] == chat(ev.model, ev.tokenizer, case.messages, max_new_tokens=10), case.id
