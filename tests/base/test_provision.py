"""Provisioning: cache reuse, atomic conversion, corrupt caches rebuilt, bad names refused."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gemtune.base import provision
from gemtune.base.tiny import save_tiny
from gemtune.errors import UserError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace only the (slow) GGUF de-quantisation with a tiny model; the atomic machinery is the real one."""
    calls = []

    def convert(name, out, progress=None):
        calls.append(name)
        save_tiny(out, "gemma3")

    monkeypatch.setattr(provision, "_convert_embedded", convert)
    return calls


def test_pull_caches_and_second_call_reuses(home, fake_convert):
    p1 = provision.pull("gemma-3-270m")
    assert (p1 / "config.json").is_file() and (p1 / "tokenizer.json").is_file()
    assert list(p1.glob("*.safetensors"))
    assert provision.cache_is_complete(p1, deep=True)
    p2 = provision.pull("gemma-3-270m")
    assert p1 == p2 and fake_convert == ["gemma-3-270m"]


def test_interrupted_conversion_leaves_nothing_loadable(home, monkeypatch):
    def convert(name, out, progress=None):
        save_tiny(out, "gemma3")
        raise KeyboardInterrupt  # killed half-way

    monkeypatch.setattr(provision, "_convert_embedded", convert)
    with pytest.raises(KeyboardInterrupt):
        provision.pull("gemma-3-270m")
    final = provision.models_dir() / "gemma-3-270m"
    assert not final.exists()
    assert not provision.cache_is_complete(final)


def test_sigkill_mid_conversion_then_rebuild(home, fake_convert, tmp_path):
    # A real process killed with SIGKILL during conversion: only a temp dir can remain, never the final one.
    script = textwrap.dedent(f"""
        import os, signal
        os.environ["GEMTUNE_HOME"] = {str(home)!r}
        from gemtune.base import provision
        from gemtune.base.tiny import save_tiny
        def convert(name, out, progress=None):
            save_tiny(out, "gemma3")
            os.kill(os.getpid(), signal.SIGKILL)
        provision._convert_embedded = convert
        provision.pull("gemma-3-270m")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -9
    final = provision.models_dir() / "gemma-3-270m"
    assert not final.exists()
    leftovers = [p.name for p in provision.models_dir().iterdir()]
    assert leftovers and all(n.startswith(".gemma-3-270m.tmp-") for n in leftovers)
    p = provision.pull("gemma-3-270m")
    assert provision.cache_is_complete(p, deep=True) and fake_convert == ["gemma-3-270m"]


def test_corrupt_cache_is_detected_and_rebuilt(home, fake_convert):
    p = provision.pull("gemma-3-270m")
    st = next(p.glob("*.safetensors"))
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF  # same size, different content: only the hash catches it
    st.write_bytes(bytes(data))
    assert provision.cache_is_complete(p) and not provision.cache_is_complete(p, deep=True)
    provision.pull("gemma-3-270m")
    assert fake_convert == ["gemma-3-270m", "gemma-3-270m"]
    assert provision.cache_is_complete(p, deep=True)
    (p / "tokenizer.json").unlink()  # missing file
    assert not provision.cache_is_complete(p)
    provision.pull("gemma-3-270m")
    assert len(fake_convert) == 3


def test_marker_lists_hashes(home, fake_convert):
    p = provision.pull("gemma-3-270m")
    marker = json.loads((p / provision.MARKER).read_text())
    assert set(marker["files"]) >= {"config.json", "tokenizer.json", "model.safetensors"}
    assert all(len(v["sha256"]) == 64 for v in marker["files"].values())


def test_local_dir_and_errors(home, tmp_path, tiny_gemma3):
    assert provision.pull(str(tiny_gemma3)) == tiny_gemma3.resolve()
    with pytest.raises(UserError, match="unknown model 'nope'"):
        provision.pull("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        provision.pull(str(tmp_path / "empty"))
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        provision.pull(str(f))


def test_cli_bad_model_exits_2(home):
    r = subprocess.run([sys.executable, "-m", "gemtune.cli", "base", "pull", "--model", "/does/not/exist"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown model" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_lists_only_working_verbs(cli, capsys):
    r = subprocess.run([sys.executable, "-m", "gemtune.cli", "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0
    from gemtune.cli import app

    listed = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    for verb in listed:
        assert verb in r.stdout
    # every listed verb answers --help without error (in this process: a subprocess each cost ~2 s of imports)
    for verb in listed:
        capsys.readouterr()
        rc = cli(verb, "--help")
        out = capsys.readouterr()
        assert rc == 0, (verb, out.err)
        assert "Usage" in out.out, verb
