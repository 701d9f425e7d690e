"""The engine picks its LM head's dtypes and kernels from what the CPU computes natively (issue #14).

On a CPU without native bf16 (AVX2-only, or torch capped to AVX2 with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA) a
bf16 GEMM is emulated and runs several times slower than fp32: no bf16 tensor may reach a matmul in a decode step,
and greedy outputs stay exactly the fp32 reference's (PEFT, one adapter at a time); the fp32 head is screened there
with FBGEMM's fp16-weight GEMM (fp32 FMAs). Where bf16 is native, the fp32 head's greedy argmax is screened in bf16
(both exact, see engine_sampling).

The matmul check wraps every op the scheduler thread dispatches (a TorchDispatchMode entered in that thread around
each step) and records the dtypes of the tensors handed to matmul-family ops — oneDNN's `_linear_pointwise`
included.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gemtune.base import device as device_policy
from gemtune.base.tiny import char_id
from gemtune.serve.engine import Engine, GenRequest

N_TOKENS = 12
TEXTS = ["hello there", "abc", "the quick brown fox jumps over the lazy dog", "x"]


def prompt(text: str) -> list[int]:
    """A chat-shaped prompt in the tiny char-level vocabulary (as tests/serve/test_engine.py)."""
    return [2, 105] + [char_id(c) for c in text] + [106, char_id("\n"), 105]


def is_matmul(name: str) -> bool:
    """aten mm/addmm/bmm/baddbmm/matmul/linear/mv/dot, oneDNN's _linear_pointwise / mkldnn_linear, _int_mm."""
    return "mm" in name or "linear" in name or "matmul" in name or name in ("mv", "addmv", "dot", "vdot")


