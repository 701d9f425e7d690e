"""Options of `gemtune data build`: the `data:` section of gemtune.yaml, overridden by command-line flags.

One pydantic model holds every option so the YAML file, the flags and the Python API agree on names, defaults
and bounds. A bad value is reported with the field's dotted path (and the YAML line when it came from a file),
never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gemtune.errors import UserError

# Fields of an input row that a column can be mapped onto (`--map input=text` maps column "text" to "input").
MAPPABLE_FIELDS = (
    "id", "task", "label", "split", "instruction", "input", "output", "messages", "system",
    "source", "reviewer", "review_status", "license", "collected_at", "provenance",
)

DEFAULT_BASE = "gemma-3-270m"


class DataConfig(BaseModel):
    """Everything `data build` needs besides the input files and the output directory."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base: Optional[str] = Field(None, description="Base whose tokenizer counts tokens (name or dir); default gemma-3-270m")
    columns: dict[str, str] = Field(default_factory=dict, description="target field -> input column name")
    instruction: Optional[str] = Field(None, description="Instruction for rows that carry none (e.g. a routing prompt)")
    task: str = Field("default", min_length=1, description="Task name for rows without a `task` field")
    provenance: dict[str, str] = Field(default_factory=dict, description="Provenance defaults for every domain row")
    eval_fraction: float = Field(0.12, ge=0.10, le=0.15)
    eval_lock: Optional[str] = Field(None, description="Reuse the frozen eval set listed in this eval.lock.json")
    refreeze: bool = Field(False, description="Draw a new eval set even though a lock exists")
    max_tokens: int = Field(2048, ge=8, description="Longest full example (chat template included), in base tokens")
    balance_multiple: Optional[float] = Field(3.0, ge=1.0, description="Cap each task/label at this multiple of the median; null: off")
    generic: list[str] = Field(default_factory=list, description="Generic instruction files mixed into train")
    generic_fraction: float = Field(0.07, ge=0.05, le=0.10)
    pii_engine: Literal["builtin", "presidio"] = "builtin"
    pii_region: str = Field("US", min_length=2, max_length=2, description="Default region for national phone numbers")
    near_dup_threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard on character 5-gram shingles")
    dedup_scope: Literal["global", "task"] = Field("global", description="task: rows of different tasks never dedup")
    canaries: int = Field(0, ge=0, le=10000, description="Secret strings planted in train rows for the privacy probe")
    canary_file: Optional[str] = Field(None, description="Where canaries are recorded (default <out>.canaries.json)")
    seed: int = 0

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


def _yaml_line(path: Path, loc: tuple) -> Optional[int]:
    """1-based line of the YAML key at `loc` (e.g. ("data", "eval_fraction")), or of its deepest existing parent."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except Exception:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == str(part):
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read config: {e.strerror or e}", file=str(path)) from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"invalid YAML: {getattr(e, 'problem', None) or e}", file=str(path),
                        line=mark.line + 1 if mark else None) from None
    if not isinstance(doc, dict):
        raise UserError("the config must be a mapping with sections such as `data:`", file=str(path))
    return doc


def _base_from_top_level(doc: dict) -> Optional[str]:
    """The top-level `base:` section may be a plain name/path or a mapping with `model`/`name`/`path`."""
    base = doc.get("base")
    if isinstance(base, str):
        return base
    if isinstance(base, dict):
        for k in ("model", "name", "path"):
            if isinstance(base.get(k), str):
                return base[k]
    return None


def resolve_config_path(config: Optional[str | Path]) -> Optional[Path]:
    """An explicit --config must exist; without one, ./gemtune.yaml is used when present."""
    if config is not None:
        p = Path(config)
        if not p.is_file():
            raise UserError("config file not found", file=str(p), field="--config")
        return p
    p = Path("gemtune.yaml")
    return p if p.is_file() else None


def load_data_config(config: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None) -> DataConfig:
    """Read `data:` from the YAML file (if any), apply flag overrides (None = not given), validate.

    Errors name the dotted field (`data.eval_fraction`), the YAML line when the value came from the file, and the
    flag when it came from the command line.
    """
    path = resolve_config_path(config)
    doc = _read_yaml(path) if path else {}
    section = doc.get("data") or {}
    if not isinstance(section, dict):
        raise UserError("`data:` must be a mapping", file=str(path), line=_yaml_line(path, ("data",)), field="data")
    values = dict(section)
    if "base" not in values and (b := _base_from_top_level(doc)):
        values["base"] = b
    flagged = {k: v for k, v in (overrides or {}).items() if v is not None}
    flag_keys = set(flagged)
    if "columns" in flagged:
        values["columns"] = {**(values.get("columns") or {}), **flagged.pop("columns")}
    values.update(flagged)
    try:
        return DataConfig.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        msg = err["msg"]
        if loc and loc[0] in flag_keys:
            flag = "--" + str(loc[0]).replace("_", "-")
            raise UserError(f"{msg} (from {flag})", field=dotted) from None
        line = _yaml_line(path, ("data",) + loc) if path else None
        raise UserError(msg, file=str(path) if path else None, line=line, field=f"data.{dotted}") from None
