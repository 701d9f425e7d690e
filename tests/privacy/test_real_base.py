"""The probe on the real Gemma 3 270M (slow, short): a real data build with a canary, an untrained adapter, the
real tokenizer's BPE at the secret boundary."""

import json

import pytest

from gemtune.privacy.config import PrivacyConfig

REPLIES = [
    "Thanks for reaching out. I have reset the password link; it expires in one hour.",
    "Sorry about the delay. The parcel left our warehouse yesterday and should arrive on Friday.",
    "I can see the duplicate charge. The refund is on its way and shows up in three to five days.",
    "Your plan renews on the first of the month; you can cancel any time before that date.",
]


@pytest.mark.slow
def test_probe_on_the_real_base(real_base, tmp_path, make_zero_adapter):
    from gemtune.base.families import family_of
    from gemtune.base.loader import load_tokenizer
    from gemtune.data.config import DataConfig
    from gemtune.data.pipeline import build
    from gemtune.privacy import canary as cp
    from gemtune.privacy.probe import load_train, run_probe
    from transformers import AutoConfig

    raw = tmp_path / "replies.jsonl"
    raw.write_text("".join(json.dumps({"id": f"q{i}", "input": f"Customer {i} asks about case {1000 + 7 * i}.",
                                       "output": REPLIES[i % 4] + f" Reference {i}."}) + "\n" for i in range(24)))
    data = tmp_path / "data"
    build([raw], data, DataConfig(canaries=1))
    adapter = make_zero_adapter(real_base, tmp_path / "adapter", data)

    # the secret boundary with the real tokenizer: prefix + true continuation is exactly the training tokenisation
    tok = load_tokenizer(real_base)
    fam = family_of(AutoConfig.from_pretrained(str(real_base)))
    records, _ = load_train(data)
    doc = json.loads((tmp_path / "data.canaries.json").read_text())
    (task,) = cp.load_tasks(doc, tmp_path / "data.canaries.json", records, tok, fam, candidates=8, seed=0)
    entry = doc["canaries"][0]
    row = next(r for r in records if r["id"] == entry["row_id"])
    ctx = cp.context_text(row["messages"], entry, tok, fam)
    assert task.prefix + task.continuations[0] == tok(ctx + entry["secret"], add_special_tokens=False)["input_ids"]
    assert len(task.continuations) == 8 and all(task.continuations)

    rep = run_probe(adapter, None, tmp_path / "probe.json",
                    config=PrivacyConfig(samples=2, suffix_tokens=12, candidates=8, pii_samples=2, pii_max_new_tokens=8))
    ext, can, pii = rep["extraction"], rep["canaries"], rep["pii"]
    assert ext["status"] == "run" and ext["sampled"] == 2 and ext["skipped_short"] == 0
    assert ext["adapter"] == ext["base"]  # B = 0: the adapter is the base
    assert [p["adapter"] for p in can["per_canary"]] == [p["base"] for p in can["per_canary"]]
    assert can["adapter"]["max_exposure"] <= 3.0 and can["adapter"]["max_exposure_extrapolated"] < 10
    assert pii["adapter"]["hits"] == pii["base"]["hits"] and pii["adapter"]["leaks"] == 0
    assert rep["passed"] is True and entry["secret"] not in (tmp_path / "probe.json").read_text()
    print("real-base probe timings (s):", rep["timings_s"])
