"""The one JSONL reader every stage uses for files users hand over: file:line on every bad line."""

import json

import pytest

from gemtune.errors import UserError
from gemtune.utils import iter_jsonl


def test_iter_jsonl_yields_line_numbers_and_skips_blank_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"a": 1}) + "\n\n   \n" + json.dumps({"b": "é"}) + "\n")
    assert list(iter_jsonl(f)) == [(1, {"a": 1}), (4, {"b": "é"})]


@pytest.mark.parametrize("body, line, needle", [
    (b'{"a": 1}\n{"a": \n', 2, "not valid JSON: Expecting value (column 7)"),
    (b'{"a": 1}\n[1, 2]\n', 2, "each line must be a JSON object"),
    (b'{"a": 1}\n{"a": "\xff"}\n', 2, "not UTF-8 text"),
])
def test_iter_jsonl_names_file_and_line(tmp_path, body, line, needle):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(body)
    with pytest.raises(UserError) as e:
        list(iter_jsonl(f))
    assert f"{f}:{line}: {needle}" in str(e.value)


def test_iter_jsonl_bad_byte_deep_in_a_file_names_its_line(tmp_path):
    f = tmp_path / "big.jsonl"
    good = (json.dumps({"text": "x" * 200}) + "\n").encode()
    f.write_bytes(b"\xef\xbb\xbf" + good * 300 + b'{"text": "\xc3"}\n' + good)  # a BOM, then line 301 is bad
    it = iter_jsonl(f)
    assert next(it) == (1, {"text": "x" * 200})
    with pytest.raises(UserError, match=r"big.jsonl:301: not UTF-8 text"):
        list(it)


def test_iter_jsonl_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read: No such file"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))


def test_cli_errors_are_one_unwrapped_line(tmp_path):
    """file:line: field "x" must survive a narrow or piped terminal: rich would otherwise wrap it at 80 columns."""
    import os
    import subprocess
    import sys

    nope = tmp_path / ("deep-" * 20) / "nope"
    r = subprocess.run([sys.executable, "-m", "gemtune.cli", "card", "--adapter", str(nope), "--out",
                        str(tmp_path / "r.md")], capture_output=True, text=True, env={**os.environ, "COLUMNS": "60"})
    assert r.returncode == 2
    assert r.stderr == f'error: {nope}: field "--adapter": adapter directory not found\n'
