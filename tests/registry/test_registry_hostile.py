"""Registry under hostile or broken conditions: rollback onto a corrupted version, a damaged routes.json during a
push, a push killed mid-copy, symlinks and FIFOs in an adapter directory, links planted in a version directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemtune.errors import UserError
from gemtune.registry.routes import RouteTable, RouteWatcher, read_routes
from gemtune.registry.store import CorruptAdapter, Registry


def _flip_last_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _dot_entries(reg: Registry, name: str) -> list[str]:
    return sorted(p.name for p in (reg.adapters_dir / name).iterdir() if p.name.startswith("."))


def _push_log(reg: Registry) -> list[str]:
    return [e["ref"] for e in read_routes(reg.routes_path)["log"] if e["event"] == "push"]


# ------------------------------------------------------------------------------------------------ rollback
def test_rollback_onto_a_corrupted_version_is_refused_and_routes_unchanged(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    v1 = reg.push("s", adapters[0], require_verdict=False)
    reg.push("s", adapters[1], require_verdict=False)
    rt = RouteTable(reg)
    rt.promote("s", "v1")
    rt.promote("s", "v2")
    _flip_last_byte(v1.path / "adapter_model.safetensors")
    before = reg.routes_path.read_bytes()
    with pytest.raises(CorruptAdapter) as e:
        rt.rollback("s")
    msg = str(e.value)
    assert "s@v1" in msg and str(v1.path / "adapter_model.safetensors") in msg and "sha256 mismatch" in msg
    assert reg.routes_path.read_bytes() == before
    assert rt.get("s")["weights"] == {"v2": 100} and rt.get("s")["history"] == [
        {"weights": {"v1": 100}, "updated_at": rt.get("s")["history"][0]["updated_at"]}]
    # a freshly started server (a new watcher that verifies what it routes to) still has its route
    fresh = RouteWatcher(reg, accept=lambda n, v: Registry(reg.root).verify(n, v))
    assert fresh.resolve("s", "prod", "u") == "v2" and not fresh.rejected


def test_cli_rollback_onto_a_corrupted_version_exits_2_naming_version_and_file(cli, tmp_path, adapters, capsys):
    root = tmp_path / "reg"
    reg = Registry(root)
    v1 = reg.push("s", adapters[0], require_verdict=False)
    reg.push("s", adapters[1], require_verdict=False)
    RouteTable(reg).promote("s", "v1")
    RouteTable(reg).split("s", "prod", {"v1": 50, "v2": 50})
    _flip_last_byte(v1.path / "adapter_model.safetensors")
    before = reg.routes_path.read_bytes()
    capsys.readouterr()
    code = cli("registry", "--root", root, "rollback", "s")
    err = capsys.readouterr().err
    assert code == 2
    assert "s@v1 fails verification" in err and "adapter_model.safetensors" in err
    assert reg.routes_path.read_bytes() == before
    # a split naming the corrupted version is refused the same way (every path verifies every arm)
    code = cli("registry", "--root", root, "split", "s", "v1=10", "v2=90")
    assert code == 2 and "s@v1 fails verification" in capsys.readouterr().err
    assert reg.routes_path.read_bytes() == before


# ------------------------------------------------------------------------------------------------ atomic push
def test_push_with_damaged_routes_changes_nothing_and_a_retry_makes_one_version(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    reg.push("s", adapters[0], require_verdict=False)
    good = reg.routes_path.read_bytes()
    reg.routes_path.write_text('{"routes": {"s": ')
    with pytest.raises(UserError, match="nothing was pushed") as e:
        reg.push("s", adapters[1], require_verdict=False)
    assert str(reg.routes_path) in str(e.value)
    assert reg.versions("s") == ["v1"] and _dot_entries(reg, "s") == []
    assert sorted(p.name for p in (reg.adapters_dir / "s").iterdir()) == ["v1"]
    reg.routes_path.write_bytes(good)  # the operator restores the file and retries
    assert reg.push("s", adapters[1], require_verdict=False).version == "v2"
    assert reg.versions("s") == ["v1", "v2"] and _push_log(reg) == ["s@v1", "s@v2"]


def test_push_whose_record_cannot_be_written_takes_the_version_back(tmp_path, adapters, monkeypatch):
    import gemtune.registry.store as store

    reg = Registry(tmp_path / "reg")
    reg.push("s", adapters[0], require_verdict=False)
    real = store.atomic_write_json

    def disk_full(path, obj, *a, **k):
        if Path(path) == reg.routes_path:
            raise OSError(28, "No space left on device")
        return real(path, obj, *a, **k)

    monkeypatch.setattr(store, "atomic_write_json", disk_full)
    with pytest.raises(OSError):
        reg.push("s", adapters[1], require_verdict=False)
    assert reg.versions("s") == ["v1"] and _dot_entries(reg, "s") == []
    monkeypatch.setattr(store, "atomic_write_json", real)
    assert reg.push("s", adapters[1], require_verdict=False).version == "v2" and _push_log(reg) == ["s@v1", "s@v2"]


BLOCKED_PUSH = """
import sys, time
from pathlib import Path
import gemtune.registry.store as store

