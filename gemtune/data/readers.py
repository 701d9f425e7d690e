"""Readers for JSONL, CSV and Parquet that keep the file and line of every row.

A reader never raises for a bad row: it yields a `RawRow` with `error` set and the raw text, so the pipeline can
quarantine it with its position and keep going — whatever is wrong with the row: bytes that are not UTF-8, JSON that
is malformed, nested too deeply for Python or holds a number over Python's digit limit, a Parquet value Python cannot
hold, an unreadable Parquet row group. Only a file that cannot be opened at all (or a CSV header that cannot be read)
is a `UserError`. A file that starts with a UTF-16 or UTF-32 byte-order mark is read in that encoding.
Line numbers are 1-based physical lines for JSONL and CSV (a CSV record spanning lines gets its first line; the
header is line 1) and 1-based row numbers for Parquet.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from gemtune.errors import UserError
from gemtune.utils import json_line_error

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(slots=True)
class RawRow:
    file: str
    line: int
    data: Optional[dict]
    raw: str
    error: Optional[str] = None


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files given directly, or every supported file inside a given directory (sorted, so order is stable)."""
    if not inputs:
        raise UserError("no input files given", field="INPUT")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SUFFIXES)
            if not found:
                raise UserError(f"directory holds no {', '.join(sorted(SUFFIXES))} files", file=str(p))
            files.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise UserError(f"unsupported file type {p.suffix or '(none)'}; expected .jsonl, .csv or .parquet", file=str(p))
            files.append(p)
        elif p.exists():
            raise UserError("not a regular file", file=str(p))
        else:
            raise UserError("input file not found", file=str(p))
    return files


def read_rows(path: str | Path) -> Iterator[RawRow]:
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"unsupported file type {path.suffix}", file=str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read input: {e.strerror or e}", file=str(path)) from None
    if kind == "jsonl":
        return _jsonl_rows(str(path), data)
    if kind == "csv":
        return _csv_rows(str(path), data)
    return _parquet_rows(str(path), data)


_BOMS_32 = {b"\xff\xfe\x00\x00": "utf-32-le", b"\x00\x00\xfe\xff": "utf-32-be"}
_BOMS_16 = {b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be"}


def _as_utf8(data: bytes) -> bytes:
    """File bytes as UTF-8: a UTF-8 byte-order mark dropped, a UTF-16/32 file (told by its mark) transcoded.

    Line breaks survive transcoding, so line numbers hold. A code unit that does not decode (a lone surrogate, a
    truncated last unit) stays invalid UTF-8 in the result, so only its own line is quarantined.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:]
    for boms, width in ((_BOMS_32, 4), (_BOMS_16, 2)):
        codec = boms.get(data[:width])
        if codec:
            body = data[width:]
            cut = len(body) - len(body) % width
            try:
                text = body[:cut].decode(codec, "surrogatepass")
            except UnicodeDecodeError:  # UTF-32 beyond U+10FFFF: decode line by line instead
                text = body[:cut].decode(codec, "replace")
            return text.encode("utf-8", "surrogatepass") + (b"\xff" if cut < len(body) else b"")
    return data


def _jsonl_rows(name: str, data: bytes) -> Iterator[RawRow]:
    data = _as_utf8(data)
    for lineno, bline in enumerate(data.split(b"\n"), 1):
        if not bline.strip():
            continue
        try:
            text = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawRow(name, lineno, None, bline.decode("utf-8", "replace").strip(), f"invalid UTF-8 at byte {e.start}")
            continue
        text = text.strip()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield RawRow(name, lineno, None, text, f"malformed JSON: {e.msg} at column {e.colno}")
            continue
        except (RecursionError, ValueError) as e:  # nested too deeply; a number over Python's digit limit
            yield RawRow(name, lineno, None, text, json_line_error(e))
            continue
        if not isinstance(obj, dict):
            yield RawRow(name, lineno, None, text, f"row is a JSON {type(obj).__name__}, expected an object")
            continue
        yield RawRow(name, lineno, obj, text)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _has_surrogates(s: str) -> bool:
    """Bytes that were not UTF-8, as decoded by surrogateescape."""
    return _SURROGATE.search(s) is not None


def _csv_rows(name: str, data: bytes) -> Iterator[RawRow]:
    """Decode with surrogateescape so one bad byte quarantines its row instead of the whole file."""
    data = _as_utf8(data)
    text = data.decode("utf-8", "surrogateescape")
    lines = io.StringIO(text, newline="").readlines()  # split exactly as the csv reader does
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise UserError(f"unreadable CSV header: {e}", file=name, line=1) from None
    header = [h.strip() for h in header]
    if _has_surrogates("".join(header)):
        raise UserError("CSV header is not valid UTF-8", file=name, line=1)
    if len(set(header)) != len(header):
        raise UserError(f"CSV header repeats a column name: {header}", file=name, line=1)
    prev_end = reader.line_num
    while True:
        start = prev_end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raw = "".join(lines[start - 1:reader.line_num])
            prev_end = reader.line_num
            yield RawRow(name, start, None, _display(raw), f"malformed CSV: {e}")
            continue
        end = reader.line_num
        raw = "".join(lines[start - 1:end]).rstrip("\r\n")
        prev_end = end
        if not fields or all(not f.strip() for f in fields):
            continue
        if _has_surrogates(raw):
            yield RawRow(name, start, None, _display(raw), "invalid UTF-8")
            continue
        if len(fields) != len(header):
            yield RawRow(name, start, None, raw, f"malformed CSV: {len(fields)} fields, header has {len(header)}")
            continue
        yield RawRow(name, start, dict(zip(header, fields)), raw)


def _display(raw: str) -> str:
    """Raw text with undecodable bytes shown as U+FFFD, safe to write as UTF-8."""
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace").rstrip("\r\n")


def _parquet_rows(name: str, data: bytes) -> Iterator[RawRow]:
    """Row group by row group, so one corrupt group quarantines its own rows (counted from the file's metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        groups = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"unreadable Parquet file ({type(e).__name__}: {e})", file=name) from None
    line = 0
    for g, n_rows in enumerate(groups):
        try:
            table = pf.read_row_group(g)
        except Exception as e:
            reason = f"unreadable Parquet row group {g} ({type(e).__name__}: {e})"
            for _ in range(n_rows):
                line += 1
                yield RawRow(name, line, None, "", reason)
            continue
        for batch in table.to_batches():
            try:
                rows: Optional[list] = batch.to_pylist()
            except Exception:  # one value Python cannot hold (a date out of range, bad UTF-8): go row by row
                rows = None
            for i in range(batch.num_rows):
                line += 1
                try:
                    obj = rows[i] if rows is not None else batch.slice(i, 1).to_pylist()[0]
                    raw = json.dumps(obj, ensure_ascii=False, default=str)
                except Exception as e:
                    yield RawRow(name, line, None, "", f"unreadable Parquet row ({type(e).__name__}: {e})")
                    continue
                yield RawRow(name, line, obj, raw)
