"""One device policy for every stage: where a model runs and in which dtype.

Every stage that loads a model reads two options, `device` and `dtype`, and resolves them here into a `Placement`:

- `device: auto | cpu | cuda | cuda:N`. auto = this process's GPU when CUDA is available (under accelerate or
  torchrun the local rank's: `LOCAL_RANK`; when each process sees one GPU, that one), else the CPU. `cuda` without
  an index is the same GPU auto would pick.
- `dtype: auto | bfloat16 | float32` (bf16/fp32 accepted). auto = bf16 on a GPU that supports it, fp32 on a GPU
  that does not, and fp32 on a CPU. fp16 is refused everywhere: Gemma's activations overflow it.

A CPU computes bf16 natively only with AVX512-BF16 or AMX instructions (and only when torch is allowed to use them:
`ATEN_CPU_CAPABILITY=avx2` or `ONEDNN_MAX_CPU_ISA=AVX2` take them away); elsewhere torch emulates bf16 and a bf16
matmul runs several times slower than fp32. `cpu_has_native_bf16()` tells; auto never picks bf16 on a CPU, and an
explicit bf16 on an emulating CPU is honoured with a warning (`load_base`).

`Placement.describe()` is what outputs record (eval results and summaries, probe reports), and
`Placement.cache_key()` is what the eval output cache keys on, so CPU and GPU outputs (or fp32 and bf16 ones)
never mix.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import dataclass
from typing import Optional

import torch

from gemtune.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPE_CHOICES = "auto, bfloat16 or float32"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
FP16 = ("float16", "fp16", "half")
FP16_MESSAGE = "fp16 overflows in Gemma's activations; use bfloat16 or float32"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; aarch64 lists "bf16" in its Features line


# ------------------------------------------------------------------------------------------------ parsing
def check_device_spec(spec: str) -> str:
    """The canonical form of a `device` option, or ValueError (config validators turn it into file:line)."""
    if not isinstance(spec, str):
        raise ValueError(f"expected {DEVICE_CHOICES}, got {spec!r}")
    s = spec.strip().lower()
    if s in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", s):
        return s
    raise ValueError(f"unknown device {spec!r}; expected {DEVICE_CHOICES}")


def check_dtype_spec(spec: str) -> str:
    """The canonical form of a `dtype` option ("auto", "bfloat16", "float32"), or ValueError; fp16 is refused."""
    if isinstance(spec, torch.dtype):
        if spec == torch.float16:
            raise ValueError(FP16_MESSAGE)
        if spec in (torch.float32, torch.bfloat16):
            return str(spec).removeprefix("torch.")
        raise ValueError(f"unsupported dtype {spec}; expected {DTYPE_CHOICES}")
    if not isinstance(spec, str):
        raise ValueError(f"expected {DTYPE_CHOICES}, got {spec!r}")
    s = spec.strip().lower()
    if s in FP16:
        raise ValueError(FP16_MESSAGE)
    if s == "auto":
        return s
    if s not in DTYPES:
        raise ValueError(f"unknown dtype {spec!r}; expected {DTYPE_CHOICES}")
    return str(DTYPES[s]).removeprefix("torch.")


def _user_error(e: ValueError, field: str) -> UserError:
    return UserError(str(e), field=field)


# ------------------------------------------------------------------------------------------------ the CPU
@functools.lru_cache(maxsize=1)
def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The instruction-set flags of the first processor in a /proc/cpuinfo text (x86 `flags`, arm `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    return parse_cpu_flags(_cpuinfo_text())


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels use here ("AVX512", "AVX2", "DEFAULT", ...); `ATEN_CPU_CAPABILITY`
    lowers it."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - an old or unusual build: assume the plainest kernels
        return "DEFAULT"


def _onednn_bf16() -> Optional[bool]:
    """oneDNN's own answer (it honours `ONEDNN_MAX_CPU_ISA`); None when this torch build cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private op, absent from some builds
        return None


def cpu_name() -> str:
    for line in _cpuinfo_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "cpu"


def cpu_has_native_bf16() -> bool:
    """True when bf16 matmuls run in hardware here: the CPU has AVX512-BF16 or AMX-BF16 (x86) or BF16 (arm) and
    torch may use them (its kernels are not capped below AVX-512 by `ATEN_CPU_CAPABILITY`, oneDNN is not capped by
    `ONEDNN_MAX_CPU_ISA`). False means bf16 is emulated and slower than fp32: pick fp32 kernels."""
    flags = cpu_flags()
    cap = cpu_capability().upper()
    if platform.machine().lower() in ("aarch64", "arm64"):
        hw = "bf16" in flags
    else:
        hw = any(f in flags for f in NATIVE_BF16_FLAGS) and cap.startswith("AVX512")
    if not hw:
        return False
    onednn = _onednn_bf16()
    return True if onednn is None else onednn


# ------------------------------------------------------------------------------------------------ resolving
def local_rank() -> Optional[int]:
    """This process's rank on its machine under accelerate/torchrun (`LOCAL_RANK`), None when not launched so."""
    v = os.environ.get("LOCAL_RANK")
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        return None


