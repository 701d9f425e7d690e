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


# ------------------------------------------------------------------ hostile lines (issue #12)
@pytest.mark.parametrize("line, needle", [
    (b"[" * 100_000 + b"]" * 100_000, "not usable JSON: nested too deeply"),
    (b'{"n": ' + b"7" * 5000 + b"}", "not usable JSON: a number has more than 4300 digits"),
])
def test_iter_jsonl_hostile_line_is_a_file_line_user_error_not_a_traceback(tmp_path, line, needle):
    f = tmp_path / "h.jsonl"
    f.write_bytes(b'{"a": 1}\n' + line + b"\n")
    with pytest.raises(UserError) as e:
        list(iter_jsonl(f))
    assert str(e.value) == f"{f}:2: {needle}"


def test_iter_jsonl_on_error_skips_every_bad_line_and_reports_it(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b'{"a": 1}\n' + b"[" * 5000 + b"\n" + b'{"n": ' + b"9" * 4400 + b"}\n" + b'{"x": "\xff"}\n'
                  + b"[1]\n" + b"{nope\n" + b'{"b": 2}\n')
    bad = []
    rows = list(iter_jsonl(f, on_error=lambda n, reason, raw: bad.append((n, reason.split(":")[0]))))
    assert rows == [(1, {"a": 1}), (7, {"b": 2})]
    assert bad == [(2, "not usable JSON"), (3, "not usable JSON"), (4, "not UTF-8 text (invalid start byte at byte 7)"),
                   (5, "each line must be a JSON object"), (6, "not valid JSON")]


# ------------------------------------------------------------------ output directories (issue #12)
from gemtune.utils import OUTPUT_MARKER, atomic_dir, check_out_dir  # noqa: E402


def _write(d, name="f.txt", text="x"):
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)


def test_atomic_dir_with_writer_marks_the_output_and_replaces_its_own_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, writer="gemtune test") as tmp:
        (tmp / "a.txt").write_text("1")
    assert json.loads((out / OUTPUT_MARKER).read_text())["writer"] == "gemtune test"
    with atomic_dir(out, writer="gemtune test") as tmp:  # gemtune wrote it: replaced whole, no flag needed
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .tmp-* or .old-* left behind


def test_atomic_dir_refuses_a_directory_gemtune_did_not_write_and_keeps_it(tmp_path):
    out = tmp_path / "mine"
    _write(out, "thesis.tex", "years of work")
    with pytest.raises(UserError) as e:
        with atomic_dir(out, writer="gemtune test") as tmp:
            (tmp / "a.txt").write_text("1")
    msg = str(e.value)
    assert msg.startswith(f'{out}: field "--out": is not empty and was not written by gemtune') and "--overwrite" in msg
    assert (out / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    with atomic_dir(out, writer="gemtune test", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "a.txt"]


def test_atomic_dir_rechecks_before_replacing(tmp_path):
    """A file dropped into an empty output while the build ran is not deleted."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="not written by gemtune"):
        with atomic_dir(out, writer="gemtune test") as tmp:
            (out / "late.txt").write_text("arrived during the build")
            (tmp / "a.txt").write_text("1")
    assert (out / "late.txt").is_file()


def test_check_out_dir_accepts_missing_empty_marked_and_recognised(tmp_path):
    check_out_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    _write(tmp_path / "marked", OUTPUT_MARKER, "{}")
    _write(tmp_path / "marked", "anything")
    check_out_dir(tmp_path / "marked")
    _write(tmp_path / "legacy", "dataset.json", "{}")
    check_out_dir(tmp_path / "legacy", recognise=lambda d: (d / "dataset.json").is_file())
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        check_out_dir(tmp_path / "file")


@pytest.mark.parametrize("where", ["inside", "same", "symlink"])
def test_check_out_dir_refuses_an_input_inside_the_output_even_with_overwrite(tmp_path, where):
    out = tmp_path / "out"
    _write(out, OUTPUT_MARKER, "{}")
    if where == "inside":
        inp = out / "sub" / "raw.jsonl"
        _write(inp.parent, "raw.jsonl")
    elif where == "same":
        inp = out
    else:  # a link elsewhere whose target lies inside out
        _write(out, "raw.jsonl")
        inp = tmp_path / "link.jsonl"
        inp.symlink_to(out / "raw.jsonl")
    with pytest.raises(UserError) as e:
        check_out_dir(out, overwrite=True, inputs=[tmp_path / "elsewhere.jsonl", inp])
    assert f"input {inp} lies inside the output directory" in str(e.value) and str(e.value).startswith(f"{out}: ")