real = store._copy_file

def copy_then_block(src, dst):
    real(src, dst)
    Path(sys.argv[3]).write_text(str(dst.parent))  # the temp directory, half filled, lock held
    time.sleep(3600)

store._copy_file = copy_then_block
store.Registry(sys.argv[1]).push("s", sys.argv[2], require_verdict=False)
"""


def test_push_killed_mid_copy_leaves_a_temp_dir_that_is_cleaned_and_numbering_holds(tmp_path, adapters):
    root = tmp_path / "reg"
    Registry(root).push("s", adapters[0], require_verdict=False)
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-c", BLOCKED_PUSH, str(root), str(adapters[1]), str(ready)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), p.communicate(timeout=5) if p.poll() is not None else "push never reached the copy"
        live = Path(ready.read_text())
        assert live.parent == root / "adapters" / "s" and live.name.startswith(".v2.tmp-")
        # opening the registry while the push runs never touches its (live) temp directory
        reg = Registry(root)
        assert live.is_dir() and reg.versions("s") == ["v1"]
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert live.is_dir()  # the killed push left it behind
    reg = Registry(root)  # the next open removes it (the lock is free now: nothing can be using it)
    assert not live.exists() and _dot_entries(reg, "s") == []
    # a stale directory appearing later is removed by the next push, under the lock
    stale = root / "adapters" / "s" / ".v9.tmp-deadbeef"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    vi = reg.push("s", adapters[1], require_verdict=False)
    assert vi.version == "v2" and reg.versions("s") == ["v1", "v2"] and _dot_entries(reg, "s") == []
    assert reg.verify("s", "v2") and _push_log(reg) == ["s@v1", "s@v2"]


# ------------------------------------------------------------------------------------------------ symlinks
def test_push_refuses_a_symlink_inside_the_adapter_directory(tmp_path, adapters):
    secret = tmp_path / "server-secret.txt"
    secret.write_text("TOP-SECRET-TOKEN\n")
    src = tmp_path / "linked"
    shutil.copytree(adapters[0], src)
    (src / "README.md").unlink(missing_ok=True)
    (src / "README.md").symlink_to(secret)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(UserError, match="symbolic link") as e:
        reg.push("s", src, require_verdict=False)
    assert str(src / "README.md") in str(e.value)
    assert reg.versions("s") == []
    leaked = [p for p in (tmp_path / "reg").rglob("*") if p.is_file() and b"TOP-SECRET" in p.read_bytes()]
    assert leaked == []
    # the weights themselves as a link to a real, valid file: refused too, even forced
    src2 = tmp_path / "linked-weights"
    shutil.copytree(adapters[0], src2)
    (src2 / "adapter_model.safetensors").unlink()
    (src2 / "adapter_model.safetensors").symlink_to(adapters[0] / "adapter_model.safetensors")
    with pytest.raises(UserError, match="symbolic link") as e:
        reg.push("s", src2, force=True, require_verdict=False)
    assert "adapter_model.safetensors" in str(e.value) and reg.versions("s") == []


def test_push_refuses_a_fifo_inside_the_adapter_directory(tmp_path, adapters):
    src = tmp_path / "fifo"
    shutil.copytree(adapters[0], src)
    (src / "model_card.md").unlink(missing_ok=True)
    os.mkfifo(src / "model_card.md")
    reg = Registry(tmp_path / "reg")
    with pytest.raises(UserError, match="not a regular file or directory") as e:
        reg.push("s", src, require_verdict=False)
    assert str(src / "model_card.md") in str(e.value) and reg.versions("s") == []


def test_registry_reads_never_follow_links_planted_in_a_version(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    vi = reg.push("s", adapters[0], require_verdict=False)
    assert reg.verify("s", "v1")
    # the same bytes behind a link: the hash would match if it were followed
    outside = tmp_path / "outside-config.json"
    shutil.copyfile(vi.path / "adapter_config.json", outside)
    (vi.path / "adapter_config.json").unlink()
    (vi.path / "adapter_config.json").symlink_to(outside)
    fresh = Registry(reg.root)
    with pytest.raises(CorruptAdapter, match="symbolic link") as e:
        fresh.verify("s", "v1")
    assert "adapter_config.json" in str(e.value)
    with pytest.raises(CorruptAdapter, match="symbolic link"):
        RouteTable(fresh).promote("s", "v1")
    # a linked manifest or a linked version directory is not a version at all
    v2 = reg.push("s", adapters[1], require_verdict=False)
    manifest = tmp_path / "manifest-copy.json"
    shutil.copyfile(v2.path / "manifest.json", manifest)
    os.unlink(v2.path / "manifest.json")
    (v2.path / "manifest.json").symlink_to(manifest)
    (reg.adapters_dir / "s" / "v3").symlink_to(v2.path)
    fresh = Registry(reg.root)
    assert fresh.versions("s") == ["v1"] and not fresh.exists("s", "v2") and not fresh.exists("s", "v3")
    with pytest.raises(UserError, match="not in the registry"):
        fresh.verify("s", "v3")
    assert [r["ref"] for r in fresh.list()] == ["s@v1"]