class MatmulDtypes(TorchDispatchMode):
    """Records (op, dtypes of its floating tensor arguments) for every matmul-family op dispatched under it."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if is_matmul(name):
            dts = {a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.append((name, dts))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def adapters(tiny_gemma3, tmp_path_factory):
    from gemtune.registry.synthetic import make_random_adapters

    d = tmp_path_factory.mktemp("cpu-kinds-adapters")
    paths = make_random_adapters(tiny_gemma3, [d / "a0", d / "a1"], r=4, scale=4.0, seeds=[40, 41])
    return dict(zip(("a0", "a1"), paths))


@pytest.fixture(scope="module")
def reference(tiny_gemma3, adapters):
    """fp32 greedy outputs of PEFT with one adapter active at a time (or the plain base), Hugging Face generate."""
    from peft import PeftModel

    from gemtune.base.loader import load_base

    model, _ = load_base(tiny_gemma3, dtype="float32")
    peft = PeftModel.from_pretrained(model, adapters["a0"], adapter_name="a0")
    peft.load_adapter(adapters["a1"], adapter_name="a1")
    out = {}
    with torch.inference_mode():
        for t in TEXTS:
            for a in (None, "a0", "a1"):
                x = torch.tensor([prompt(t)])
                if a is None:
                    with peft.disable_adapter():
                        y = peft.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=N_TOKENS,
                                          do_sample=False, eos_token_id=None, pad_token_id=0)
                else:
                    peft.set_adapter(a)
                    y = peft.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=N_TOKENS,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
                out[(t, a)] = y[0, x.shape[1]:].tolist()
    assert len({tuple(v) for v in out.values()}) > len(TEXTS)  # the adapters change the outputs
    return out


def run_engine(base, adapters, native: bool, monkeypatch) -> tuple[dict, dict, list]:
    """Generate every (prompt, adapter) combination in mixed batches with cpu_has_native_bf16 patched to
    `native`; return (outputs, stats, matmul dtypes seen during the steps)."""
    monkeypatch.setattr(device_policy, "cpu_has_native_bf16", lambda: native)
    seen: list = []
    combos = [(t, a) for t in TEXTS for a in (None, "a0", "a1")]
    with Engine(base, max_batch=6, max_model_len=128) as eng:
        for k, p in adapters.items():
            eng.load_adapter(k, p)
        step = eng._step

        def watched_step(pack):  # runs in the scheduler thread: the mode is entered there
            with MatmulDtypes(seen):
                step(pack)

        eng._step = watched_step
        handles = [eng.submit(GenRequest(prompt(t), a, N_TOKENS, ignore_eos=True)) for t, a in combos]
        outs = {c: h.result(timeout=300)[1] for c, h in zip(combos, handles)}
        stats = eng.stats()
    return outs, stats, seen


@pytest.mark.parametrize("fp16_screen", [True, False], ids=["fp16-screen", "fp32-head"])
def test_without_native_bf16_no_bf16_reaches_a_matmul_and_greedy_equals_fp32(tiny_gemma3, adapters, reference,
                                                                              monkeypatch, fp16_screen):
    """Where bf16 is emulated the head is screened with FBGEMM's fp16-weight GEMM (fp32 activations) and confirmed
    in fp32; without FBGEMM it is the plain fp32 head. Either way greedy outputs are the fp32 reference's."""
    from gemtune.serve import engine_sampling

    if fp16_screen and not engine_sampling.fp16_screen_available():
        pytest.skip("FBGEMM's fp16 GEMM is not in this torch build (non-x86)")
    if not fp16_screen:
        monkeypatch.setattr(engine_sampling, "fp16_screen_available", lambda: False)
    outs, stats, seen = run_engine(tiny_gemma3, adapters, False, monkeypatch)
    assert stats["compute"]["lm_head"] == ("fp16-screen" if fp16_screen else "fp32")
    assert any(name == "linear_dynamic_fp16" for name, _ in seen) == fp16_screen  # the screen's GEMM ran (or not)
    assert stats["compute"]["native_bf16"] is False and stats["compute"]["dtype"] == "float32"
    assert len(seen) > 100  # the recorder saw the steps' GEMMs (base linears, LoRA, attention, head)
    bf16 = sorted({name for name, dts in seen if torch.bfloat16 in dts})
    assert bf16 == [], f"bf16 tensors reached {bf16} on a CPU that only emulates bf16"
    assert all(dts <= {torch.float32} for _, dts in seen)
    for combo, ids in outs.items():
        assert ids == reference[combo], combo


def test_with_native_bf16_the_greedy_head_is_screened_in_bf16_and_stays_exact(tiny_gemma3, adapters, reference,
                                                                             monkeypatch):
    outs, stats, seen = run_engine(tiny_gemma3, adapters, True, monkeypatch)
    assert stats["compute"]["lm_head"] == "bf16-screen"
    assert stats["compute"]["native_bf16"] is True
    assert any(torch.bfloat16 in dts for _, dts in seen)  # the screen's GEMM
    for combo, ids in outs.items():
        assert ids == reference[combo], combo


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX2 caps are x86 settings")
def test_torch_capped_to_avx2_is_seen_as_emulated_bf16_and_takes_the_fp16_screen(tiny_gemma3):
    """The real switch, no patching: a fresh process with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (how an
    AVX2-only CPU is emulated on an AVX-512 one) reports no native bf16 and the engine screens its fp32 head with
    FBGEMM's fp16-weight GEMM there (fp32 FMAs: nothing emulated)."""
    code = textwrap.dedent(f"""
        import json
        from gemtune.base import device
        from gemtune.serve.engine import Engine
        eng = Engine({str(tiny_gemma3)!r}, max_batch=2, max_model_len=64)
        print(json.dumps({{"native": device.cpu_has_native_bf16(), "cap": device.cpu_capability(),
                           "compute": eng.stats()["compute"]}}))
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["native"] is False and got["cap"] == "AVX2"
    assert got["compute"]["lm_head"] == "fp16-screen" and got["compute"]["native_bf16"] is False
    assert got["compute"]["cpu_capability"] == "AVX2"
