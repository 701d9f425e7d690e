"""`train:` section of gemtune.yaml. Every preset field can be overridden here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gemtune.config import load_section, project_base, read_section, validate
from gemtune.errors import UserError

VLLM_RANKS = (8, 16, 32, 64, 128, 256)


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: Optional[int] = None
    alpha: Optional[int] = None
    dropout: Optional[float] = Field(None, ge=0.0, lt=1.0)
    target_modules: Optional[list[str]] = None

    @field_validator("r")
    @classmethod
    def _rank(cls, v):
        if v is not None and v not in VLLM_RANKS:
            raise ValueError(f"rank must be one of {VLLM_RANKS} so the adapter loads in vLLM")
        return v


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = "gemma-3-270m"
    preset: str = "default"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    lr: Optional[float] = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    max_len: int = Field(1024, ge=16)
    packing: bool = Field(True, description="pack examples into rows of max_len (no padding); examples never attend "
                          "to each other, so the loss equals the unpacked one")
    micro_batch_tokens: Optional[int | Literal["auto"]] = Field(
        "auto", description="split each device batch into micro-batches of at most this many tokens (padded "
        "tokens without packing, packed tokens with it; an example longer than the budget goes alone); bounds "
        "activation memory without changing the math (the loss is a global token sum). `auto`: 1024 on a CPU, "
        "no split on a GPU (size batch_size x max_len with `gemtune plan`); null: never split")
    seed: int = 42
    save_every: Optional[int] = Field(None, ge=1)
    save_total_limit: Optional[int] = Field(None, ge=1)
    eval_every: Optional[int] = Field(None, ge=1, description="run the eval hook every N steps (at a checkpoint)")
    eval_loss_every: Optional[int] = Field(None, ge=1)
    early_stopping_patience: Optional[int] = Field(None, ge=1)
    loss_chunk: int = Field(256, ge=16, description="supervised positions per lm_head chunk")
    device: str = Field("auto", description="auto (the GPU accelerate assigns this process, else the CPU), cpu, "
                        "cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="the base's dtype: auto = bfloat16 on a GPU that supports it (LoRA weights and "
        "optimizer stay float32), float32 on a CPU (no emulated bf16 math)")
    quant: Optional[Literal["4bit"]] = None
    gradient_checkpointing: Optional[bool] = Field(None, description="null = on for a GPU (as `gemtune plan` "
                                                   "assumes), off on a CPU")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto = sdpa; flash_attention_2 on a GPU with flash-attn installed")
    lean: bool = Field(True, description="memory-lean LoRA/MLP autograd on the frozen base (fp32 math, less saved "
                       "state); each replaced module is checked against the stock forward first")
    frozen_storage: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="storage dtype of the frozen base weights; auto = bfloat16 when computing in float32 "
        "without quantisation or sharding (matmuls still run in float32)")
    report_to: Optional[Literal["mlflow", "wandb", "tensorboard"]] = None
    log_every: Optional[int] = Field(None, ge=1, description="when stdout is not a terminal, print a progress "
                                     "line every N steps; null = every 30 s (and the first and last step)")

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v

    @field_validator("micro_batch_tokens")
    @classmethod
    def _budget(cls, v):
        if isinstance(v, int) and v < 16:
            raise ValueError("must be at least 16 tokens, `auto`, or null")
        return v


def load_yaml_section(path: str | Path | None, section: str) -> dict:
    """The raw `section:` mapping of a project file (kept for callers of the old name; see gemtune.config)."""
    doc, sec = read_section(path, section)
    if section == "train" and sec.get("base") is None and (b := project_base(doc)) is not None:
        sec["base"] = b
    return sec


def validated(model_cls, data: dict, source: str, section: str):
    """Build a pydantic model; turn its errors into one UserError naming file and field."""
    try:
        return validate(model_cls, data, section)
    except UserError as e:
        raise UserError(str(e).removeprefix(f'field "{e.field}": '), file=source, field=e.field) from None


def load_train_config(path: str | Path | None = None, overrides: dict | None = None,
                      flags: dict | None = None) -> TrainConfig:
    """`train:` of the project file (explicit path, else ./gemtune.yaml when present), then overrides such as
    {"lr": 1e-4, "lora.r": 16} (None = not given). Errors: `file:line: field "train.lr": ...`, or the flag."""
    return load_section(path, "train", TrainConfig, overrides, flags={"lora.r": "--rank", **(flags or {})})
