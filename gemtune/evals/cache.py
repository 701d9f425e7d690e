"""Output cache and model fingerprints: a rerun of an unchanged suite on unchanged weights costs nothing.

The key is (base sha, adapter sha, case, generation config), so changing any weight, prompt or decoding knob
misses. Hashing a 1 GB base on every run would cost seconds, so file hashes are memoised by (path, size, mtime);
the embedded base's completeness marker already lists every file's sha256 and is used as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from gemtune.adapter import PEFT_FILES, SIDECAR
from gemtune.base.provision import MARKER, gemtune_home
from gemtune.utils import atomic_write_json, sha256_file, sha256_text

WEIGHT_SUFFIXES = (".safetensors", ".json", ".model", ".bin", ".jinja")


def cache_root() -> Path:
    return gemtune_home() / "eval-cache"


def _memo_path() -> Path:
    return cache_root() / "fingerprints.json"


def file_sha(path: Path) -> str:
    """sha256 of a file, memoised by (absolute path, size, mtime_ns)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = _memo_path()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = sha256_file(path)
    if st.st_size > (1 << 20):  # small files are cheaper to hash than to memoise
        memo[key] = digest
        try:
            atomic_write_json(memo_file, memo, indent=None)
        except OSError:
            pass
    return digest


def dir_fingerprint(d: str | Path, names: Optional[tuple[str, ...]] = None) -> str:
    """One sha256 over a model or adapter directory's weight/config files (or just `names`)."""
    d = Path(d)
    marker = d / MARKER
    if names is None and marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
            return sha256_text(json.dumps({k: v["sha256"] for k, v in sorted(files.items())}))
        except (ValueError, KeyError, TypeError):
            pass
    parts = {}
    for p in sorted(d.iterdir()):
        if not p.is_file():
            continue
        if names is not None and p.name not in names:
            continue
        if names is None and (not p.name.endswith(WEIGHT_SUFFIXES) or p.name == SIDECAR):
            continue
        parts[p.name] = file_sha(p)
    return sha256_text(json.dumps(parts, sort_keys=True))


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """Only the files PEFT loads: the sidecar's eval summary changes after each eval and must not bust the cache."""
    return dir_fingerprint(adapter_dir, PEFT_FILES)


class OutputCache:
    """One small JSON file per (model, case, generation config) under `$GEMTUNE_HOME/eval-cache/outputs/`."""

    def __init__(self, root: Path | None = None, *, read: bool = True, write: bool = True):
        """`read=False` is `--no-cache`: every output is regenerated, and the fresh ones replace the cached."""
        self.root = (root or cache_root()) / "outputs"
        self.read, self.write = read, write
        self.hits = 0

    @staticmethod
    def key(model_sha: str, case_key: str, gen: dict) -> str:
        return sha256_text(json.dumps([model_sha, case_key, gen], sort_keys=True))

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[dict]:
        if not self.read:
            return None
        try:
            value = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: dict) -> None:
        if not self.write:
            return
        try:
            atomic_write_json(self._path(key), value, indent=None)
        except OSError:
            pass  # a read-only or full cache never fails an eval


def model_sha(base_sha: str, adapter_sha: str | None) -> str:
    return sha256_text(f"{base_sha}|{adapter_sha or 'base'}")
