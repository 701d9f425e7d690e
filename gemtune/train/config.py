"""`train:` section of gemtune.yaml. Every preset field can be overridden here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    dtype: Literal["float32", "bfloat16"] = "float32"
    quant: Optional[Literal["4bit"]] = None
    gradient_checkpointing: bool = False
    lean: bool = Field(True, description="memory-lean LoRA/MLP autograd on the frozen base (fp32 math, less saved "
                       "state); each replaced module is checked against the stock forward first")
    frozen_storage: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="storage dtype of the frozen base weights; auto = bfloat16 when computing in float32 "
        "without quantisation or sharding (matmuls still run in float32)")
    report_to: Optional[Literal["mlflow", "wandb", "tensorboard"]] = None
    log_every: int = Field(1, ge=1)

    @field_validator("micro_batch_tokens")
    @classmethod
    def _budget(cls, v):
        if isinstance(v, int) and v < 16:
            raise ValueError("must be at least 16 tokens, `auto`, or null")
        return v


def load_yaml_section(path: str | Path | None, section: str) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError("config file not found", file=str(p))
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"invalid YAML: {getattr(e, 'problem', e)}", file=str(p), line=(mark.line + 1) if mark else None) from None
    if not isinstance(doc, dict):
        raise UserError("top level must be a mapping", file=str(p))
    sec = doc.get(section) or {}
    if not isinstance(sec, dict):
        raise UserError(f"section {section!r} must be a mapping", file=str(p), field=section)
    if section == "train" and "base" not in sec and isinstance(doc.get("base"), (str, dict)):
        base = doc["base"]
        sec = {**sec, "base": base if isinstance(base, str) else base.get("model", "gemma-3-270m")}
    return sec


def validated(model_cls, data: dict, source: str, section: str):
    """Build a pydantic model; turn its errors into one UserError naming file and field."""
    try:
        return model_cls(**data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in (section, *err["loc"]))
        raise UserError(f"{err['msg']} (got {err.get('input')!r})", file=source, field=loc) from None


def load_train_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    data = load_yaml_section(path, "train")
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k.startswith("lora."):
            data.setdefault("lora", {})[k[5:]] = v
        else:
            data[k] = v
    return validated(TrainConfig, data, str(path) if path else "<flags>", "train")
