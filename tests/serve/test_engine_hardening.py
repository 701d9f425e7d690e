"""The engine under hostile and noisy requests (issue #12): one request's values never hurt another's.

Determinism: where a test needs several requests to meet in one admission pass it holds the engine's (re-entrant)
lock while submitting them, so the scheduler sees them together whatever the machine's speed; the scheduler's
decisions depend only on its state, never on time.
"""

from __future__ import annotations

import shutil

import pytest

from gemtune.base.tiny import char_id
from gemtune.errors import UserError
from gemtune.serve.engine import AdapterError, Engine, GenRequest, RequestFailed


def prompt(text: str) -> list[int]:
    """A chat-shaped prompt in the tiny char-level vocabulary (as tests/serve/test_engine.py)."""
    return [2, 105] + [char_id(c) for c in text] + [106, char_id("\n"), 105]


@pytest.fixture(scope="module")
def ads(tiny_gemma3, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from gemtune.registry.synthetic import make_random_adapters

    d = tmp_path_factory.mktemp("hardening-adapters")
    out = dict(zip(("a0", "a1", "a2"), make_random_adapters(tiny_gemma3, [d / f"a{i}" for i in range(3)], r=4,
                                                               scale=4.0, seeds=[30, 31, 32])))
    # a diverged adapter: finite weights (it passes validation) whose deltas overflow float32 in its own rows
    shutil.copytree(out["a0"], d / "hot")
    w = d / "hot" / "adapter_model.safetensors"
    save_file({k: t * 1e24 for k, t in load_file(str(w)).items()}, str(w))
    out["hot"] = d / "hot"
    return out


def together(eng: Engine, reqs: list[GenRequest]):
    """Submit requests so that the scheduler sees them all in its next admission pass."""
    with eng._cv:
        return [eng.submit(r) for r in reqs]


def test_degenerate_temperature_is_greedy_and_cannot_fail_a_batch(tiny_gemma3):
    """temperature 1e-50 used to divide the logits into inf, multinomial raised inside the shared step, and every
    request in the batch failed: now it is greedy (below 1e-5, as vLLM), and the victim's output is its own."""
    victim = GenRequest(prompt("victim here"), None, 24, ignore_eos=True, tenant="victim")
    with Engine(tiny_gemma3, max_batch=4, max_model_len=128) as eng:
        alone = eng.submit(victim).result(timeout=120)[1]
        hostile_greedy = eng.submit(GenRequest(prompt("attack"), None, 24, ignore_eos=True)).result(timeout=120)[1]
        hs = together(eng, [victim] + [GenRequest(prompt("attack"), None, 24, temperature=t, seed=1,
                                                  ignore_eos=True, tenant="hostile")
                                       for t in (1e-50, 5e-324, 9.99e-6)])
        got = [h.result(timeout=120)[1] for h in hs]
        assert got[0] == alone
        assert got[1:] == [hostile_greedy] * 3
        # very large temperatures are finite too (uniform-ish), never a failure
        big = eng.submit(GenRequest(prompt("attack"), None, 8, temperature=1e308, seed=3, ignore_eos=True))
        assert len(big.result(timeout=120)[1]) == 8
        for bad in (float("inf"), float("nan"), -1.0, "1", True, None):
            with pytest.raises(UserError, match="temperature"):
                eng.submit(GenRequest(prompt("x"), None, 4, temperature=bad))
        for bad in (float("nan"), 0.0, 1.5, float("inf"), "0.5"):
            with pytest.raises(UserError, match="top_p"):
                eng.submit(GenRequest(prompt("x"), None, 4, temperature=1.0, top_p=bad))
        assert eng.stats()["requests_finished"]["error"] == 0


def test_a_row_whose_numbers_fail_fails_alone(tiny_gemma3, ads):
    """A row that cannot get a token (here: an adapter whose deltas overflow to inf/NaN; greedy and sampled) ends
    with RequestFailed; the victims sharing its steps get exactly their solo outputs, and so do later requests
    that reuse its KV-cache row."""
    victims = [GenRequest(prompt("victim one"), None, 20, ignore_eos=True),
               GenRequest(prompt("victim two"), "a0", 20, ignore_eos=True),
               GenRequest(prompt("victim three"), None, 20, temperature=0.8, seed=7, ignore_eos=True)]
    with Engine(tiny_gemma3, max_batch=5, max_model_len=128) as eng:
        eng.load_adapter("a0", ads["a0"])
        eng.load_adapter("hot", ads["hot"])
        alone = [eng.submit(v).result(timeout=120)[1] for v in victims]
        boom = prompt("boom " * 12)  # longer than the victims: its stale cache slots lie beyond their lengths
        hostile = [GenRequest(boom, "hot", 20, ignore_eos=True),
                   GenRequest(boom, "hot", 20, temperature=1.0, seed=1, ignore_eos=True)]
        hs = together(eng, victims[:2] + hostile + victims[2:])
        assert [h.result(timeout=120)[1] for h in hs[:2] + hs[4:]] == alone
        for h in hs[2:4]:
            with pytest.raises(RequestFailed) as exc:
                h.result(timeout=120)
            assert exc.value.reason == "numerics"
        # the failed rows' cache rows are reused by new requests: still exact
        again = together(eng, victims * 2)
        assert [h.result(timeout=120)[1] for h in again] == alone * 2
        st = eng.stats()
    assert st["requests_finished"]["error"] == 2
    assert st["adapter_refs"] == {"a0": 0, "hot": 0} and st["running"] == 0 and st["queue_depth"] == 0


def test_out_of_range_seeds_leak_nothing(tiny_gemma3, ads):
    """Seeds that torch cannot take used to raise after the adapter's reference was taken: the slot leaked and a
    2-slot server refused everyone. Now: any seed in [-2^63, 2^64) works (negative ones wrap as torch does), others
    are a clean UserError, and no request leaves a reference behind."""
    with Engine(tiny_gemma3, max_batch=2, max_loras=2, max_model_len=128) as eng:
        eng.load_adapter("a0", ads["a0"])
        eng.load_adapter("a1", ads["a1"])
        sampled = dict(prompt_ids=prompt("seed"), adapter="a0", max_tokens=12, temperature=1.0, ignore_eos=True)
        wrapped = eng.submit(GenRequest(**sampled, seed=-1)).result(timeout=120)[1]
        assert eng.submit(GenRequest(**sampled, seed=2**64 - 1)).result(timeout=120)[1] == wrapped
        assert len(eng.submit(GenRequest(**sampled, seed=2**63)).result(timeout=120)[1]) == 12
        for bad in (2**64 + 5, 2**64, -(2**63) - 1, 10**5000, 1.5, True, "7"):
            for temperature in (1.0, 0.0):
                with pytest.raises(UserError, match="seed"):
                    eng.submit(GenRequest(**{**sampled, "temperature": temperature}, seed=bad))
        with pytest.raises(AdapterError):
            eng.submit(GenRequest(prompt("x"), "nope", 4))
        st = eng.stats()
        assert st["adapter_refs"] == {"a0": 0, "a1": 0} and st["queue_depth"] == 0
        # nothing pinned: a third adapter takes the least recently used one's place; victims are served on both
        eng.load_adapter("a2", ads["a2"])
        assert eng.loaded_adapters() == ["a0", "a2"]
        for a in ("a0", "a2"):
            assert eng.submit(GenRequest(prompt("victim"), a, 6, ignore_eos=True)).result(timeout=120)[2] == "length"
        assert eng.stats()["adapter_refs"] == {k: 0 for k in eng.loaded_adapters()}


def test_hot_load_with_every_slot_busy_then_serves_when_a_slot_frees(tiny_gemma3, ads):
    """The operator's hot-load succeeds while every engine slot serves requests (it used to answer QueueFull:
    the load-test flake); a request for it waits in the queue, not refused, and runs once a slot frees."""
    with Engine(tiny_gemma3, max_batch=4, max_loras=2, max_model_len=512) as eng:
        eng.load_adapter("a0", ads["a0"])
        eng.load_adapter("a1", ads["a1"])
        with eng._cv:  # the scheduler admits nothing until we let go: both adapters are pinned during the load
            busy = [eng.submit(GenRequest(prompt(f"busy {a}"), a, 480, ignore_eos=True)) for a in ("a0", "a1")]
            eng.load_adapter("a2", ads["a2"])
            waiting = eng.submit(GenRequest(prompt("new adapter"), "a2", 16, ignore_eos=True))
        assert sorted(eng.loaded_adapters()) == ["a0", "a1", "a2"]
        next(iter(busy[0]))
        with eng._cv:
            if not (busy[0].done or busy[1].done):  # (480 tokens each: practically always) a row free, no slot
                st = eng.stats()
                assert waiting.admitted is None and st["queue_depth"] == 1 and st["running"] == 2
                assert sorted(st["slot_adapters"]) == ["a0", "a1"]
        busy[0].cancel()
        got = waiting.result(timeout=120)[1]
        busy[1].cancel()
        for h in busy:
            h.result(timeout=120)
        assert waiting.admitted > max(h.admitted for h in busy)
        assert eng.submit(GenRequest(prompt("new adapter"), "a2", 16, ignore_eos=True)).result(timeout=120)[1] == got
        base = eng.submit(GenRequest(prompt("new adapter"), None, 16, ignore_eos=True)).result(timeout=120)[1]
        assert got != base  # it really ran with a2
        assert eng.stats()["adapter_refs"] == {k: 0 for k in eng.loaded_adapters()}


def test_admission_is_round_robin_across_tenants(tiny_gemma3):
    """One tenant flooding the queue gets one row in turn with each other tenant, not all rows first."""
    with Engine(tiny_gemma3, max_batch=1, max_model_len=128) as eng:
        reqs = [GenRequest(prompt(f"A{i}"), None, 2, ignore_eos=True, tenant="A") for i in range(6)]
        reqs += [GenRequest(prompt(f"B{i}"), None, 2, ignore_eos=True, tenant="B") for i in range(3)]
        reqs += [GenRequest(prompt("shared"), None, 2, ignore_eos=True)]  # tenant None: one shared bucket
        hs = together(eng, reqs)
        for h in hs:
            h.result(timeout=120)
    order = [name for _, name in sorted((h.admitted, r.tenant or "-") for h, r in zip(hs, reqs))]
    assert order == ["A", "B", "-", "A", "B", "A", "B", "A", "A", "A"]
    # within a tenant: first in, first out
    a_admitted = [h.admitted for h, r in zip(hs, reqs) if r.tenant == "A"]
    assert a_admitted == sorted(a_admitted)


def test_an_adapter_waiting_for_a_slot_is_not_starved(tiny_gemma3, ads):
    """Tenant A keeps both engine slots busy with a stream of a0/a1 requests of staggered lengths (4 rows, 2 slots:
    whenever a row frees, both adapters still have running rows); tenant B's request for a third adapter reserves
    the slot that drains first (no new rows go there), so it runs after a few of A's rows, not after A's whole
    queue (without the reservation it is admitted last)."""
    with Engine(tiny_gemma3, max_batch=4, max_loras=2, max_cpu_loras=3, max_model_len=256) as eng:
        for k in ("a0", "a1", "a2"):
            eng.load_adapter(k, ads[k])
        flood = [GenRequest(prompt(f"A{i}"), ("a0", "a1")[i % 2], 12 + (5 * i) % 17, ignore_eos=True, tenant="A")
                 for i in range(16)]
        first_b = GenRequest(prompt("B first"), "a0", 3, ignore_eos=True, tenant="B")
        wanted = GenRequest(prompt("B wants a2"), "a2", 3, ignore_eos=True, tenant="B")
        hs = together(eng, flood + [first_b, wanted])
        for h in hs:
            h.result(timeout=300)
        assert eng.stats()["adapter_refs"] == {"a0": 0, "a1": 0, "a2": 0}
    w = hs[-1].admitted
    assert w <= 8, [h.admitted for h in hs]
    assert sum(h.admitted > w for h in hs[:16]) >= 10, [h.admitted for h in hs]
