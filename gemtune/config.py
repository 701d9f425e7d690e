"""One way to read gemtune's YAML files, and one way to turn a section of gemtune.yaml into a stage's options.

`read_yaml` (a file) and `parse_yaml` (a string, e.g. a card's front matter) return a `YamlDoc`: the parsed
document plus `line(*keys)`, the 1-based line of a key path, so every later check can say `file:line: field`.
A YAML syntax error is a `UserError` at `file:line`.

`load_section(path, section, Model, overrides)` is what every stage's `load_*_config` calls:

- the file: an explicit path must exist; without one, ./gemtune.yaml is read when present, else defaults;
  an empty file or an empty section means defaults; a top level or a section that is not a mapping is an error;
- `base:` (top level, or inside the section) is a name/directory/hub id, or a mapping with `model`, `name` or
  `path`; every stage checks it the same way and a stage whose options have a `base` field receives it;
- overrides (command-line flags; None = not given) go on top; an error in one names the flag as the field;
- validation errors are `file:line: field "train.lr": message`; an unknown key is `... field "data.x": unknown
  key` (pydantic `extra="forbid"`), with the closest known key when there is one;
- a value the playbook advises against (a field declared with `advised(lo, hi, why)`) is a printed warning, not
  a refusal: the user may have decided against the advice.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

from pydantic import BaseModel, ValidationError

from gemtune.errors import UserError

DEFAULT_CONFIG = "gemtune.yaml"
# Top-level sections some stage reads; any other top-level key is reported (a typo such as `trian:` would
# otherwise silently leave a stage on its defaults). Add a section here when a stage starts reading one.
KNOWN_SECTIONS = ("base", "data", "train", "eval", "privacy")
BASE_KEYS = ("model", "name", "path")

M = TypeVar("M", bound=BaseModel)


def warn(msg: str) -> None:
    """A warning the user should see but that stops nothing (the same `warning: ...` line other stages print)."""
    print(f"warning: {msg}", file=sys.stderr)


def advised(lo: float, hi: float, why: str) -> dict:
    """`Field(..., json_schema_extra=advised(0.05, 0.10, "why"))`: outside [lo, hi] `load_section` warns."""
    return {"advised": [lo, hi, why]}


# ------------------------------------------------------------------------------------------------ reading
class YamlDoc:
    """A parsed YAML document and where its keys are. `data` is whatever the document holds (None when empty)."""

    def __init__(self, data: Any, text: str, source: Optional[str] = None, first_line: int = 1):
        self.data, self.text, self.source, self.first_line = data, text, source, first_line
        self._root: Any = False  # composed lazily: only an error needs a line

    def line(self, *keys: Any) -> Optional[int]:
        """1-based line of the key path (mapping keys, list indices), or of its deepest existing parent; None
        when not even the first key exists. No keys: the line where the document starts."""
        import yaml

        if self._root is False:
            try:
                self._root = yaml.compose(self.text)
            except yaml.YAMLError:
                self._root = None
        node = self._root
        line = node.start_mark.line + self.first_line if node is not None and not keys else None
        for part in keys:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if str(k.value) == str(part):
                        line, node = k.start_mark.line + self.first_line, v
                        break
                else:
                    break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + self.first_line
            else:
                break
        return line

    def error(self, message: str, *keys: Any, field: Optional[str] = None) -> UserError:
        """A UserError at the key path: this file, the key's line, and the dotted path as the field (unless given)."""
        dotted = field if field is not None else (".".join(str(k) for k in keys) or None)
        return UserError(message, file=self.source, line=self.line(*keys) if keys else None, field=dotted)


def parse_yaml(text: str, source: Optional[str] = None, *, first_line: int = 1) -> YamlDoc:
    """Parse YAML text; `source` names it in errors, `first_line` is the line of its first line in that file."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"invalid YAML: {getattr(e, 'problem', None) or e}", file=source,
                        line=mark.line + first_line if mark else None) from None
    return YamlDoc(data, text, source, first_line)


def read_yaml(path: str | Path, *, what: str = "config file") -> YamlDoc:
    """Read and parse a YAML file; a missing or unreadable file is a UserError naming it (`what` not found)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found", file=str(p)) from None
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror or e}", file=str(p)) from None
    except UnicodeDecodeError:
        raise UserError(f"cannot read {what}: not UTF-8 text", file=str(p)) from None
    return parse_yaml(text, str(p))


def resolve_config_path(config: Optional[str | Path]) -> Optional[Path]:
    """An explicit --config must exist; without one, ./gemtune.yaml is used when present."""
    if config is not None:
        p = Path(config)
        if not p.is_file():
            raise UserError("config file not found", file=str(p), field="--config")
        return p
    p = Path(DEFAULT_CONFIG)
    return p if p.is_file() else None


