"""Small shared helpers: atomic writes, hashing, JSON lines."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence


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


def _int_digit_limit() -> int:
    return getattr(sys, "get_int_max_str_digits", lambda: 4300)()


def json_line_error(exc: BaseException) -> str:
    """Why one line of JSON could not be used, for a quarantine row or an error message."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc.msg} (column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "not usable JSON: nested too deeply"
    if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        return f"not usable JSON: a number has more than {_int_digit_limit()} digits"
    return f"not usable JSON: {type(exc).__name__}: {exc}"


JsonlError = Callable[[int, str, str], None]  # (line number, reason, raw text of the line)


def iter_jsonl(path: str | os.PathLike, *, on_error: Optional[JsonlError] = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file the user handed us.

    A missing or unreadable file raises `UserError`. A bad line (not UTF-8, not JSON, nested too deeply, a number
    over Python's digit limit, not a JSON object) raises `UserError` naming the file and the line, so every JSONL
    input fails the same way (exit 2, file:line) — or, with `on_error`, is handed to `on_error(line, reason, raw)`
    and skipped, for callers that quarantine bad lines and go on.
    """
    from gemtune.errors import UserError

    def bad(n: int, reason: str, raw: str) -> None:
        if on_error is None:
            raise UserError(reason, file=str(path), line=n)
        on_error(n, reason, raw)

    try:
        f = open(path, "rb")  # decoded line by line, so a bad byte is reported on its own line
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                bad(n, f"not UTF-8 text ({e.reason} at byte {e.start})", raw.decode("utf-8", "replace").rstrip("\r\n"))
                continue
            if not text.strip():
                continue
            text = text.rstrip("\r\n")
            try:
                rec = json.loads(text)
            except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
                bad(n, json_line_error(e), text)
                continue
            if not isinstance(rec, dict):
                bad(n, "each line must be a JSON object", text)
                continue
            yield n, rec


OUTPUT_MARKER = ".gemtune-output"


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_dir(out: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = (),
                  recognise: Optional[Callable[[Path], bool]] = None, flag: str = "--out") -> None:
    """Refuse an output directory whose replacement would destroy something gemtune did not write.

    `out` may be missing, empty, or a directory gemtune wrote (it holds `OUTPUT_MARKER`, or `recognise(out)` says
    it is an output from before the marker existed); anything else needs `overwrite`. An input lying inside `out`
    (or `out` itself) is refused even with `overwrite`: replacing `out` would delete the data being read.
    """
    from gemtune.errors import UserError

    out = Path(out)
    outs = {Path(os.path.abspath(out)), Path(os.path.realpath(out))}
    for inp in inputs:
        if inp is None:
            continue
        for cand in {Path(os.path.abspath(inp)), Path(os.path.realpath(inp))}:
            if any(_is_within(cand, o) for o in outs):
                raise UserError(f"input {inp} lies inside the output directory, which is replaced whole by this "
                                f"command; choose another {flag}", file=str(out), field=flag)
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        if overwrite:
            return
        raise UserError(f"exists and is not a directory; pass --overwrite to replace it, or choose another {flag}",
                        file=str(out), field=flag)
    if overwrite or (out / OUTPUT_MARKER).is_file():
        return
    try:
        empty = next(out.iterdir(), None) is None
    except OSError as e:
        raise UserError(f"cannot list the output directory: {e.strerror or e}", file=str(out), field=flag) from None
    if empty or (recognise is not None and recognise(out)):
        return
    raise UserError(f"is not empty and was not written by gemtune (no {OUTPUT_MARKER} file); everything in it "
                    f"would be deleted: pass --overwrite to replace it, or choose another {flag}",
                    file=str(out), field=flag)


def write_marker(directory: str | os.PathLike, writer: str) -> None:
    """Mark `directory` as written by gemtune, so a later run may replace it without --overwrite."""
    from gemtune import __version__

    doc = {"writer": writer, "gemtune": __version__,
           "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "note": "written by gemtune; the next run with the same --out replaces this whole directory"}
    Path(directory, OUTPUT_MARKER).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, writer: Optional[str] = None, overwrite: bool = False,
               inputs: Sequence[str | os.PathLike] = (), recognise: Optional[Callable[[Path], bool]] = None,
               flag: str = "--out") -> Iterator[Path]:
    """Build a directory under a temp name beside `final`, then rename it into place.

    A crash leaves only a `.tmp-*` directory that nothing loads; an existing `final` is replaced whole.
    With `writer` (a user-named output such as `data build --out`), `final` is checked by `check_out_dir` before
    anything is built and again just before it is replaced, and the new directory carries `OUTPUT_MARKER` naming
    the writer. Without it (internal directories: caches, registry versions, checkpoints) nothing is checked.
    """
    final = Path(final)
    if writer is not None:
        check_out_dir(final, overwrite=overwrite, inputs=inputs, recognise=recognise, flag=flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=str(final.parent)))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if writer is not None:
            write_marker(tmp, writer)
            check_out_dir(final, overwrite=overwrite, inputs=inputs, recognise=recognise, flag=flag)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if os.path.lexists(final):
            # a fresh empty name: rename() may replace an empty directory, never a leftover full one
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=str(final.parent)))
            if final.is_dir() and not final.is_symlink():
                os.replace(final, old)
            else:  # a file or a link (with overwrite): move it aside the same way
                os.rmdir(old)
                os.replace(final, old)
            os.replace(tmp, final)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
