"""The probes' parts checked against references: edit similarity, early-stopped greedy decoding vs full decoding,
cached canary scoring vs a plain full-sequence forward (Gemma 3 and Gemma 4), exposure arithmetic, secret masking,
PII value matching."""

import json
import math

import pytest
import torch

from gemtune.privacy import canary as cp
from gemtune.privacy import extraction as ex
from gemtune.privacy import regurgitation as rg
from gemtune.privacy.probe import SecretMask


def test_levenshtein_and_similarity():
    assert ex.levenshtein(list("kitten"), list("sitting")) == 3
    assert ex.levenshtein([], [1, 2]) == 2 and ex.levenshtein([1, 2, 3], [1, 2, 3]) == 0
    assert ex.similarity([1, 2, 3, 4, 9, 9], [1, 2, 3, 4]) == 1.0  # only len(target) tokens are compared
    assert ex.similarity([1, 2, 3, 5], [1, 2, 3, 4]) == 0.75
    assert ex.similarity([1, 2], [1, 2, 3, 4]) == 0.5  # stopped early: the missing tokens are edits
    assert ex.allowed_edits(32, 0.9) == 3 and ex.allowed_edits(10, 0.9) == 1 and ex.allowed_edits(5, 0.9) == 0


def _random_adapter(base, out, seed=1, std=0.3):
    from peft import LoraConfig, get_peft_model

    from gemtune.base.families import family_of, target_modules
    from gemtune.base.loader import load_base

    model, _ = load_base(base)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules(family_of(model))))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.save_pretrained(out)
    return out


def test_early_stopped_greedy_agrees_with_full_greedy(tiny_gemma3):
    """Probes whose held-out text is the model's own greedy output must run to the end and be exact; probes with
    random held-out text must stop within allowed_edits + 1 tokens; every early output is a prefix of the full one."""
    from gemtune.base.families import family_of
    from gemtune.base.loader import load_base
    from gemtune.evals.engine import LocalGenerator

    model, tok = load_base(tiny_gemma3)
    fam = family_of(model)
    g = torch.Generator().manual_seed(0)
    contexts = [[2] + torch.randint(300, 420, (n,), generator=g).tolist() for n in (5, 9, 14, 7, 11, 6)]
    gen = LocalGenerator(model, tok, fam, batch_size=4)
    full = [[t for t in r if t not in gen.stops] for r in gen.generate_batch(contexts, 24)]
    probes = []
    for i, c in enumerate(contexts):
        target = full[i][:20] if i % 2 == 0 else torch.randint(300, 420, (20,), generator=g).tolist()
        probes.append(ex.Probe(i, "prompt", c, target))
    early = ex.greedy_outputs(model, tok, fam, probes, batch_size=4, near=0.9)
    for i, (p, e) in enumerate(zip(probes, early)):
        assert full[i][:len(e)] == e
        assert (ex.similarity(e, p.target) >= 0.9) == (ex.similarity(full[i], p.target) >= 0.9)
        if i % 2 == 0:
            assert e == p.target  # memorised rows are decoded to the end
        else:
            assert len(e) <= ex.allowed_edits(20, 0.9) + 1


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_cached_canary_scoring_equals_full_forward(family, request, tmp_path):
    """KV cache of the prefix repeated over a batch (sliding-window layers included: the prefix is longer than the
    window) gives the same log-likelihoods as scoring each full sequence, with a LoRA adapter attached."""
    from gemtune.base.loader import load_base
    from gemtune.adapter import attached

    base = request.getfixturevalue(f"tiny_{family}")
    adapter = _random_adapter(base, tmp_path / "a")
    model, _ = load_base(base)
    g = torch.Generator().manual_seed(3)
    prefix = [2] + torch.randint(300, 420, (39,), generator=g).tolist()
    conts = [torch.randint(300, 420, (n,), generator=g).tolist() for n in (1, 4, 6, 5, 9, 2, 7)]
    with attached(model, adapter) as pm, torch.inference_mode():
        got = cp.continuation_logprobs(pm, prefix, conts, max_positions=12)  # several batches
        want = []
        for c in conts:
            ids = torch.tensor([prefix + c])
            lp = torch.log_softmax(pm(input_ids=ids).logits[0].float(), -1)
            want.append(sum(float(lp[len(prefix) - 1 + k, t]) for k, t in enumerate(c)))
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(x, 3) for x in got)) == len(got)  # a comparison that can fail


