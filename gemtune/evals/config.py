"""Suite-level eval options (`eval:` in gemtune.yaml): locked before the first training run, read by every run.

Why a model of its own: the eval must be identical for every checkpoint of a project, so its knobs live in the
project file, not in whoever typed the command; flags only override them for one run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gemtune.base.device import check_device_spec, check_dtype_spec
from gemtune.config import load_section

SCORER_NAMES = ("exact", "label", "contains", "regex", "json_schema", "json", "tool_call", "latency")


class EvalConfig(BaseModel):
    """Options shared by every case of a suite; a case's own `scorers` win over `scorers` here."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=8192, description="Generation budget per case.")
    scorers: Optional[list] = Field(
        None, description="Default scorers for cases without their own; None = `label` when a case has a label, "
        "else `exact`.")
    gate: float = Field(0.02, ge=0.0, le=1.0, description="Largest tolerated share of regressed cases.")
    batch_size: int = Field(16, ge=1, le=4096, description="Cases generated together.")
    labels: Optional[list[str]] = Field(None, description="Known label set for the `label` scorer; None = the "
                                        "distinct expected values of the label cases.")
    seed: int = Field(0, description="Seed set before generation and for the bootstrap.")
    device: str = Field("auto", description="Where the base runs: auto (this process's GPU when there is one, else "
                        "the CPU), cpu, cuda or cuda:N. Part of the output-cache key.")
    dtype: str = Field("auto", description="Compute dtype of the base: auto (bfloat16 on a GPU that supports it, "
                       "float32 on a CPU), bfloat16 or float32; never fp16. Part of the output-cache key.")
    bootstrap: int = Field(2000, ge=100, le=1_000_000, description="Bootstrap resamples for the accuracy-delta CI.")
    max_latency_ms: Optional[float] = Field(None, gt=0, description="Budget for the `latency` scorer.")
    constrained: bool = Field(False, description="Decode each case that carries a JSON Schema under that schema "
                              "(as the server does for `response_format`), beside the free decoding.")
    gate_baseline: str = Field("auto", description="What the per-checkpoint eval (and `gemtune eval --baseline "
                               "auto`) gates against: auto = the version live under `live` in `registry` when that "
                               "alias routes somewhere, else the base; or any --baseline spec (base, an adapter dir, "
                               "a results.json, registry:NAME@ALIAS, openai:URL#MODEL).")
    registry: Optional[str] = Field(None, description="Registry directory for registry:NAME@ALIAS baselines "
                                    "(--registry and $GEMTUNE_REGISTRY win over it).")
    live: Optional[str] = Field(None, description="NAME@ALIAS: the registry alias this project ships to; with "
                                "gate_baseline auto, candidates must beat the version it routes to.")

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        return check_device_spec(v)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        return check_dtype_spec(v)

    @field_validator("gate_baseline")
    @classmethod
    def _gate_baseline(cls, v):
        if not isinstance(v, str) or not v.strip() or v.strip() == "none":
            raise ValueError("expected auto, base, an adapter dir, a results.json, registry:NAME@ALIAS or "
                             "openai:URL#MODEL (a gate needs a baseline: `none` is not one)")
        return v.strip()

    @field_validator("live")
    @classmethod
    def _live(cls, v):
        if v is not None and (v.count("@") != 1 or not all(v.split("@"))):
            raise ValueError(f"expected NAME@ALIAS (e.g. support-router@prod), got {v!r}")
        return v

    @field_validator("scorers")
    @classmethod
    def _known_scorers(cls, v):
        if v is None:
            return v
        for s in v:
            name = s if isinstance(s, str) else (s.get("type") if isinstance(s, dict) else None)
            if name not in SCORER_NAMES:
                raise ValueError(f"unknown scorer {s!r}; expected one of {', '.join(SCORER_NAMES)}")
        return v


def load_eval_config(path: str | Path | None = None, **overrides) -> EvalConfig:
    """The `eval:` section of the project file (explicit path, else ./gemtune.yaml when present; absent file or
    section = defaults), then non-None overrides. Errors: `file:line: field "eval.gate": ...`, or the flag."""
    return load_section(path, "eval", EvalConfig, overrides)
