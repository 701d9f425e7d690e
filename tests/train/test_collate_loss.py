"""Loss masks, truncation, and the supervised-only loss against the standard full-logits loss."""

import pytest
import torch

from gemtune.base.families import GEMMA3_TEXT, GEMMA4_TEXT
from gemtune.base.tiny import char_id, tiny_model, tiny_tokenizer
from gemtune.train.collate import IGNORE, collate, encode_record, pack
from gemtune.train.loss import SupervisedLM, reference_loss

REC = {"id": "a", "messages": [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "done!"},
]}


@pytest.mark.parametrize("family,fam", [("gemma3", GEMMA3_TEXT), ("gemma4", GEMMA4_TEXT)])
def test_mask_is_exactly_assistant_tokens_plus_end_of_turn(family, fam):
    tok = tiny_tokenizer(family)
    ex = encode_record(REC, tok, fam, max_len=512)
    supervised = [t for t in ex.labels if t != IGNORE]
    eot = 106
    assert supervised == [char_id("o"), char_id("k"), eot] + [char_id(c) for c in "done!"] + [eot]
    # every supervised label equals its input token (labels are not shifted in the record)
    assert all(l == i for l, i in zip(ex.labels, ex.input_ids) if l != IGNORE)
    # the newline after each end-of-turn and every header token are masked
    header = [char_id(c) for c in "model\n"]
    for k in range(len(ex.input_ids) - len(header)):
        if ex.input_ids[k:k + len(header)] == header:
            assert all(l == IGNORE for l in ex.labels[k:k + len(header)])


def test_truncation_drops_prompt_from_left_never_the_answer():
    tok = tiny_tokenizer("gemma3")
    rec = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "answer"}]}
    full = encode_record(rec, tok, GEMMA3_TEXT, max_len=1000)
    ex = encode_record(rec, tok, GEMMA3_TEXT, max_len=64)
    assert len(ex.input_ids) == 64
    assert ex.input_ids[0] == 2  # <bos> kept
    assert ex.input_ids[-20:] == full.input_ids[-20:]
    assert [t for t in ex.labels if t != IGNORE] == [t for t in full.labels if t != IGNORE]
    assert encode_record(rec, tok, GEMMA3_TEXT, max_len=8) is None  # the answer alone does not fit


def _batch(family):
    tok = tiny_tokenizer(family)
    fam = GEMMA3_TEXT if family == "gemma3" else GEMMA4_TEXT
    recs = [REC, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a longer answer"}]}]
    exs = [encode_record(r, tok, fam, 512) for r in recs]
    return exs, tok


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
@pytest.mark.parametrize("chunk", [1024, 4])
def test_supervised_loss_equals_full_logits_loss(family, chunk):
    exs, tok = _batch(family)
    model = tiny_model(family, seed=1)
    b = collate(exs, tok.pad_token_id)
    wrapper = SupervisedLM(model, chunk=chunk)
    s, n = wrapper(b["input_ids"], b["labels"], b["position_ids"])
    ref = reference_loss(model, b)
    assert n == sum(e.n_supervised for e in exs) - 0  # next-token targets = supervised labels (none at position 0)
    assert abs(float(s) / n - float(ref)) < 1e-5
    # gradients agree too
    (s / n).backward()
    g1 = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    reference_loss(model, b).backward()
    g2 = model.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_packed_examples_do_not_attend_to_each_other(family):
    exs, tok = _batch(family)
    model = tiny_model(family, seed=2)
    wrapper = SupervisedLM(model)
    with torch.no_grad():
        s1, n1 = wrapper(**{k: v for k, v in collate(exs, tok.pad_token_id).items()})
        packed = pack(exs, tok.pad_token_id, max_len=512)
        assert packed["input_ids"].shape[0] == 1  # both examples share one row
        s2, n2 = wrapper(**packed)
    assert n1 == n2
    assert abs(float(s1) - float(s2)) < 1e-4
