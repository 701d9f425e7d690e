"""Options of `gemtune data build`: the `data:` section of gemtune.yaml, overridden by command-line flags.

One pydantic model holds every option so the YAML file, the flags and the Python API agree on names, defaults
and bounds. A bad value is reported with the field's dotted path (and the YAML line when it came from a file),
never as a traceback. The two shares the playbook advises on (eval 10-15 %, generic mix 5-10 %) accept any
valid value and warn outside the advice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from gemtune.config import advised, load_section, resolve_config_path  # noqa: F401  (re-exported)
from gemtune.errors import UserError

# Fields of an input row that a column can be mapped onto (`--map input=text` maps column "text" to "input").
MAPPABLE_FIELDS = (
    "id", "task", "label", "split", "instruction", "input", "output", "messages", "system",
    "source", "reviewer", "review_status", "license", "collected_at", "provenance",
)

DEFAULT_BASE = "gemma-3-270m"


def _load_schema(v: Any) -> dict:
    """A JSON Schema object, or the path of a .json file holding one (relative to the current directory, like
    `generic`); checked against JSON Schema Draft 2020-12 so a broken schema stops the build at the config line."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if isinstance(v, str):
        p = Path(v)
        if not p.is_file():
            raise ValueError(f"schema file not found: {v}")
        try:
            v = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read schema file {p}: {e}") from None
        except ValueError as e:
            raise ValueError(f"schema file {p} is not JSON: {e}") from None
    if not isinstance(v, dict):
        raise ValueError(f"expected a JSON Schema object or the path of a .json file, got {type(v).__name__}")
    try:
        Draft202012Validator.check_schema(v)
    except SchemaError as e:
        where = "/".join(str(x) for x in e.path)
        raise ValueError(f"not a valid JSON Schema (Draft 2020-12){' at ' + where if where else ''}: "
                         f"{e.message[:300]}") from None
    return v


def split_file_column(item: str) -> dict:
    """`FILE` or `FILE:COLUMN` → {"path", "column"}; a path that exists as given is never split."""
    if ":" in item and not Path(item).exists():
        path, _, column = item.rpartition(":")
        if path and column:
            return {"path": path, "column": column}
    return {"path": item, "column": None}