# ------------------------------------------------------------------------------------------------ base
def base_value(value: Any, doc: Optional[YamlDoc], *keys: Any) -> Optional[str]:
    """`base:` as a plain name/directory/hub id, or a mapping with `model`, `name` or `path` (first wins)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict):
        for k in BASE_KEYS:
            if isinstance(value.get(k), str) and value[k].strip():
                return value[k]
    msg = (f"expected a base model name, directory or hub id, or a mapping with one of {', '.join(BASE_KEYS)}; "
           f"got {value!r}")
    if doc is None:
        raise UserError(msg, field=".".join(str(k) for k in keys))
    raise doc.error(msg, *keys)


def project_base(doc: Optional[YamlDoc]) -> Optional[str]:
    """The top-level `base:` of a project file (None when absent); a malformed one is an error."""
    top = doc.data if doc is not None and isinstance(doc.data, dict) else {}
    return base_value(top.get("base"), doc, "base")


# ------------------------------------------------------------------------------------------------ sections
def read_section(path: str | Path | None, section: str, *, warn: Callable[[str], None] = warn
                 ) -> tuple[Optional[YamlDoc], dict]:
    """The project file (see `resolve_config_path`) and a copy of its `section:` mapping ({} when absent/empty)."""
    p = resolve_config_path(path)
    if p is None:
        return None, {}
    doc = read_yaml(p)
    top = doc.data if doc.data is not None else {}
    if not isinstance(top, dict):
        raise UserError("the config must be a mapping with sections such as `data:` and `train:`", file=str(p),
                        line=doc.line())
    for key in top:
        if key not in KNOWN_SECTIONS:
            close = difflib.get_close_matches(str(key), KNOWN_SECTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(KNOWN_SECTIONS)})"
            warn(str(doc.error(f"unknown section, ignored{hint}", key)))
    project_base(doc)  # every stage refuses a malformed `base:` the same way
    sec = top.get(section)
    if sec is None:
        return doc, {}
    if not isinstance(sec, dict):
        raise doc.error(f"`{section}:` must be a mapping of options", section)
    return doc, dict(sec)


def _flag(key: str) -> str:
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def apply_overrides(values: dict, overrides: Optional[Mapping[str, Any]]) -> dict[tuple[str, ...], str]:
    """Put the given overrides (None = not given) on top of `values`, in place. Dotted keys (`lora.r`) reach
    into nested sections; a mapping merges into the mapping it overrides. Returns {key path: key} of those given."""
    given: dict[tuple[str, ...], str] = {}
    for key, v in (overrides or {}).items():
        if v is None:
            continue
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        if isinstance(v, dict) and isinstance(node.get(leaf), dict):
            v = {**node[leaf], **v}
        node[leaf] = v
        given[tuple(key.split("."))] = key
    return given


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`, for "did you mean" on an unknown key."""
    for part in loc:
        info = model.model_fields.get(str(part))
        ann = getattr(info, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def validate(model: type[M], values: dict, section: str, doc: Optional[YamlDoc] = None,
             flags: Optional[Mapping[tuple[str, ...], str]] = None) -> M:
    """Build the model; its first error becomes one UserError: `file:line: field "section.x": message`, or
    `field "--flag": message (section.x)` when the bad value came from a flag."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in (section, *loc))
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc[:-1]), n=1)
        msg = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    else:
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if got is None or isinstance(got, (str, int, float, bool)):
            msg += f" (got {got!r})"
    for path, flag in (flags or {}).items():
        if tuple(str(p) for p in loc[:len(path)]) == path:
            raise UserError(f"{msg}; {flag} sets {dotted}", field=flag)
    if doc is None:
        raise UserError(msg, field=dotted)
    raise doc.error(msg, section, *loc, field=dotted)


def warn_advised(cfg: BaseModel, section: str, doc: Optional[YamlDoc] = None,
                 flags: Optional[Mapping[tuple[str, ...], str]] = None, *,
                 warn: Callable[[str], None] = warn) -> list[str]:
    """Warn for every value outside its `advised(lo, hi, why)` range; returns the warnings."""
    out = []
    for name, info in type(cfg).model_fields.items():
        extra = info.json_schema_extra
        if not isinstance(extra, dict) or "advised" not in extra:
            continue
        lo, hi, why = extra["advised"]
        v = getattr(cfg, name)
        if v is None or lo <= v <= hi:
            continue
        msg = f"{v:g} is outside the advised {lo:g}–{hi:g} ({why}); going ahead as asked"
        if (name,) in (flags or {}):
            w = str(UserError(msg, field=(flags or {})[(name,)]))
        elif doc is not None:
            w = str(doc.error(msg, section, name))
        else:
            w = str(UserError(msg, field=f"{section}.{name}"))
        warn(w)
        out.append(w)
    return out


def load_section(path: str | Path | None, section: str, model: type[M],
                 overrides: Optional[Mapping[str, Any]] = None, *, flags: Optional[Mapping[str, str]] = None,
                 warn: Callable[[str], None] = warn) -> M:
    """The `section:` of the project file (explicit path, else ./gemtune.yaml when present, else defaults), with
    `overrides` on top, validated into `model`. `flags` names the command-line flag of an override key when it
    is not `--key-with-dashes` (e.g. {"lora.r": "--rank"})."""
    doc, values = read_section(path, section, warn=warn)
    if "base" in model.model_fields:
        if values.get("base") is not None:
            values["base"] = base_value(values["base"], doc, section, "base")
        elif (b := project_base(doc)) is not None:
            values["base"] = b
    given = apply_overrides(values, overrides)
    named = {p: (flags or {}).get(k) or _flag(k) for p, k in given.items()}
    cfg = validate(model, values, section, doc, named)
    warn_advised(cfg, section, doc, named, warn=warn)
    return cfg
