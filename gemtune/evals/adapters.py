"""Adapter directories: which base an adapter belongs to, and the checks that make a wrong path a clear error.

Kept free of torch so `gemtune eval compare` (no model involved) starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemtune.errors import UserError


def read_sidecar(adapter_dir: Path) -> dict:
    p = adapter_dir / "gemtune.json"
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"not valid JSON: {e}", file=str(p)) from None
    if not isinstance(data, dict):
        raise UserError("expected a JSON object", file=str(p))
    return data


def check_adapter_dir(adapter: str | Path) -> Path:
    d = Path(adapter).expanduser()
    if not d.is_dir():
        raise UserError("adapter directory not found (expected a PEFT adapter dir or `base`)", file=str(d))
    if not (d / "adapter_config.json").is_file():
        raise UserError("not a PEFT adapter: adapter_config.json missing", file=str(d))
    return d


def adapter_base(adapter_dir: Path, override: str | None = None) -> str:
    """Which base an adapter belongs to: `--base`, else the `gemtune.json` sidecar, else PEFT's own record."""
    if override:
        return override
    side = read_sidecar(adapter_dir)
    if isinstance(side.get("base_model"), str) and side["base_model"]:
        return side["base_model"]
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"not valid JSON: {e}", file=str(adapter_dir / "adapter_config.json")) from None
    name = cfg.get("base_model_name_or_path")
    if isinstance(name, str) and name:
        return name
    raise UserError("cannot tell which base this adapter belongs to: no base_model in gemtune.json or "
                    "adapter_config.json; pass --base", file=str(adapter_dir), field="base_model")
