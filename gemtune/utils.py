"""Small shared helpers: atomic writes, hashing, JSON lines."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Atomically write JSON lines (compact, key order preserved); returns the row count."""
    n = 0
    parts = []
    for r in rows:
        parts.append(json.dumps(r, ensure_ascii=False, separators=(",", ":")))
        n += 1
    atomic_write_text(path, "".join(p + "\n" for p in parts))
    return n


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file the user handed us.

    A missing or unreadable file, a line that is not JSON, or one that is not a JSON object raises `UserError`
    naming the file and the line, so every JSONL input fails the same way (exit 2, file:line).
    """
    from gemtune.errors import UserError

    try:
        f = open(path, "rb")  # decoded line by line, so a bad byte is reported on its own line
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(path), line=n) from None
            if not text.strip():
                continue
            try:
                rec = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise UserError(f"not valid JSON: {e.msg} (column {e.colno})", file=str(path), line=n) from None
            if not isinstance(rec, dict):
                raise UserError("each line must be a JSON object", file=str(path), line=n)
            yield n, rec


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temp name beside `final`, then rename it into place.

    A crash leaves only a `.tmp-*` directory that nothing loads; an existing `final` is replaced whole.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=str(final.parent)))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
