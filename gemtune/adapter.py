"""The adapter directory: a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) plus gemtune's
sidecar, `gemtune.json`.

Every stage reads and writes the directory through this module, and it imports no stage:

- training writes the sidecar whole when it saves a checkpoint or the final adapter (`write_sidecar`);
- the per-checkpoint eval and `gemtune eval --record` add the `eval` and `shippable` sections, the privacy probe
  the `privacy` section (`update_sidecar`): read, change those sections, write back atomically, under a lock on
  the directory, so two stages updating different sections never lose each other's writes;
- eval, probe, merge and the card ask which base the adapter belongs to (`base_of`) and check that a path is an
  adapter (`check_adapter_dir`); the card and the probe report name its weights by sha256 (`weights_sha256`).

Kept free of torch so `gemtune eval compare` (no model involved) starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from gemtune.errors import UserError
from gemtune.utils import atomic_write_json, sha256_file

SIDECAR = "gemtune.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# the files PEFT loads: what identifies the adapter (the sidecar changes after each eval and is not one of them)
PEFT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin")
_LOCK_FILE = f".{SIDECAR}.lock"  # only where the directory itself cannot be locked (no fcntl)


def sidecar_path(adapter_dir: str | Path) -> Path:
    return Path(adapter_dir) / SIDECAR


def _read_object(p: Path) -> dict:
    """A JSON object from `p`; {} when absent. A broken file is an input error naming it."""
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"not valid JSON: {e}", file=str(p)) from None
    if not isinstance(data, dict):
        raise UserError("expected a JSON object", file=str(p))
    return data


def read_sidecar(adapter_dir: str | Path) -> dict:
    """The sidecar as a dict; {} when the adapter has none. A broken one is an input error naming the file."""
    return _read_object(sidecar_path(adapter_dir))


def write_sidecar(adapter_dir: str | Path, doc: dict) -> None:
    """Write the whole sidecar atomically (training, into a directory it is building)."""
    atomic_write_json(sidecar_path(adapter_dir), doc)


@contextlib.contextmanager
def _locked(adapter_dir: Path) -> Iterator[None]:
    """An exclusive lock on the adapter directory for one read-modify-write of its sidecar. `flock` on the
    directory itself leaves no lock file behind in an artifact that gets pushed and uploaded."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): a lock file beside the sidecar
        from filelock import FileLock

        with FileLock(str(adapter_dir / _LOCK_FILE)):
            yield
        return
    fd = os.open(str(adapter_dir), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def update_sidecar(adapter_dir: str | Path, sections: Mapping[str, object] | Callable[[dict], Mapping[str, object]]
                   ) -> dict:
    """Set the top-level `sections` of the sidecar (creating it when absent), keeping every other section;
    returns the document written. Atomic, and serialised with other updates of the same directory. `sections` may
    be a function of the current document returning the sections to set: it runs under the lock, so a
    read-modify-write of one section (appending a verdict) never loses a concurrent writer's change."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise UserError("adapter directory not found", file=str(d))
    with _locked(d):
        side = read_sidecar(d)
        side.update(sections(dict(side)) if callable(sections) else sections)
        write_sidecar(d, side)
    return side


def check_adapter_dir(adapter: str | Path, *, field: Optional[str] = None, or_base: bool = False) -> Path:
    """`adapter` as a Path, when it is a directory holding a PEFT adapter; else a UserError (`or_base`: the
    command also accepts the word `base`, and the message says so)."""
    d = Path(adapter).expanduser()
    if not d.is_dir():
        hint = " (expected a PEFT adapter dir or `base`)" if or_base else ""
        raise UserError(f"adapter directory not found{hint}", file=str(d), field=field)
    if not (d / ADAPTER_CONFIG).is_file():
        raise UserError(f"not a PEFT adapter: {ADAPTER_CONFIG} missing", file=str(d), field=field)
    return d


def base_named_in(sidecar: Mapping, adapter_config: Mapping) -> Optional[str]:
    """The base an adapter's two records name: the sidecar's `base_model` (a name or path, or a {path, name}
    mapping), else PEFT's `base_model_name_or_path`; None when neither names one."""
    b = sidecar.get("base_model")
    if isinstance(b, dict):
        b = b.get("path") or b.get("name")
    if isinstance(b, str) and b:
        return b
    name = adapter_config.get("base_model_name_or_path")
    return name if isinstance(name, str) and name else None


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """PEFT's adapter_config.json as a dict ({} when absent); a broken one is an input error naming the file."""
    return _read_object(Path(adapter_dir) / ADAPTER_CONFIG)


def base_of(adapter_dir: str | Path, override: Optional[str] = None) -> str:
    """Which base an adapter belongs to: `--base` (`override`), else what the adapter records (`base_named_in`);
    a UserError when nothing names one."""
    if override:
        return str(override)
    b = base_named_in(read_sidecar(adapter_dir), read_adapter_config(adapter_dir))
    if b is None:
        raise UserError(f"cannot tell which base this adapter belongs to: no base_model in {SIDECAR} or "
                        f"{ADAPTER_CONFIG}; pass --base", file=str(adapter_dir), field="base_model")
    return b


def weights_sha256(adapter_dir: str | Path) -> Optional[str]:
    """sha256 of the adapter's weights file: the identity of the weights (None when there is none)."""
    p = Path(adapter_dir) / ADAPTER_WEIGHTS
    return sha256_file(p) if p.is_file() else None


def load_onto(model, adapter_dir: str | Path, *, base: Optional[str] = None):
    """The adapter attached to a loaded base model (unmerged, as vLLM applies it; PEFT's own loader), in eval mode.
    An adapter that does not fit the base (shapes, unknown target modules) is a UserError naming the adapter."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as e:  # noqa: BLE001 - whatever PEFT raises for an adapter that does not fit
        raise UserError(f"cannot load the adapter onto {base or 'this base'}: {type(e).__name__}: {e}",
                        file=str(adapter_dir)) from None
    return peft_model.eval()


@contextlib.contextmanager
def attached(model, adapter_dir: str | Path) -> Iterator[object]:
    """`load_onto` for the length of a block; the base is restored afterwards, so one loaded base serves every
    adapter (every checkpoint of a run, the probe's adapter after its base)."""
    peft_model = load_onto(model, adapter_dir)
    try:
        yield peft_model
    finally:
        peft_model.unload()
