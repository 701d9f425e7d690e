"""The embedded engine: mixed-adapter batches equal PEFT's greedy output per adapter, sampling, limits, LRU, cancel."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch

from gemtune.base.tiny import char_id
from gemtune.errors import UserError
from gemtune.serve.engine import AdapterError, Engine, GenRequest, QueueFull

TARGETS = {
    0: ("q_proj", "k_proj", "v_proj", "o_proj"),
    1: ("q_proj", "v_proj"),
    2: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def make_adapter(base: Path, out: Path, seed: int, r: int = 8, targets=TARGETS[0], scale: float = 3.0, *,
                 model=None, **extra) -> Path:
    """A PEFT LoRA adapter with random, clearly non-zero A and B (so each adapter changes the output).

    Pass `model` (a loaded base) to make several adapters from one load; it is returned to its plain state.
    """
    from peft import LoraConfig, get_peft_model

    from gemtune.base.loader import load_base

    if model is None:
        model, _ = load_base(base)
    torch.manual_seed(seed)
    targets = targets if isinstance(targets, str) else list(targets)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **extra)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    peft_model.save_pretrained(out)
    peft_model.unload()
    return out


def prompt(text: str, family: str = "gemma3") -> list[int]:
    """A chat-shaped prompt in the tiny char-level vocabulary."""
    return [2, 105] + [char_id(c) for c in text] + [106, char_id("\n"), 105]


class PeftReference:
    """Reference outputs: PEFT with one adapter active at a time (or the plain base), Hugging Face generate,
    greedy, no early stop — what each request must equal however the engine batches it."""

    def __init__(self, base: Path, adapters: dict[str, Path], model=None):
        from peft import PeftModel

        from gemtune.base.loader import load_base

        if model is None:
            model, _ = load_base(base)
        self.model = None
        for key, path in adapters.items():
            if self.model is None:
                self.model = PeftModel.from_pretrained(model, path, adapter_name=key)
            else:
                self.model.load_adapter(path, adapter_name=key)
        self.model = self.model if self.model is not None else model

    @torch.inference_mode()
    def greedy(self, adapter: str | None, ids: list[int], n: int) -> list[int]:
        import contextlib

        x = torch.tensor([ids])
        ctx = contextlib.nullcontext()
        if hasattr(self.model, "set_adapter"):
            if adapter is None:
                ctx = self.model.disable_adapter()
            else:
                self.model.set_adapter(adapter)
        with ctx:
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=["gemma3", "gemma4"])
def family_setup(request, tmp_path_factory):
    base = request.getfixturevalue(f"tiny_{request.param}")
    d = tmp_path_factory.mktemp(f"adapters-{request.param}")
    ads = {f"a{i}": make_adapter(base, d / f"a{i}", seed=i, r=4 * (i + 1), targets=TARGETS[i]) for i in range(3)}
    return request.param, base, ads


PROMPTS = ["hello there", "abc", "the quick brown fox jumps over the lazy dog, twice over", "x"]


def test_mixed_adapter_batch_equals_peft_greedy(family_setup):
    """Rows for three adapters and the base share every step (max_batch 3 < 16 requests: rows join and leave),
    prompts span several prefill chunks and exceed the sliding window (16): each row equals PEFT alone."""
    family, base, ads = family_setup
    n = 24
    combos = [(p, a) for p in PROMPTS for a in (None, "a0", "a1", "a2")]
    with Engine(base, max_batch=3, max_model_len=128, prefill_chunk=8, prefill_budget=12) as eng:
        for k, path in ads.items():
            eng.load_adapter(k, path)
        handles = [eng.submit(GenRequest(prompt(p), a, n, ignore_eos=True)) for p, a in combos]
        got = [h.result(timeout=120) for h in handles]
        stats = eng.stats()
    refs, peft = {}, PeftReference(base, ads)
    for (p, a), (text, ids, reason) in zip(combos, got):
        ref = peft.greedy(a, prompt(p), n)
        refs[(p, a)] = ref
        assert ids == ref, f"{family} adapter={a} prompt={p!r}"
        assert reason == "length" and len(ids) == n
    for p in PROMPTS:  # the adapters really differ from each other and from the base
        outs = {tuple(refs[(p, a)]) for a in (None, "a0", "a1", "a2")}
        assert len(outs) == 4, p
    assert stats["generated_tokens_total"] == n * len(combos)
    assert stats["per_adapter"]["a1"]["requests"] == len(PROMPTS)
    assert stats["requests_finished"]["length"] == len(combos)


def test_generate_helper_and_text(tiny_gemma3, tmp_path):
    ad = make_adapter(tiny_gemma3, tmp_path / "ad", seed=5)
    with Engine(tiny_gemma3, max_batch=4, max_model_len=128) as eng:
        eng.load_adapter("x", ad)
        texts = eng.generate([prompt("hi"), prompt("hi")], [None, "x"], 12, ignore_eos=True)
        h = eng.submit(GenRequest(prompt("hi"), "x", 12, ignore_eos=True))
        text, ids, _ = h.result()
    assert texts[1] == text == eng.tokenizer.decode(ids, skip_special_tokens=True)
    assert texts[0] != texts[1]


def test_stop_ids_and_default_stop(tiny_gemma3):
    with Engine(tiny_gemma3, max_batch=2, max_model_len=128) as eng:
        _, ids, _ = eng.submit(GenRequest(prompt("stop me"), None, 20, ignore_eos=True)).result()
        stop_at = next(i for i in range(1, 20) if ids[i] not in ids[:i])  # first fresh token after position 0
        text, got, reason = eng.submit(GenRequest(prompt("stop me"), None, 20, stop_ids=[ids[stop_at]])).result()
        assert reason == "stop" and got == ids[:stop_at]
        assert text == eng.tokenizer.decode(ids[:stop_at], skip_special_tokens=True)
        events = list(eng.submit(GenRequest(prompt("stop me"), None, 20, stop_ids=[ids[stop_at]])))
        assert events[-1].finish_reason == "stop" and events[-1].token_id is None
        assert events[-1].completion_tokens == stop_at + 1  # the stop token was computed and is counted
        assert all(e.finish_reason is None for e in events[:-1])
        # the family's end-of-turn stops by default; ignore_eos generates through it
        eot = eng.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        assert eot in eng.default_stop


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_gemma3, tmp_path):
    ad = make_adapter(tiny_gemma3, tmp_path / "ad", seed=7)
    req = dict(prompt_ids=prompt("sample"), adapter="s", max_tokens=20, temperature=1.3, top_p=0.9, seed=1234,
               ignore_eos=True)
    with Engine(tiny_gemma3, max_batch=8, max_model_len=128) as eng:
        eng.load_adapter("s", ad)
        alone = eng.submit(GenRequest(**req)).result()[1]
        others = [eng.submit(GenRequest(prompt(f"noise {i}"), None if i % 2 else "s", 20, temperature=1.0,
                                        ignore_eos=True)) for i in range(5)]
        crowded = eng.submit(GenRequest(**req)).result()[1]
        for h in others:
            h.result()
        other_seed = eng.submit(GenRequest(**{**req, "seed": 99})).result()[1]
        greedy = eng.submit(GenRequest(**{**req, "temperature": 0.0})).result()[1]
    assert alone == crowded
    assert alone != other_seed
    assert alone != greedy


def test_limits_are_user_errors(tiny_gemma3):
    with Engine(tiny_gemma3, max_batch=2, max_model_len=64) as eng:
        with pytest.raises(UserError, match="limit is 63"):
            eng.submit(GenRequest(list(range(300, 364)), None, 1))
        with pytest.raises(UserError, match="max_tokens can be at most 54"):
            eng.submit(GenRequest(list(range(300, 310)), None, 55))
        with pytest.raises(UserError, match="max_tokens"):
            eng.submit(GenRequest([300], None, 0))
        with pytest.raises(UserError, match="top_p"):
            eng.submit(GenRequest([300], None, 4, top_p=0))
        with pytest.raises(UserError, match="token ids"):
            eng.submit(GenRequest([10**9], None, 4))
        with pytest.raises(AdapterError, match="not loaded"):
            eng.submit(GenRequest([300], "nope", 4))


def test_queue_full_and_cancel_frees_the_slot(tiny_gemma3):
    with Engine(tiny_gemma3, max_batch=1, max_queue=2, max_model_len=512) as eng:
        long = eng.submit(GenRequest(prompt("long"), None, 400, ignore_eos=True))
        next(iter(long))  # running: it holds the only row
        queued = [eng.submit(GenRequest(prompt(f"q{i}"), None, 4, ignore_eos=True)) for i in range(2)]
        with pytest.raises(QueueFull) as exc:
            eng.submit(GenRequest(prompt("one too many"), None, 4))
        assert exc.value.retry_after > 0
        queued[0].cancel()  # a queued request leaves the queue at once
        assert queued[0].result(timeout=5)[2] == "cancelled"
        extra = eng.submit(GenRequest(prompt("fits now"), None, 4, ignore_eos=True))
        long.cancel()  # the running one frees its row at the next step
        text, ids, reason = long.result(timeout=30)
        assert reason == "cancelled" and len(ids) < 400
        assert queued[1].result(timeout=30)[2] == "length"
        assert extra.result(timeout=30)[2] == "length"
        st = eng.stats()
        assert st["requests_finished"]["cancelled"] == 2 and st["running"] == 0 and st["queue_depth"] == 0


def test_async_stream_from_another_loop(tiny_gemma3):
    with Engine(tiny_gemma3, max_batch=2, max_model_len=128) as eng:
        ref_text, ref_ids, _ = eng.submit(GenRequest(prompt("stream"), None, 16, ignore_eos=True)).result()

        async def consume():
            h = eng.submit(GenRequest(prompt("stream"), None, 16, ignore_eos=True))
            return [ev async for ev in h]

        events = asyncio.run(consume())
    assert "".join(e.text for e in events) == ref_text
    assert [e.token_id for e in events] == ref_ids
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 16
    assert all(e.prompt_tokens == len(prompt("stream")) for e in events)


def test_adapter_validation(tiny_gemma3, tiny_gemma4, tmp_path):
    with Engine(tiny_gemma3, max_batch=1, max_model_len=64, max_lora_rank=8) as eng:
        cases = {
            "dora": (make_adapter(tiny_gemma3, tmp_path / "dora", 1, use_dora=True), "use_dora"),
            "mts": (make_adapter(tiny_gemma3, tmp_path / "mts", 1, modules_to_save=["lm_head"]), "modules_to_save"),
            "big": (make_adapter(tiny_gemma3, tmp_path / "big", 1, r=16), "max_lora_rank 8"),
            "other-base": (make_adapter(tiny_gemma4, tmp_path / "g4", 1, targets=("per_layer_input_gate",)), "another base"),
        }
        ia3 = make_adapter(tiny_gemma3, tmp_path / "ia3", 1)
        cfg = json.loads((ia3 / "adapter_config.json").read_text())
        (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
        cases["ia3"] = (ia3, "only LORA")
        (tmp_path / "empty").mkdir()
        cases["empty"] = (tmp_path / "empty", "adapter_config.json")
        for key, (path, msg) in cases.items():
            with pytest.raises(AdapterError, match=msg):
                eng.load_adapter(key, path)
        assert eng.loaded_adapters() == []


def test_lru_eviction_hot_load_and_unload_in_flight(tiny_gemma3, tmp_path):
    ads = [make_adapter(tiny_gemma3, tmp_path / f"a{i}", seed=10 + i, r=4) for i in range(3)]
    with Engine(tiny_gemma3, max_batch=2, max_loras=2, max_model_len=256) as eng:
        eng.load_adapter("a0", ads[0])
        eng.load_adapter("a1", ads[1])
        ref0 = eng.submit(GenRequest(prompt("lru"), "a0", 8, ignore_eos=True)).result()[1]  # a0 most recent now
        eng.load_adapter("a2", ads[2])  # evicts a1, the least recently used
        assert eng.loaded_adapters() == ["a0", "a2"]
        with pytest.raises(AdapterError, match="not loaded"):
            eng.submit(GenRequest(prompt("lru"), "a1", 4))
        # a request in flight pins its adapter: eviction takes the idle one, unload waits for it to finish
        gate = threading.Event()
        busy = eng.submit(GenRequest(prompt("lru"), "a0", 200, ignore_eos=True))
        for ev in busy:
            gate.set()
            break
        eng.load_adapter("a1", ads[1])  # must evict a2 (idle), not a0 (busy)
        assert sorted(eng.loaded_adapters()) == ["a0", "a1"]
        eng.unload_adapter("a0")  # refused for new requests, the running one continues with a0's weights
        with pytest.raises(AdapterError):
            eng.submit(GenRequest(prompt("lru"), "a0", 4))
        text, ids, reason = busy.result(timeout=60)
        assert reason == "length" and ids[:8] == ref0
        # both adapters busy -> loading a third still succeeds (host memory holds one more than max_cpu_loras while
        # every adapter there is pinned), never evicting a running adapter; it is trimmed back once they drain
        h1 = eng.submit(GenRequest(prompt("x"), "a1", 200, ignore_eos=True))
        next(iter(h1))
        eng.load_adapter("a0", ads[0])
        h0 = eng.submit(GenRequest(prompt("y"), "a0", 200, ignore_eos=True))
        next(iter(h0))
        eng.load_adapter("a2", ads[2])
        assert sorted(eng.loaded_adapters()) == ["a0", "a1", "a2"]
        h0.cancel(), h1.cancel()
        assert h0.result(timeout=30)[2] == h1.result(timeout=30)[2] == "cancelled"
        loaded = eng.loaded_adapters()  # back to max_cpu_loras: an idle one left host memory as they drained
        assert len(loaded) == 2 and "a2" in loaded
        assert eng.stats()["adapter_refs"] == {k: 0 for k in loaded}
        assert eng.generate([prompt("z")], ["a2"], 4, ignore_eos=True)[0]


@pytest.mark.slow
def test_real_gemma3_270m_mixed_batch_equals_peft(real_base, tmp_path):
    """Three r16 q/k/v/o adapters and the base, mixed in one batch on the real 270M: each equals PEFT alone."""
    from gemtune.base.families import GEMMA3_TEXT
    from gemtune.base.loader import load_base
    from gemtune.base.templates import render_prompt

    model, tok = load_base(real_base)
    # PEFT's non-zero init is strong on a real model; scaled down the adapters still change the output, not to noise
    ads = {f"r{i}": make_adapter(real_base, tmp_path / f"r{i}", seed=20 + i, r=16, scale=0.5, model=model)
           for i in range(3)}
    questions = ["What is the capital of France?", "Say hello in Spanish.", "Route this ticket: my card was declined."]
    prompts = [render_prompt([{"role": "user", "content": q}], tok, GEMMA3_TEXT).input_ids for q in questions]
    combos = [(prompts[0], a) for a in (None, "r0", "r1", "r2")] + [(prompts[1], "r1"), (prompts[2], "r2")]
    n = 8
    peft = PeftReference(real_base, ads, model=model)
    refs = [peft.greedy(a, p, n) for p, a in combos]
    del peft, model
    assert len({tuple(r) for r in refs[:4]}) == 4  # the adapters really change the output
    with Engine(real_base, max_batch=8, max_model_len=256) as eng:
        for k, path in ads.items():
            eng.load_adapter(k, path)
        got = [h.result(timeout=300)[1] for h in [eng.submit(GenRequest(p, a, n, ignore_eos=True)) for p, a in combos]]
    assert got == refs


def test_shared_prompt_prefixes_are_reused_exactly(family_setup):
    """Requests sharing a long system prefix (same adapter) copy its K/V from a running row instead of recomputing;
    outputs still equal PEFT alone. Prefixes longer than the sliding window (16) and chunk (8) included."""
    family, base, ads = family_setup
    system = "You are a routing assistant for a bank. Answer with one word. "
    texts = ["card lost", "card lost yesterday", "refund please", "hello"]
    combos = [(system + t, a) for t in texts for a in ("a0", "a1", None)]
    combos += [("card lost", "a1"), ("card lost today", "a1")]  # a short shared prefix: the window ring unwrapped
    n = 10
    with Engine(base, max_batch=12, max_model_len=256, prefill_chunk=8, prefill_budget=64, prefix_share_min=4) as eng:
        for k, path in ads.items():
            eng.load_adapter(k, path)
        first = eng.submit(GenRequest(prompt(system + "warm up"), "a0", 40, ignore_eos=True))
        next(iter(first))  # a decoding row that later requests can borrow from
        got = [h.result(timeout=120)[1] for h in [eng.submit(GenRequest(prompt(p), a, n, ignore_eos=True))
                                                   for p, a in combos]]
        first.result(timeout=120)
        shared = eng.stats()["prefix_shared_tokens_total"]
    assert shared >= len(system) * 6  # most requests borrowed the system prefix
    peft = PeftReference(base, ads)
    assert got == [peft.greedy(a, prompt(p), n) for p, a in combos]


def test_gemma4_multimodal_and_moe_checkpoints(tiny_gemma4_mm, tmp_path):
    """Text generation on a Gemma 4 multimodal checkpoint (adapter on the language model only) and on a Gemma 4
    MoE text model equals Hugging Face / PEFT greedy."""
    from transformers import AutoModelForCausalLM
    from transformers.models.gemma4 import Gemma4TextConfig

    from gemtune.base.families import GEMMA4_MM, target_modules
    from gemtune.base.tiny import TINY_VOCAB, tiny_tokenizer

    ad = make_adapter(tiny_gemma4_mm, tmp_path / "mm-ad", seed=3, targets=target_modules(GEMMA4_MM))
    torch.manual_seed(0)
    moe_cfg = Gemma4TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, global_head_dim=32, sliding_window=16, max_position_embeddings=512,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32, attention_k_eq_v=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, final_logit_softcapping=30.0)
    moe_dir = tmp_path / "moe"
    AutoModelForCausalLM.from_config(moe_cfg).save_pretrained(moe_dir)
    tiny_tokenizer("gemma4").save_pretrained(moe_dir)
    moe_ad = make_adapter(moe_dir, tmp_path / "moe-ad", seed=4, targets=("q_proj", "o_proj"))
    prompts = [prompt("multimodal base, text only"), prompt("hi")]
    for base, adapters in ((tiny_gemma4_mm, {"m": ad}), (moe_dir, {"m": moe_ad})):
        with Engine(base, max_batch=4, max_model_len=128, prefill_chunk=8) as eng:
            eng.load_adapter("m", adapters["m"])
            got = [h.result(timeout=60)[1] for h in [eng.submit(GenRequest(p, a, 20, ignore_eos=True))
                                                      for p in prompts for a in (None, "m")]]
        peft = PeftReference(base, adapters)
        assert got == [peft.greedy(a, p, 20) for p in prompts for a in (None, "m")], base


def test_bfloat16_engine_generates(tiny_gemma3, tmp_path):
    """dtype=bfloat16 runs the same path in bf16 (no exactness claim against fp32 PEFT): it produces full-length,
    adapter-dependent, deterministic output."""
    ad = make_adapter(tiny_gemma3, tmp_path / "ad", seed=8)
    with Engine(tiny_gemma3, dtype="bfloat16", max_batch=4, max_model_len=128) as eng:
        eng.load_adapter("b", ad)
        a = eng.generate([prompt("bf16")] * 2, [None, "b"], 16, ignore_eos=True)
        b = eng.generate([prompt("bf16")] * 2, [None, "b"], 16, ignore_eos=True)
    assert a == b and a[0] != a[1] and all(len(t) > 0 for t in a)


def _layout_keys(layout: str) -> list:
    if layout == "masked-one":  # one adapter (and base tokens)
        return [(None, "k1")[i % 2] for i in range(12)]
    if layout == "masked-uneven":  # 10 tokens on k0, 1 each on k1, k2: a padded batched block would be 30 rows
        return ["k0"] * 10 + ["k1", "k2"]
    if layout == "batched":  # decode-sized, groups of 3, 3, 2 (padded), and base tokens
        return [(None, "k0", "k1", "k2")[i % 4] for i in range(11)]
    if layout == "batched-subset":  # two of the pack's three adapters: their blocks are selected
        return [("k2", "k0")[i % 2] for i in range(8)]
    return [(None, "k0", "k1", "k2")[i % 4] for i in range(300)]  # grouped: prefill-sized


@pytest.mark.parametrize("layout", ["masked-one", "masked-uneven", "batched", "batched-subset", "grouped"])
def test_multi_lora_linear_matches_per_token_reference(layout):
    """Each token gets exactly its own adapter's delta (or none), in every LoRA layout; mixed ranks (4, 8, 2)
    exercise the zero-padded per-adapter blocks, and q/k/v-style calls sharing one input reuse its gathered rows."""
    import torch.nn as nn

    from gemtune.serve.lora_batch import LoadedAdapter, LoRAContext, LoRAPack, MultiLoRALinear

    torch.manual_seed(0)
    ctx = LoRAContext()
    bases = [nn.Linear(24, 40, bias=False), nn.Linear(24, 16, bias=False)]
    lins = [MultiLoRALinear(b, f"m{j}", ctx) for j, b in enumerate(bases)]
    ads = []
    for i, r in enumerate((4, 8, 2)):
        A = {f"m{j}": torch.randn(r, 24) for j in range(2)}
        BT = {f"m{j}": torch.randn(r, b.out_features) * (i + 1) for j, b in enumerate(bases)}
        ads.append(LoadedAdapter(key=f"k{i}", path="", rank=r, A=A, BT=BT))
    pack = LoRAPack.build(ads, {f"m{j}": lin for j, lin in enumerate(lins)}, torch.float32)
    keys = _layout_keys(layout)
    x = torch.randn(len(keys), 24)
    ctx.set(pack, keys, torch.float32)
    assert ctx.layout == layout.split("-")[0]
    with torch.inference_mode():
        got = [lin(x) for lin in lins]
    for j, (b, g) in enumerate(zip(bases, got)):
        ref = b(x).detach()
        for t, k in enumerate(keys):
            if k is not None:
                ad = ads[int(k[1])]
                ref[t] += (x[t] @ ad.A[f"m{j}"].T) @ ad.BT[f"m{j}"]
        assert torch.allclose(g, ref, atol=1e-5), (layout, j)


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
@pytest.mark.parametrize("vocab,softcap", [(1000, None), (1024, 500.0)])
def test_screened_head_argmax_equals_full_fp32_head(vocab, softcap, kind):
    """The bf16 (or fp16-weight) screen + fp32 recomputation returns the full fp32 head's argmax: on peaked rows, on
    rows whose top two logits differ by less than the bf16 rounding (both must survive the screen), on flat rows
    (fallback) and on a vocabulary that is not a multiple of the chunk size."""
    from gemtune.serve.engine_sampling import ScreenedHead, fp16_screen_available

    if kind == "fp16" and not fp16_screen_available():
        pytest.skip("FBGEMM's fp16 GEMM is not in this torch build (non-x86)")

    torch.manual_seed(0)
    w = torch.randn(vocab, 64)
    w[100:400] = w[100] + 1e-4 * torch.randn(300, 64)  # 300 near-identical tokens
    h = torch.randn(40, 64) * 3
    h[:10] = w[torch.arange(10) * 7] * 4  # peaked
    d = 0.05 * torch.randn(64)
    w[6] = w[5] + d  # rows 10-19: logit(6) - logit(5) = h.d = +-1e-4, far inside the bf16 rounding
    for i in range(10, 20):
        b = w[5] * 0.05 + 0.05 * torch.randn(64)
        h[i] = b - (float(b @ d) - 1e-4 * (-1) ** i) * d / float(d @ d)
    h[20:25] = w[100] * 3 + 1e-3 * torch.randn(5, 64)  # flat among tokens 100-399: too many candidates
    head = ScreenedHead(w, softcap, chunk=128, max_candidates=200, kind=kind)
    ref = torch.nn.functional.linear(h, w)
    if softcap:
        ref = torch.tanh(ref / softcap) * softcap
    got = head.argmax(h)
    assert got.tolist() == ref.argmax(-1).tolist()
    assert head.fallbacks >= 5  # the flat rows took the full head
    bf16_pick = torch.nn.functional.linear(h.bfloat16(), w.bfloat16()).float().argmax(-1)
    assert bool((bf16_pick[10:20] != ref.argmax(-1)[10:20]).any())  # a bf16 head alone gets some close calls wrong
    screen_pick = head._screen(h.bfloat16() if kind == "bf16" else h).float().argmax(-1)
    assert bool((screen_pick[10:20] != ref.argmax(-1)[10:20]).any())  # so does the screen alone: it is not enough


def test_fp16_screen_refuses_weights_beyond_fp16_range_and_the_engine_keeps_the_fp32_head():
    """FBGEMM would clamp a weight beyond fp16's range, and the screen's bound would no longer hold: refused."""
    from gemtune.serve.engine_sampling import ScreenedHead, fp16_screen_available

    if not fp16_screen_available():
        pytest.skip("FBGEMM's fp16 GEMM is not in this torch build (non-x86)")
    w = torch.randn(600, 32)
    head = ScreenedHead(w, kind="fp16")
    assert len(head.packed16) == 2 and head.dwmax > 0  # two row blocks (512 + 88), packed at once
    w[517, 3] = 1e5
    with pytest.raises(ValueError, match="fp16's range"):
        ScreenedHead(w, kind="fp16")


def test_thread_policy_narrows_small_steps_and_widens_gemms():
    """A small step runs on one thread, GEMMs inside it on all, a prefill-sized step on all throughout, and the
    thread count is restored after (also when the step raises)."""
    from gemtune.serve.threads import ThreadPolicy

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pol = ThreadPolicy(torch.device("cpu"))
        with pol.step(64):
            assert torch.get_num_threads() == 1
            with pol.wide():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pol.step(ThreadPolicy.SMALL_STEP_TOKENS):
            assert torch.get_num_threads() == 2
            with pol.wide():
                assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with pol.step(8):
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2 and not pol.narrow
        assert not ThreadPolicy(torch.device("meta")).enabled
    finally:
        torch.set_num_threads(before)
