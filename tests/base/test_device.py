"""The device policy: `device: auto | cpu | cuda[:N]`, `dtype: auto | bfloat16 | float32`, resolved the same way for
every stage. No GPU exists here, so CUDA's answers are monkeypatched: these tests check the decisions, not CUDA."""

import pytest
import torch

from gemtune.base import device as dv
from gemtune.errors import UserError


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture
def gpus(monkeypatch):
    """Pretend CUDA with `n` GPUs, bf16 support as given, current device 0."""

    def make(n: int = 2, bf16: bool = True, name: str = "NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(dv, "gpu_supports_bf16", lambda device: bf16)
        monkeypatch.setattr(dv, "gpu_name", lambda device: name)
        monkeypatch.delenv("LOCAL_RANK", raising=False)

    return make


def test_cpu_host_auto_is_cpu_fp32_even_with_native_bf16(no_gpu, monkeypatch):
    monkeypatch.setattr(dv, "cpu_has_native_bf16", lambda: True)
    p = dv.resolve()
    assert (p.device, p.dtype) == (torch.device("cpu"), torch.float32)
    assert dv.resolve("cpu", "bf16").dtype == torch.bfloat16  # explicit bf16 is honoured (load_base warns if emulated)
    d = p.describe()
    assert d["device"] == "cpu" and d["dtype"] == "float32" and d["requested"] == {"device": "auto", "dtype": "auto"}
    assert d["cpu_native_bf16"] is True and isinstance(d["cpu_capability"], str)
    assert p.cache_key() == {"device": "cpu", "dtype": "float32"}


def test_cuda_asked_for_on_a_cpu_host_is_a_user_error(no_gpu):
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=r'field "device".*CUDA is not available'):
            dv.resolve(spec)


def test_gpu_host_auto_is_the_local_ranks_gpu_in_bf16(gpus, monkeypatch):
    gpus(n=2, bf16=True)
    p = dv.resolve()
    assert (p.device, p.dtype) == (torch.device("cuda", 0), torch.bfloat16)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun / accelerate launch: second process on this machine
    assert dv.resolve().device == torch.device("cuda", 1)
    assert dv.resolve("cuda").device == torch.device("cuda", 1)  # "cuda" = the GPU auto would pick
    assert dv.resolve("cuda:0").device == torch.device("cuda", 0)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "3")  # one visible GPU per process (CUDA_VISIBLE_DEVICES): the current one
    assert dv.resolve().device == torch.device("cuda", 0)
    assert dv.resolve("cpu").device == torch.device("cpu") and dv.resolve("cpu").dtype == torch.float32
    with pytest.raises(UserError, match=r"only 2 GPU"):
        dv.resolve("cuda:2")
    key = dv.resolve("cuda:1", "float32").cache_key()
    assert key == {"device": "cuda", "dtype": "float32", "gpu": "NVIDIA H100 80GB HBM3"}
    assert dv.resolve("cuda:0").cache_key() == dv.resolve("cuda:1").cache_key()  # same outputs on either GPU


def test_gpu_without_bf16_gets_fp32_and_refuses_explicit_bf16(gpus):
    gpus(n=1, bf16=False, name="Tesla V100")
    assert dv.resolve().dtype == torch.float32
    with pytest.raises(UserError, match=r'field "dtype".*V100.*no bfloat16'):
        dv.resolve("auto", "bfloat16")


@pytest.mark.parametrize("bad", ["float16", "fp16", "half", torch.float16])
def test_fp16_is_refused_everywhere(bad, no_gpu):
    with pytest.raises(UserError, match="fp16 overflows"):
        dv.resolve("cpu", bad)
    with pytest.raises(ValueError, match="fp16 overflows"):
        dv.check_dtype_spec(bad)


def test_spellings():
    assert [dv.check_dtype_spec(s) for s in ("auto", "bf16", "BFloat16", "fp32", "float32", torch.bfloat16)] == [
        "auto", "bfloat16", "bfloat16", "float32", "float32", "bfloat16"]
    assert [dv.check_device_spec(s) for s in ("auto", "CPU", "cuda", "cuda:3")] == ["auto", "cpu", "cuda", "cuda:3"]
    for bad in ("tpu", "cuda:x", "cuda:", "mps", "", 3):
        with pytest.raises(ValueError):
            dv.check_device_spec(bad)
    for bad in ("int8", "float64", torch.float64):
        with pytest.raises(ValueError):
            dv.check_dtype_spec(bad)


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Some CPU
flags\t\t: fpu sse2 avx2 {extra}
"""


@pytest.mark.parametrize("flags,capability,onednn,native", [
    ("avx512f avx512_bf16", "AVX512", True, True),
    ("avx512f amx_bf16 amx_tile", "AVX512", True, True),
    ("avx512f", "AVX512", True, False),  # AVX-512 without BF16: emulated
    ("", "AVX2", False, False),  # the AVX2-only EPYC of issue #14
    ("avx512f avx512_bf16", "AVX2", True, False),  # ATEN_CPU_CAPABILITY=avx2: torch may not use them
    ("avx512f avx512_bf16", "AVX512", False, False),  # ONEDNN_MAX_CPU_ISA=AVX2: oneDNN may not
    ("avx512f avx512_bf16", "AVX512", None, True),  # a build that cannot ask oneDNN: the flags decide
])
def test_cpu_has_native_bf16(flags, capability, onednn, native, monkeypatch):
    monkeypatch.setattr(dv, "_cpuinfo_text", lambda: CPUINFO.format(extra=flags))
    monkeypatch.setattr(dv, "cpu_capability", lambda: capability)
    monkeypatch.setattr(dv, "_onednn_bf16", lambda: onednn)
    monkeypatch.setattr(dv.platform, "machine", lambda: "x86_64")
    assert dv.cpu_has_native_bf16() is native
    assert dv.cpu_name() == "Some CPU"


def test_parse_cpu_flags_and_this_machine():
    assert dv.parse_cpu_flags(CPUINFO.format(extra="avx512_bf16")) >= {"avx2", "avx512_bf16"}
    assert dv.parse_cpu_flags("Features\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    assert dv.parse_cpu_flags("") == frozenset()
    assert isinstance(dv.cpu_has_native_bf16(), bool)  # whatever this CPU is, the real probe answers


def test_placement_of_a_model_follows_its_weights():
    from gemtune.base.tiny import tiny_model

    m = tiny_model("gemma3")
    assert dv.placement_of(m).cache_key() == {"device": "cpu", "dtype": "float32"}
    m = m.to(torch.bfloat16)
    assert dv.placement_of(m).dtype == torch.bfloat16
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        from gemtune.base.tiny import tiny_config

        meta = AutoModelForCausalLM.from_config(tiny_config("gemma3"))
    assert dv.model_device(meta) == torch.device("meta")


def test_load_base_puts_the_model_where_asked(tiny_gemma3, no_gpu, capsys, monkeypatch):
    from gemtune.base.loader import load_base

    m, _ = load_base(tiny_gemma3, device="auto", dtype="auto")
    assert dv.placement_of(m).cache_key() == {"device": "cpu", "dtype": "float32"}
    monkeypatch.setattr(dv, "cpu_has_native_bf16", lambda: False)
    import gemtune.base.loader as loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    m, _ = load_base(tiny_gemma3, device="cpu", dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    assert "bfloat16 on this CPU is emulated" in capsys.readouterr().err
    with pytest.raises(UserError, match='field "device"'):
        load_base(tiny_gemma3, device="cuda")