class BenchmarkFile(BaseModel):
    """A benchmark (JSONL, CSV or Parquet) that no training or eval row may near-duplicate."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., min_length=1, description="The benchmark file")
    column: Optional[str] = Field(None, min_length=1, description="The column holding the text (default: the "
                                  "first of prompt, question, text, input, instruction, messages' user turns)")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        p = Path(v)
        if not p.is_file():
            raise ValueError(f"benchmark file {'is not a regular file' if p.exists() else 'not found'}: {v}")
        return v


def _benchmark_item(v: Any) -> Any:
    return split_file_column(v) if isinstance(v, str) else v


class DataConfig(BaseModel):
    """Everything `data build` needs besides the input files and the output directory."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base: Optional[str] = Field(None, description="Base whose tokenizer counts tokens (name or dir); default gemma-3-270m")
    columns: dict[str, str] = Field(default_factory=dict, description="target field -> input column name")
    instruction: Optional[str] = Field(None, description="Instruction for rows that carry none (e.g. a routing prompt)")
    task: str = Field("default", min_length=1, description="Task name for rows without a `task` field")
    provenance: dict[str, str] = Field(default_factory=dict, description="Provenance defaults for every domain row")
    eval_fraction: float = Field(0.12, gt=0.0, lt=1.0, json_schema_extra=advised(
        0.10, 0.15, "a 10-15 % frozen eval is large enough to gate on and leaves most rows to train"))
    eval_lock: Optional[str] = Field(None, description="Reuse the frozen eval set listed in this eval.lock.json")
    refreeze: bool = Field(False, description="Draw a new eval set even though a lock exists")
    max_tokens: int = Field(2048, ge=8, description="Longest full example (chat template included), in base tokens")
    balance_multiple: Optional[float] = Field(3.0, ge=1.0, description="Cap each task/label at this multiple of the median; null: off")
    generic: list[str] = Field(default_factory=list, description="Generic instruction files mixed into train")
    generic_fraction: float = Field(0.07, ge=0.0, lt=1.0, description="Generic share of the final train set",
                                    json_schema_extra=advised(0.05, 0.10, "a 5-10 % generic mix keeps the base's "
                                                              "general ability"))
    pii_engine: Literal["builtin", "presidio"] = "builtin"
    pii_region: str = Field("US", min_length=2, max_length=2, description="Default region for national phone numbers")
    pii_names: bool = Field(True, description="Redact personal names found by the builtin context rules "
                            "(sign-offs, salutations, introductions, titles); false: structured PII only")
    pii_spacy_model: Optional[str] = Field(None, min_length=1, description="spaCy pipeline for --pii-engine "
                                           "presidio (default: $GEMTUNE_SPACY_MODEL, else the best installed)")
    near_dup_threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard on character 5-gram shingles")
    dedup_scope: Literal["global", "task"] = Field("global", description="task: rows of different tasks never dedup")
    canaries: int = Field(0, ge=0, le=10000, description="Secret strings planted in train rows for the privacy probe")
    canary_file: Optional[str] = Field(None, description="Where canaries are recorded (default <out>.canaries.json)")
    seed: int = 0
    require_review: Optional[list[Annotated[str, Field(min_length=1)]]] = Field(
        None, min_length=1, description="Keep only rows whose provenance review_status is one of these "
        "(case-insensitive); others are quarantined. null: no review required")
    review_generic: bool = Field(False, description="With require_review, generic rows need a listed "
                                 "review_status too; false: a generic row without one is exempt")
    decontaminate: list[Annotated[BenchmarkFile, BeforeValidator(_benchmark_item)]] = Field(
        default_factory=list, description="Benchmark files: rows near-duplicating any of their rows are quarantined")
    schemas: dict[str, Annotated[Any, AfterValidator(_load_schema)]] = Field(
        default_factory=dict, description="task -> JSON Schema (object or .json path) the answer must satisfy")

    @field_validator("columns")
    @classmethod
    def _known_targets(cls, v: dict[str, str]) -> dict[str, str]:
        for target, source in v.items():
            if target not in MAPPABLE_FIELDS:
                raise ValueError(f"unknown target field {target!r}; expected one of {', '.join(MAPPABLE_FIELDS)}")
            if not source:
                raise ValueError(f"column name for {target!r} is empty")
        return v

    @field_validator("instruction")
    @classmethod
    def _non_blank(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("instruction is blank; omit it instead")
        return v

    def base_name(self) -> str:
        return self.base or DEFAULT_BASE


def parse_map_flags(items: list[str]) -> dict[str, str]:
    """`--map input=text` flags -> {"input": "text"}; the target is the gemtune field, the value the column."""
    out: dict[str, str] = {}
    for item in items:
        target, sep, source = item.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise UserError(f"--map expects FIELD=COLUMN (e.g. input=text), got {item!r}", field="columns")
        out[target.strip()] = source.strip()
    return out


def parse_decontaminate_flags(items: list[str], column: Optional[str] = None) -> list[dict]:
    """`--decontaminate FILE[:COLUMN]` flags; `--decontaminate-column COL` is the column of those without one."""
    out = []
    for item in items:
        ref = split_file_column(item)
        if ref["column"] is None and column:
            ref["column"] = column
        out.append(ref)
    return out


def load_data_config(config: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None) -> DataConfig:
    """Read `data:` from the YAML file (if any), apply flag overrides (None = not given), validate.

    Errors name the dotted field (`data.eval_fraction`) and the YAML line when the value came from the file, or
    the flag when it came from the command line (see `gemtune.config.load_section`).
    """
    return load_section(config, "data", DataConfig, overrides, flags={"columns": "--map"})