def _process_gpu() -> torch.device:
    """The GPU this process should use: its local rank's when that index exists, else the current one (each
    process may see exactly one GPU through CUDA_VISIBLE_DEVICES)."""
    n = torch.cuda.device_count()
    rank = local_rank()
    if rank is not None and 0 <= rank < n:
        return torch.device("cuda", rank)
    return torch.device("cuda", torch.cuda.current_device())


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """A `device` option as a torch.device; UserError for a GPU that is not there."""
    if isinstance(spec, torch.device):
        return spec
    try:
        s = check_device_spec(spec)
    except ValueError as e:
        raise _user_error(e, "device") from None
    if s == "cpu":
        return torch.device("cpu")
    cuda = torch.cuda.is_available()
    if s == "auto":
        return _process_gpu() if cuda else torch.device("cpu")
    if not cuda:
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise UserError(f"device {s!r} asked for, but CUDA is not available ({build}); use auto or cpu",
                        field="device")
    if s == "cuda":
        return _process_gpu()
    index = int(s.split(":")[1])
    if index >= torch.cuda.device_count():
        raise UserError(f"device {s!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible",
                        field="device")
    return torch.device("cuda", index)


def gpu_supports_bf16(device: torch.device) -> bool:
    try:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001 - a GPU torch cannot query: take the safe dtype
        return False


def resolve_dtype(spec: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """A `dtype` option as a torch.dtype for `device`. auto: bf16 on a GPU with bf16, else fp32 (always fp32 on a
    CPU). An explicit bf16 on a GPU without bf16 is refused (it would run in emulation or fail)."""
    try:
        s = check_dtype_spec(spec)
    except ValueError as e:
        raise _user_error(e, "dtype") from None
    device = torch.device(device)
    if s == "auto":
        if device.type == "cuda" and gpu_supports_bf16(device):
            return torch.bfloat16
        return torch.float32
    dtype = DTYPES[s]
    if dtype == torch.bfloat16 and device.type == "cuda" and not gpu_supports_bf16(device):
        raise UserError(f"this GPU ({gpu_name(device)}) has no bfloat16; use float32 (fp16 is not an option for "
                        "Gemma)", field="dtype")
    return dtype


def gpu_name(device: torch.device) -> Optional[str]:
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001
        return None


@dataclass(frozen=True)
class Placement:
    """Where a model runs and in which dtype, with what was asked for (auto or explicit)."""

    device: torch.device
    dtype: torch.dtype
    requested_device: str = "auto"
    requested_dtype: str = "auto"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def device_name(self) -> Optional[str]:
        if self.device.type == "cuda":
            return gpu_name(self.device)
        if self.device.type == "cpu":
            return cpu_name()
        return None

    def describe(self) -> dict:
        """What outputs record: the device and dtype used, the hardware, and what was asked for."""
        d = {"device": str(self.device), "dtype": self.dtype_name, "device_name": self.device_name,
             "requested": {"device": self.requested_device, "dtype": self.requested_dtype}}
        if self.device.type == "cpu":
            d["cpu_capability"] = cpu_capability()
            d["cpu_native_bf16"] = cpu_has_native_bf16()
        return d

    def cache_key(self) -> dict:
        """The part of an output-cache key that depends on the hardware: device kind (the GPU's name on a GPU:
        kernels differ between GPU generations) and dtype. The GPU index is left out: cuda:0 and cuda:1 of one
        machine give the same outputs."""
        key = {"device": self.device.type, "dtype": self.dtype_name}
        if self.device.type == "cuda":
            key["gpu"] = self.device_name
        return key


def resolve(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Placement:
    """The `device`/`dtype` options of a stage as a Placement (UserError naming `device` or `dtype` when not
    possible here)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    req_dev = str(device) if isinstance(device, torch.device) else check_device_spec(device)
    req_dt = check_dtype_spec(dtype)
    return Placement(dev, dt, req_dev, req_dt)


# ------------------------------------------------------------------------------------------------ a model
def model_device(model) -> torch.device:
    """Where a model's inputs go: the input embeddings' device (the first layer's, for a model dispatched over
    several devices), else `model.device`, else its first parameter's."""
    try:
        emb = model.get_input_embeddings()
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor):
            return w.device
    except (AttributeError, NotImplementedError):
        pass
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    """The compute dtype of a model: its input embeddings' (a bf16 base keeps bf16 there even with fp32 LoRA
    weights attached and with 4-bit linear layers), else `model.dtype`."""
    try:
        w = getattr(model.get_input_embeddings(), "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            return w.dtype
    except (AttributeError, NotImplementedError):
        pass
    dt = getattr(model, "dtype", None)
    return dt if isinstance(dt, torch.dtype) else next(model.parameters()).dtype


def placement_of(model) -> Placement:
    """The Placement a loaded model actually has (requested = what it has)."""
    dev, dt = model_device(model), model_dtype(model)
    return Placement(dev, dt, str(dev), str(dt).removeprefix("torch."))
