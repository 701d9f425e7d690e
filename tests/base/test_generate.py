"""The one generation helper against transformers' `generate`: the same tokens, greedy and seeded sampling, on padded
and unpadded batches of tiny Gemma 3 / Gemma 4 models (prompts longer than the sliding window included); per-row
stops and stopping criteria; the global RNG left alone; fp16 refused."""

import pytest
import torch

from gemtune.base import generate as gl
from gemtune.errors import UserError

STOPS = [1, 106]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    from gemtune.base.tiny import tiny_model

    return {f: tiny_model(f) for f in ("gemma3", "gemma4")}


def prompts(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(300, 420, (n,), generator=g).tolist() for n in lens]


def hf_reference(model, batch, n, sampling=None, seed=7, stops=STOPS):
    """transformers' generate on the same left-padded batch, rows cut after their first stop."""
    from transformers import GenerationConfig

    ids, mask = gl.left_pad(batch, 0)
    if sampling is None:
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=0,
                               temperature=None, top_p=None, top_k=None)
    else:
        cfg = GenerationConfig(max_new_tokens=n, do_sample=True, temperature=sampling.temperature,
                               top_k=sampling.top_k or 0, top_p=sampling.top_p, num_beams=1, eos_token_id=stops,
                               pad_token_id=0)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:].tolist()
    return [r[:next((i + 1 for i, t in enumerate(r) if t in stops), len(r))] for r in out]


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
@pytest.mark.parametrize("lens", [(5, 9, 14, 7), (6, 6, 6), (30, 3)])
@pytest.mark.parametrize("sampling", [None, gl.Sampling(0.7, 5), gl.Sampling(1.0, 50), gl.Sampling(1.3, None, 0.9)],
                         ids=["greedy", "t0.7-k5", "t1-k50", "t1.3-p0.9"])
def test_same_tokens_as_transformers_generate(models, family, lens, sampling):
    m = models[family]
    batch = prompts(lens, seed=len(lens))
    got = gl.generate_batch(m, batch, 16, stops=STOPS, pad_id=0, sampling=sampling, seed=7)
    assert got == hf_reference(m, batch, 16, sampling)
    assert all(len(r) == 16 for r in got)  # random tiny weights never emit a stop: full rows compared


def test_rows_stop_at_their_own_stop_token_and_batching_changes_nothing(models):
    m = models["gemma3"]
    batch = prompts((4, 11, 7, 2, 9), seed=3)
    free = gl.generate_batch(m, batch, 10, stops=STOPS, pad_id=0)
    # make a token a row first emits at position k >= 1 a stop: that row ends there, rows never emitting it run on
    r, k, stop = next((r, k, t) for r, row in enumerate(free) for k, t in enumerate(row)
                      if k >= 1 and t not in row[:k] and any(t not in o for o in free))
    others = [i for i, o in enumerate(free) if stop not in o]
    rows = gl.generate_batch(m, batch, 10, stops=STOPS + [stop], pad_id=0)
    assert rows[r] == free[r][:k + 1] and len(rows[r]) < 10
    for i in others:
        assert rows[i] == free[i]
    assert rows == hf_reference(m, batch, 10, stops=STOPS + [stop])
    # generate(): any batch size, rows back in input order, each equal to decoding it alone
    alone = [gl.generate_batch(m, [p], 10, stops=STOPS, pad_id=0)[0] for p in batch]
    for bs in (1, 2, 5):
        assert gl.generate(m, batch, 10, stops=STOPS, pad_id=0, batch_size=bs) == alone


def test_stopping_criteria_end_rows_and_sampling_is_seeded(models):
    m = models["gemma4"]
    batch = prompts((5, 8, 3), seed=4)

    class AfterK:
        def __init__(self, ks):
            self.ks = ks

        def __call__(self, input_ids, scores=None, **kw):
            n = input_ids.shape[1] - 9  # new tokens so far (prompt width 9)
            return torch.tensor([n >= k for k in self.ks], device=input_ids.device)

    rows = gl.generate_batch(m, batch, 12, stops=STOPS, pad_id=0, stopping=[AfterK([2, 12, 5])])
    assert [len(r) for r in rows] == [2, 12, 5]
    full = gl.generate_batch(m, batch, 12, stops=STOPS, pad_id=0)
    assert all(full[i][:len(r)] == r for i, r in enumerate(rows))
    s = gl.Sampling(1.0, 20)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = gl.generate(m, batch, 12, stops=STOPS, pad_id=0, batch_size=2, sampling=s, seed=5)
    after = torch.rand(3)
    assert torch.equal(before, after)  # sampling drew from its own generator, not the global one
    assert a == gl.generate(m, batch, 12, stops=STOPS, pad_id=0, batch_size=2, sampling=s, seed=5)
    assert a != gl.generate(m, batch, 12, stops=STOPS, pad_id=0, batch_size=2, sampling=s, seed=6)
    assert a != full  # it did sample


def test_fp16_model_is_refused_and_empty_inputs(models):
    m16 = models["gemma3"].to(torch.float16)
    try:
        with pytest.raises(UserError, match="float16"):
            gl.generate_batch(m16, [[2, 310]], 3, stops=STOPS, pad_id=0)
    finally:
        models["gemma3"].to(torch.float32)
    assert gl.generate(models["gemma3"], [], 4, stops=STOPS, pad_id=0) == []
    assert gl.generate_batch(models["gemma3"], [[2, 310]], 0, stops=STOPS, pad_id=0) == [[]]


def test_bf16_model_decodes_on_its_dtype(models):
    """A bf16 model's logits are taken to fp32 before the argmax; the tokens equal transformers' on that model."""
    from gemtune.base.tiny import tiny_model

    m = tiny_model("gemma3").to(torch.bfloat16)
    batch = prompts((6, 10), seed=9)
    assert gl.generate_batch(m, batch, 8, stops=STOPS, pad_id=0) == hf_reference(m, batch, 8)


def test_chat_is_the_unbatched_reference(tiny_gemma3):
    from gemtune.base.families import family_of
    from gemtune.base.loader import load_base
    from gemtune.base.templates import render_prompt

    m, tok = load_base(tiny_gemma3)
    msgs = [{"role": "user", "content": "route this, please"}]
    fam = family_of(m)
    ids = render_prompt(msgs, tok, fam).input_ids
    stops, pad = gl.stop_and_pad_ids(tok, fam)
    (ref,) = hf_reference(m, [ids], 6, stops=stops)
    want = tok.decode(gl.strip_stop(ref, stops), skip_special_tokens=True).strip()
    assert gl.chat(m, tok, msgs, max_new_tokens=6) == want
    assert gl.strip_stop([5, 6, 106, 7], [106]) == [5, 6]


@pytest.mark.slow
def test_real_270m_same_tokens_as_transformers_generate(real_base):
    from gemtune.base.families import family_of
    from gemtune.base.loader import load_base
    from gemtune.base.templates import render_prompt

    m, tok = load_base(real_base)
    fam = family_of(m)
    stops, pad = gl.stop_and_pad_ids(tok, fam)
    batch = [render_prompt([{"role": "user", "content": q}], tok, fam).input_ids
             for q in ("Say hello.", "Name one primary colour. Answer with one word.")]
    got = gl.generate_batch(m, batch, 12, stops=stops, pad_id=pad)
    assert got == hf_reference(m, batch, 12, stops=stops)
    samp = gl.Sampling(1.0, 50)
    assert gl.generate_batch(m, batch, 12, stops=stops, pad_id=pad, sampling=samp, seed=3) == \
        hf_reference(m, batch, 12, samp, seed=3, stops=stops)