def test_canary_tokenisation_splits_at_the_secret(tiny_gemma3):
    from gemtune.base.families import family_of
    from gemtune.base.loader import load_tokenizer
    from gemtune.data import canaries as cm
    from transformers import AutoConfig

    tok = load_tokenizer(tiny_gemma3)
    fam = family_of(AutoConfig.from_pretrained(str(tiny_gemma3)))
    rows = [{"id": "a", "task": "t", "messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "ok"}]}]
    entry = cm.plant(rows, [0], 1, seed=0)[0]
    ctx = cp.context_text(rows[0]["messages"], entry, tok, fam)
    assert ctx.endswith("ok\nmy account code is ")
    others = cm.candidates(entry["format"], 5, seed=1, exclude=(entry["secret"],))
    task = cp.tokenize_task(0, entry, ctx, [entry["secret"]] + others, tok)
    full = tok(ctx + entry["secret"], add_special_tokens=False)["input_ids"]
    assert task.prefix + task.continuations[0] == full and len(task.continuations[0]) == len(entry["secret"])


def test_exposure_arithmetic():
    assert cp.exposure(1, 64) == 6.0 and cp.exposure(64, 64) == 0.0 and cp.exposure(2, 64) == 5.0
    assert cp.rank_of(-3.0, [-5.0, -4.0, -1.0]) == 2
    others = [float(x) for x in torch.randn(255, generator=torch.Generator().manual_seed(0))]
    mean, sd = sum(others) / 255, float(torch.tensor(others).std())
    assert cp.extrapolated_exposure(mean, others) == pytest.approx(1.0, abs=0.05)  # the median: P = 1/2
    far = cp.extrapolated_exposure(mean + 6 * sd, others)
    assert far > math.log2(256)  # beyond what rank alone can show with R = 256
    assert cp.extrapolated_exposure(1.0, [2.0, 2.0, 2.0]) is None and cp.extrapolated_exposure(1.0, [2.0, 3.0]) is None
    # with few candidates the predictive t tail is heavier than the plug-in normal: fewer bits for the same z
    few = [float(x) for x in torch.randn(15, generator=torch.Generator().manual_seed(1))]
    m15, s15 = sum(few) / 15, float(torch.tensor(few).std())
    from scipy.stats import norm

    assert cp.extrapolated_exposure(m15 + 4 * s15, few) < -norm.logsf(4) / math.log(2)
    s = cp.summarise([{"rank": 1, "exposure": 6.0, "exposure_extrapolated": 30.0},
                      {"rank": 40, "exposure": 0.68, "exposure_extrapolated": 0.5}])
    assert s == {"max_exposure": 6.0, "mean_exposure": 3.34, "max_exposure_extrapolated": 30.0, "rank1": 1}


def test_secret_mask():
    mask = SecretMask([{"secret": "PMX-B91-877", "prefix": "my account code is"}])
    assert mask("x my account code is PMX-B91-877 y") == "x my account code is <CANARY> y"
    assert mask("bill\nmy account code is PMX-B") == "bill\nmy account code is <CANARY>"  # cut mid-secret
    assert mask("91-877<end_of_turn>") == "<CANARY><end_of_turn>"  # a probe that began mid-secret
    assert mask("ref PMX-B91-877.") == "ref <CANARY>."
    assert mask("my account code is unknown, 877 items") == "my account code is unknown, 877 items"


def test_pii_value_matching_and_known_values(tmp_path):
    from gemtune.data.pii import find_pii, redact

    assert rg.normalise("PHONE", "(415) 555-0132") == rg.normalise("PHONE", "415.555.0132") == "4155550132"
    assert rg.normalise("EMAIL", " Dana@Example.org") == "dana@example.org"
    assert rg.mask("dana@example.org") == "da…rg" and rg.mask("a@b.c") == "…"
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "raw.csv").write_text("input,output\n\"call me on (415) 555-0132\",login\n")
    meta = {"inputs": [{"file": "raw.csv"}, {"file": "gone.jsonl"}]}
    train = [{"messages": [{"role": "user", "content": "mail dana@example.org"}, {"role": "assistant", "content": "x"}]}]
    known = rg.known_values(train, meta, data, find_pii)
    assert known.sources == [str(tmp_path / "raw.csv"), "train.jsonl"] and known.missing == ["gone.jsonl"]
    assert ("PHONE", "415-555-0132") in known and ("EMAIL", "DANA@example.org") in known
    outs = ["reach us at 415 555 0132", "write to sam@example.com", "nothing here"]
    s = rg.scan(outs, ["a", "b", "c"], known, find_pii, redact)
    assert (s["hits"], s["leaks"], s["samples_with_pii"]) == (2, 1, 2)
    assert s["hits_by_type"] == {"PHONE": 1, "EMAIL": 1} and s["leaks_by_type"] == {"PHONE": 1}
    assert s["examples"][0]["leak"] is True and "0132" not in json.dumps(s)  # leaks first, values masked


def test_training_prompts_cycle_and_end_with_the_generation_header(tiny_gemma3):
    from gemtune.base.families import family_of
    from gemtune.base.loader import load_tokenizer
    from transformers import AutoConfig

    tok = load_tokenizer(tiny_gemma3)
    fam = family_of(AutoConfig.from_pretrained(str(tiny_gemma3)))
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(3)]
    ids, prompts = rg.training_prompts(rows, 7, 0, tok, fam)
    assert len(ids) == 7 and sorted(set(ids)) == ["r0", "r1", "r2"] and ids[:3] == ids[3:6]
    header = tok("<start_of_turn>model\n", add_special_tokens=False)["input_ids"]
    assert all(p[-len(header):] == header for p in prompts)


def test_tokenize_example_cuts_training_tokenisation(tiny_gemma3):
    from gemtune.base.families import family_of
    from gemtune.base.loader import load_tokenizer
    from gemtune.base.templates import render
    from transformers import AutoConfig

    tok = load_tokenizer(tiny_gemma3)
    fam = family_of(AutoConfig.from_pretrained(str(tiny_gemma3)))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "the answer"}]
    ctx, ans = ex.tokenize_example(msgs, tok, fam)
    full = render(msgs, tok, fam).input_ids
    assert ctx + ans == full[:-2]  # everything but <end_of_turn> and the newline after it
    assert ex.decode(tok, ans) == "the answer"
    assert ex.decode(tok, ctx, skip_special_tokens=False).endswith("<start_of_turn>model\n")
