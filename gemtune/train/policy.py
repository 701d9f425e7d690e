"""What a training run will do on the hardware it finds: device, dtype, gradient checkpointing, attention kernel,
4-bit storage. One function decides it, and both the trainer and `gemtune plan --config` ask it, so the plan
and the run cannot disagree.

- dtype `auto`: a bf16 base (LoRA weights and optimizer state stay fp32: PEFT upcasts the adapter) on a GPU that
  supports bf16; fp32 everywhere on a CPU. A CPU never computes in bf16 by default: without native bf16
  instructions (AVX512-BF16/AMX) torch emulates it, several times slower than fp32. The lean CPU path still
  *stores* frozen weights in bf16 (a conversion, not bf16 math; see `gemtune.train.lean`).
- gradient checkpointing `null` (auto): on for an accelerator (what `gemtune plan` assumes), off on a CPU
  (activation memory is bounded there by `micro_batch_tokens`; recomputing costs a third more compute).
- attention: `sdpa` by default; `flash_attention_2` when asked for and installed.
- QLoRA: NF4, double quantisation, compute in the run's dtype; on a GPU the 4-bit weights are stored in bf16
  containers (`bnb_4bit_quant_storage`) so FSDP can shard them alongside the bf16 rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from gemtune.errors import UserError


@dataclass(frozen=True)
class TrainPolicy:
    device: str  # "cpu", "cuda:0"
    dtype: str  # the base's weights and compute: "float32" | "bfloat16"
    adapter_dtype: str  # LoRA weights, gradients and AdamW state
    gradient_checkpointing: bool
    attn_implementation: str
    quant: Optional[str]
    quant_storage: Optional[str]  # bnb_4bit_quant_storage for QLoRA
    batch_size: int  # per device, per micro-step
    seq_len: int  # max_len: the longest row (packed or not)
    native_bf16: bool  # the device computes bf16 natively

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def record(self) -> dict:
        """What run.json and gemtune.json say the run resolved to."""
        return asdict(self)


def cpu_has_native_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16 or AMX); else torch emulates it."""
    try:
        from gemtune.base.device import cpu_has_native_bf16 as native  # the device policy shared by every stage
    except ImportError:
        try:
            flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return bool(native())


def device_supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return device.type in ("xpu", "mps", "meta")


def flash_attention_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_policy(cfg, device: torch.device | str, *, native_bf16: Optional[bool] = None) -> TrainPolicy:
    """The run `cfg` (a TrainConfig) starts on `device`. `native_bf16` overrides the probe (plan, tests)."""
    device = torch.device(device)
    native = device_supports_bf16(device) if native_bf16 is None else native_bf16
    accel = device.type != "cpu"
    if cfg.dtype == "auto":
        dtype = "bfloat16" if accel and native else "float32"
    else:
        dtype = cfg.dtype
    ckpt = accel if cfg.gradient_checkpointing is None else bool(cfg.gradient_checkpointing)
    attn = cfg.attn_implementation
    if attn == "auto":
        attn = "sdpa"
    elif attn == "flash_attention_2":
        if not accel:
            raise UserError("flash_attention_2 runs on a GPU only; use sdpa on a CPU", field="train.attn_implementation")
        if not flash_attention_installed():
            raise UserError("flash_attention_2 needs the flash-attn package (pip install flash-attn); or use sdpa",
                            field="train.attn_implementation")
    storage = None
    if cfg.quant:
        storage = "bfloat16" if accel and dtype == "bfloat16" else "uint8"
    dev = str(device) if device.index is not None or not accel else f"{device.type}:0"
    return TrainPolicy(device=dev, dtype=dtype, adapter_dtype="float32", gradient_checkpointing=ckpt,
                       attn_implementation=attn, quant=cfg.quant, quant_storage=storage, batch_size=cfg.batch_size,
                       seq_len=cfg.max_len, native_bf16=native)


def emulated_bf16_warning(policy: TrainPolicy) -> Optional[str]:
    if policy.dtype == "bfloat16" and not policy.native_bf16:
        return (f"train.dtype: bfloat16 on a {policy.device_type.upper()} without native bf16: torch emulates it, "
                "several times slower than float32 (use dtype: auto)")
    return None


def plan_assumptions(policy: TrainPolicy, *, rank: int, mlp: bool) -> dict:
    """The arguments `gemtune.train.plan.plan` takes for this run."""
    return {"method": "qlora" if policy.quant else "lora", "seq_len": policy.seq_len, "batch": policy.batch_size,
            "rank": rank, "mlp": mlp, "grad_ckpt": policy.gradient_checkpointing,
            "act_bytes": 2.0 if policy.dtype == "bfloat16" else 4.0,
            "weight_bytes": None if policy.quant else (2.0 if policy.dtype == "bfloat16" else 4.0)}
