"""The adapter registry: immutable, verified versions under `adapters/<name>/<version>/`.

A push copies a PEFT adapter into the next version directory (built under a temp name, fsynced, renamed into
place), with `manifest.json` holding every file's size and sha256. Versions are never rewritten: a regression is
fixed by routing (see routes.py), not by editing weights in place. A push refuses what vLLM would refuse to load
(DoRA, `modules_to_save`, per-layer ranks, ranks outside vLLM's punica sizes) and adapters whose eval gate or
privacy probe said no, unless forced; a forced push records why it was forced. Loading re-hashes every file against
the manifest and accepts safetensors only, so a flipped bit or a pickle never reaches the engine.

Concurrent writers (two CLI pushes, the server's admin API) serialise on one file lock in the registry root.

A push is atomic end to end: everything that could refuse it (the adapter, its entries, a damaged `routes.json`)
is checked before anything is written; the version is built under `.vN.tmp-*` and renamed into place, and if
recording the push in `routes.json` then fails the rename is undone. Every push holds the lock while its temp
directory exists, so a temp directory seen while holding the lock was left by a killed push: it is removed.

Nothing in the registry follows a symlink: a push refuses an adapter directory holding one (or anything that is
not a regular file or directory), copies with O_NOFOLLOW, and verification refuses a version directory holding
anything but regular files, so a planted link can neither copy a server file into the registry nor be served.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from gemtune.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR, base_named_in, read_sidecar
from gemtune.errors import NotFound, UserError
from gemtune.registry.history import append_log, now, read_routes
from gemtune.registry.names import (NAME_RE, VERSION_RE, normalize_version, validate_name,  # noqa: F401
                                    version_number)
from gemtune.registry.verdicts import for_weights, push_problem, route_problem
from gemtune.utils import atomic_write_json, fsync_dir, sha256_file

VLLM_RANKS = (8, 16, 32, 64, 128, 256)
# what a push builds beside the versions (and what utils.atomic_dir left in older releases): never loaded
TEMP_RE = re.compile(r"^\.v[1-9][0-9]{0,8}\.(tmp|old)-")
MANIFEST = "manifest.json"
# Files a version may carry besides the two PEFT files: metadata a reader needs, never executable formats.
OPTIONAL_FILES = (SIDECAR, "README.md", "model_card.md", "card.md")
LOCK_TIMEOUT_S = 30.0


class CorruptAdapter(UserError):
    """A stored version whose files no longer match its manifest: refused, never loaded."""


class Refused(UserError):
    """A gate said no: the adapter's own checks, or no passing eval verdict for these weights (verdicts.py).
    CLI exit 1; still a UserError, so the admin API answers it with 400 like every other refused push."""

    exit_code = 1


@dataclass
class VersionInfo:
    name: str
    version: str
    path: Path
    manifest: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """The pinned model name clients use: `name@vN`."""
        return f"{self.name}@{self.version}"


def check_adapter_config(cfg: dict, where: str) -> list[str]:
    """Why vLLM (and our engine) could not load this PEFT config unchanged; empty when it can."""
    problems = []
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype != "LORA":
        problems.append(f'peft_type is {cfg.get("peft_type")!r}; only plain LoRA is served')
    if cfg.get("use_dora"):
        problems.append("use_dora is true: DoRA adapters cannot be served by vLLM")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']!r}: vLLM cannot load fully trained extra modules")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern set: per-layer ranks are not servable; use one rank")
    r = cfg.get("r")
    if not isinstance(r, int) or r not in VLLM_RANKS:
        problems.append(f"rank r={r!r} is not one of {list(VLLM_RANKS)} (vLLM's supported LoRA ranks)")
    if cfg.get("bias", "none") not in ("none", None):
        problems.append(f'bias={cfg.get("bias")!r}: only bias "none" is servable')
    if cfg.get("use_rslora"):
        problems.append("use_rslora is true: vLLM scales LoRA by alpha/r, rsLoRA would be served wrongly")
    for key in ("layers_to_transform", "layers_pattern"):
        if cfg.get(key):
            problems.append(f"{key} is set: layer subsets are not servable by vLLM")
    if cfg.get("lora_bias"):
        problems.append("lora_bias is true: a bias on lora_B is not servable by vLLM")
    for key in ("target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            problems.append(f"{key} is set: only LoRA on linear modules is servable")
    if not cfg.get("target_modules"):
        problems.append("target_modules is empty")
    return problems


def gate_problems(sidecar: dict | None, weights: Path | None = None) -> list[str]:
    """Why the adapter's own checks say it must not ship (from the `gemtune.json` sidecar): a failed eval gate,
    or a failed privacy probe made for these weights (`privacy.adapter_sha256` against `weights` when both exist;
    a report made for other weights does not describe this adapter and is not held against it)."""
    if not sidecar:
        return []
    problems = []
    if sidecar.get("shippable") is False:
        problems.append('gemtune.json says "shippable": false')
    ev = sidecar.get("eval") or {}
    if isinstance(ev, dict) and ev.get("gate_passed") is False:
        problems.append('gemtune.json says eval.gate_passed: false')
    pv = sidecar.get("privacy") or {}
    if isinstance(pv, dict) and pv.get("passed") is False:
        probed = pv.get("adapter_sha256")
        if not (probed and weights is not None and weights.is_file() and sha256_file(weights) != probed):
            failed = [c.get("name") for c in pv.get("checks") or [] if isinstance(c, dict) and not c.get("passed")]
            problems.append("gemtune.json says privacy.passed: false"
                            + (f" ({', '.join(str(f) for f in failed)})" if failed else ""))
    return problems


def _open_regular(path: Path, error=UserError) -> int:
    """An fd for `path` opened without following a symlink, refusing anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error("is a symbolic link: the registry never follows links", file=str(path)) from None
        if e.errno == errno.ENOENT:
            raise error("file not found", file=str(path)) from None
        raise error(f"cannot read: {e.strerror or e}", file=str(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error("is not a regular file", file=str(path))
    return fd


def _read_bytes(path: Path, error=UserError) -> bytes:
    with os.fdopen(_open_regular(path, error), "rb") as f:
        return f.read()


def _sha256_nofollow(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with os.fdopen(_open_regular(path, CorruptAdapter), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        return False


def _is_real_dir(p: Path) -> bool:
    """A directory that is not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(p).st_mode)
    except OSError:
        return False


def _read_json(path: Path, field_name: str | None = None, *, follow: bool = True) -> dict:
    try:
        text = path.read_text(encoding="utf-8") if follow else _read_bytes(path).decode("utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise UserError("file not found", file=str(path), field=field_name) from None
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(path), field=field_name) from None
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno, field=field_name) from None
    if not isinstance(data, dict):
        raise UserError("expected a JSON object", file=str(path))
    return data


def inspect_adapter(path: str | Path) -> tuple[dict, dict | None, list[str], list[str]]:
    """(adapter_config, sidecar, compatibility problems, gate problems) for an adapter directory."""
    p = Path(path)
    if not p.is_dir():
        raise UserError("not a directory; expected a PEFT adapter directory", file=str(p))
    if not (p / ADAPTER_CONFIG).is_file():
        raise UserError(f"no {ADAPTER_CONFIG}: not a PEFT adapter", file=str(p))
    if not (p / ADAPTER_WEIGHTS).is_file():
        hint = " (found adapter_model.bin: pickled weights are refused, re-save with safe_serialization)" \
            if (p / "adapter_model.bin").exists() else ""
        raise UserError(f"no {ADAPTER_WEIGHTS}{hint}", file=str(p))
    cfg = _read_json(p / ADAPTER_CONFIG)
    sidecar = _read_json(p / SIDECAR) if (p / SIDECAR).is_file() else None
    problems = check_adapter_config(cfg, str(p / ADAPTER_CONFIG))
    problems += _check_safetensors(p / ADAPTER_WEIGHTS)
    return cfg, sidecar, problems, gate_problems(sidecar, p / ADAPTER_WEIGHTS)


def _check_safetensors(path: Path) -> list[str]:
    """A readable safetensors header whose tensors are LoRA A/B only (no embedded full modules)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # header truncated, not safetensors at all
        return [f"{path.name} is not a readable safetensors file ({type(e).__name__}: {e})"]
    if not keys:
        return [f"{path.name} holds no tensors"]
    odd = [k for k in keys if "lora_A" not in k and "lora_B" not in k]
    if odd:
        return [f"{path.name} holds non-LoRA tensors (e.g. {odd[0]!r}): vLLM would refuse them"]
    return []


def check_entries(src: Path) -> None:
    """Refuse an adapter directory holding a symlink or anything that is not a regular file or directory (a
    FIFO, a socket, a device): a link named README.md would copy any file the pushing process can read into
    the registry, and a FIFO would block the push."""
    with os.scandir(src) as it:
        for entry in sorted(it, key=lambda e: e.name):
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise UserError("is a symbolic link: links inside an adapter directory are refused (they could copy "
                                "any file this process can read into the registry); replace it with the real file "
                                "(cp -L)", file=str(src / entry.name))
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UserError("is not a regular file or directory (a FIFO, socket or device): refused",
                                file=str(src / entry.name))


def _copy_file(src: Path, dst: Path) -> None:
    """Copy one regular file without following a symlink (a link swapped in after the check is refused too)."""
    with os.fdopen(_open_regular(src), "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _manifest_files(d: Path) -> dict[str, dict]:
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256_nofollow(p)}
            for p in sorted(d.iterdir()) if _is_regular(p) and p.name != MANIFEST}


def _stat_sig(p: Path) -> tuple:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return (None,)
    return (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Registry:
    """A registry directory: `adapters/<name>/<vN>/`, `routes.json`, and the lock every writer takes."""

    def __init__(self, root: str | Path, *, create: bool = True):
        self.root = Path(root).expanduser()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise UserError("registry directory does not exist", file=str(self.root))
        self.adapters_dir = self.root / "adapters"
        self.routes_path = self.root / "routes.json"
        # (name, version) -> the stat signature of every file when its sha256 last matched the manifest
        self._verified: dict[tuple[str, str], tuple] = {}
        self._clean_stale_if_free()

    def lock(self) -> FileLock:
        """The one writer lock: pushes and route changes from any process serialise on it."""
        return FileLock(str(self.root / ".registry.lock"), timeout=LOCK_TIMEOUT_S)

    def locked(self):
        lock = self.lock()
        try:
            lock.acquire()
        except Timeout:
            raise UserError(f"registry is locked by another writer for over {LOCK_TIMEOUT_S:.0f} s",
                            file=str(self.root / ".registry.lock")) from None
        return _Held(lock)

    # ---- stale temp directories ----------------------------------------------------------------------------
    def _stale_dirs(self) -> list[Path]:
        if not self.adapters_dir.is_dir():
            return []
        out = []
        for d in self.adapters_dir.iterdir():
            if _is_real_dir(d) and NAME_RE.match(d.name):
                out += [p for p in d.iterdir() if TEMP_RE.match(p.name)]
        return sorted(out)

    def clean_stale_locked(self) -> list[Path]:
        """Remove the `.vN.tmp-*` (and `.vN.old-*`) directories killed pushes left. The caller holds the lock:
        every push holds it while its temp directory exists, so any one seen now belongs to no live push."""
        removed = []
        for p in self._stale_dirs():
            if _is_real_dir(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            if not os.path.lexists(p):
                removed.append(p)
        return removed

    def _clean_stale_if_free(self) -> None:
        """On open: clean up after killed pushes when no writer holds the lock (never wait for one, and never
        touch the temp directory of a push in progress: it holds the lock, so this does nothing then)."""
        try:
            if not self._stale_dirs():
                return
            lock = FileLock(str(self.root / ".registry.lock"), timeout=0)
            lock.acquire()
        except (Timeout, OSError):
            return
        try:
            self.clean_stale_locked()
        finally:
            lock.release()

    # ---- reading -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.adapters_dir.is_dir():
            return []
        return sorted(p.name for p in self.adapters_dir.iterdir() if _is_real_dir(p) and NAME_RE.match(p.name))

    def versions(self, name: str) -> list[str]:
        d = self.adapters_dir / name
        if not _is_real_dir(d):
            return []
        vs = [p.name for p in d.iterdir()
              if VERSION_RE.match(p.name) and _is_real_dir(p) and _is_regular(p / MANIFEST)]
        return sorted(vs, key=version_number)

    def exists(self, name: str, version: str | None = None) -> bool:
        if version is None:
            return bool(self.versions(name))
        d = self.adapters_dir / name
        return _is_real_dir(d) and _is_real_dir(d / version) and _is_regular(d / version / MANIFEST)

    def info(self, name: str, version: str) -> VersionInfo:
        validate_name(name)
        version = normalize_version(version)
        d = self.adapters_dir / name / version
        if not self.exists(name, version):
            known = ", ".join(self.versions(name)) or "none"
            raise NotFound(f"adapter {name}@{version} is not in the registry (versions: {known})",
                           file=str(self.root), field="version")
        return VersionInfo(name, version, d, _read_json(d / MANIFEST, follow=False))

    def latest(self, name: str) -> VersionInfo:
        vs = self.versions(validate_name(name))
        if not vs:
            raise NotFound(f"adapter {name!r} is not in the registry", file=str(self.root), field="name")
        return self.info(name, vs[-1])

    def list(self) -> list[dict]:
        """Every adapter and version with its manifest summary (for `registry list` and `/v1/models`)."""
        out = []
        for name in self.names():
            for v in self.versions(name):
                m = _read_json(self.adapters_dir / name / v / MANIFEST, follow=False)
                out.append({"name": name, "version": v, "ref": f"{name}@{v}", "rank": m.get("rank"),
                            "target_modules": m.get("target_modules"), "pushed_at": m.get("pushed_at"),
                            "forced": m.get("forced", False), "base_model": m.get("base_model")})
        return out

    def verify(self, name: str, version: str) -> VersionInfo:
        """Re-hash every file against the manifest; refuse anything missing, extra, changed or not safetensors,
        and anything in the version directory that is not a regular file (a planted symlink is never read)."""
        vi = self.info(name, version)
        files = vi.manifest.get("files") or {}
        if not isinstance(files, dict) or ADAPTER_WEIGHTS not in files or ADAPTER_CONFIG not in files:
            raise CorruptAdapter("manifest lists no adapter weights/config", file=str(vi.path / MANIFEST))
        for p in sorted(vi.path.iterdir()):
            if not _is_regular(p):
                kind = "a symbolic link" if p.is_symlink() else "not a regular file"
                raise CorruptAdapter(f"{kind} inside a version directory: refusing to load {name}@{vi.version}",
                                     file=str(p))
        present = {p.name for p in vi.path.iterdir() if p.name != MANIFEST}
        extra = present - set(files)
        if extra:
            raise CorruptAdapter(f"files not in the manifest: {sorted(extra)}", file=str(vi.path))
        signature = []
        for fname in sorted(files):
            fp = vi.path / fname
            if fname.endswith((".bin", ".pt", ".pth", ".pkl")):
                raise CorruptAdapter("pickled weights are never loaded", file=str(fp))
            try:
                st = os.lstat(fp)
            except FileNotFoundError:
                raise CorruptAdapter("file listed in the manifest is missing", file=str(fp)) from None
            signature.append((fname, st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        signature.append((MANIFEST, *_stat_sig(vi.path / MANIFEST)))
        key = (name, vi.version)
        if self._verified.get(key) == tuple(signature):
            # unchanged since it last hashed clean: any write to a file moves its ctime, which no user can set
            return vi
        for fname, meta in files.items():
            fp = vi.path / fname
            if not _is_regular(fp):
                raise CorruptAdapter("file listed in the manifest is missing", file=str(fp))
            meta = meta if isinstance(meta, dict) else {}
            if os.lstat(fp).st_size != meta.get("size") or _sha256_nofollow(fp) != meta.get("sha256"):
                self._verified.pop(key, None)
                raise CorruptAdapter(f"sha256 mismatch against {MANIFEST}: the stored adapter was modified or "
                                     "corrupted; refusing to load it", file=str(fp), field="sha256")
        self._verified[key] = tuple(signature)
        return vi

    def route_refusals(self, routes: dict, name: str, alias: str, weights: dict[str, int]) -> list[str]:
        """Why arms of `weights` that `name@alias` does not serve yet may not take traffic (verdicts.py): each needs
        a passing eval verdict for its weights against a version the alias serves now (`routes` is the routes.json
        document), or any passing verdict when it serves nothing. Verdicts are read from the version's own
        sidecar and from the directory it was pushed from, when that still holds a sidecar."""
        current = ((routes.get("routes") or {}).get(name, {}).get(alias) or {}).get("weights") or {}
        live = [v for v, w in current.items() if w > 0]
        out = []
        for version, w in weights.items():
            if w <= 0 or version in live:
                continue
            vi = self.info(name, version)
            sha = ((vi.manifest.get("files") or {}).get(ADAPTER_WEIGHTS) or {}).get("sha256")
            source = vi.manifest.get("source")
            sidecars = [self._sidecar_or_none(vi.path), self._sidecar_or_none(source) if source else None]
            why = route_problem(sidecars, sha, name=name, version=vi.version, alias=alias, live=live,
                                where=str(source or vi.path))
            if why:
                out.append(why)
        return out

    def route_check(self, *, force: bool = False):
        """The check a route change runs under the registry lock (`RouteTable(registry, check=...)`): refuses
        (`Refused`, exit 1) a new arm without a passing verdict, or with `force` lets it through and returns the
        fields that record it on the route and in the audit log (`forced`, `forced_reasons`)."""
        def check(routes: dict, name: str, alias: str, weights: dict[str, int]) -> dict:
            reasons = self.route_refusals(routes, name, alias, weights)
            if reasons and not force:
                raise Refused("; ".join(reasons) + f" — {name}@{alias} is unchanged (use --force to route anyway; "
                              "it will be recorded in the route history)", field="alias")
            return {"forced": True, "forced_reasons": reasons} if reasons else {}
        return check

    @staticmethod
    def _sidecar_or_none(d: str | Path) -> dict | None:
        """A sidecar to read verdicts from; a missing or unreadable one holds none (it cannot vouch for anything)."""
        try:
            return read_sidecar(d) if _is_real_dir(Path(d)) else None
        except (UserError, OSError):
            return None

    # ---- writing -------------------------------------------------------------------------------------------
    def push(self, name: str, path: str | Path, *, force: bool = False, note: str | None = None,
             require_verdict: bool = True) -> VersionInfo:
        """Copy an adapter directory into the next immutable version; refuse unservable or gate-failed ones, and
        (`require_verdict`, the default) ones without a passing eval verdict for these weights (verdicts.py).

        `force` pushes despite problems and records them in the manifest (`forced`, `forced_reasons`) and in the
        routes audit log, so a forced version is always visible as such. `require_verdict=False` is for adapters
        nobody means to ship (random test adapters, benchmarks): the verdict is not asked for, nothing is forced.
        """
        validate_name(name)
        src = Path(path).expanduser()
        if src.is_dir():
            check_entries(src)
        cfg, sidecar, problems, gate = inspect_adapter(src)
        hard = [p for p in problems if "not a readable safetensors" in p or "holds no tensors" in p]
        if hard:
            raise UserError("; ".join(hard), file=str(src / ADAPTER_WEIGHTS))
        checked_sha = sha256_file(src / ADAPTER_WEIGHTS) if require_verdict else None
        missing = push_problem(sidecar, checked_sha, str(src)) if require_verdict else None
        gate = gate + ([missing] if missing else [])
        if (problems or gate) and not force:
            what = []
            if problems:
                what.append("not servable unchanged by vLLM/gemtune: " + "; ".join(problems))
            own = [g for g in gate if g != missing]
            if own:
                what.append("its own checks say it must not ship: " + "; ".join(own))
            if missing:
                what.append(missing)
            raise (UserError if problems else Refused)(
                " | ".join(what) + " (use --force to push anyway; it will be recorded)",
                file=str(src / (ADAPTER_CONFIG if problems else SIDECAR)))
        passing = [v for v in for_weights([sidecar], checked_sha) if v.get("passed") is True]
        with self.locked():
            self.clean_stale_locked()
            # the push is recorded in routes.json's audit log: a damaged file refuses the push before anything
            # exists, instead of failing after the version was made (a retry would then make a second one)
            try:
                routes = read_routes(self.routes_path)
            except UserError as e:
                raise UserError(f"{e} (nothing was pushed: a push is recorded in routes.json, so fix or restore it "
                                "first)") from None
            parent = self.adapters_dir / name
            parent.mkdir(parents=True, exist_ok=True)
            if not _is_real_dir(parent):
                raise UserError("is not a directory (a symlink?): refusing to push into it", file=str(parent))
            taken = [version_number(p.name) for p in parent.iterdir() if VERSION_RE.match(p.name)]
            version = f"v{max(taken, default=0) + 1}"  # a half-broken vN without a manifest is never reused
            final = parent / version
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=str(parent)))
            try:
                os.chmod(tmp, 0o755)
                for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *OPTIONAL_FILES):
                    if os.path.lexists(src / fname):
                        _copy_file(src / fname, tmp / fname)
                manifest = {
                    "name": name, "version": version, "pushed_at": now(), "source": str(src.resolve()),
                    "rank": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
                    "target_modules": cfg.get("target_modules"),
                    "base_model": base_named_in(sidecar or {}, cfg),
                    "forced": bool(force and (problems or gate)),
                    "forced_reasons": (problems + gate) if force else [],
                    "note": note, "files": _manifest_files(tmp),
                    "eval_verdict": passing[-1] if passing else None,
                }
                copied = manifest["files"][ADAPTER_WEIGHTS]["sha256"]
                if checked_sha is not None and copied != checked_sha:
                    raise UserError(f"the weights changed during the push (checked sha256 {checked_sha[:12]}…, "
                                    f"copied {copied[:12]}…): nothing was pushed", file=str(src / ADAPTER_WEIGHTS))
                atomic_write_json(tmp / MANIFEST, manifest)
                _make_read_only(tmp)
                append_log(routes, {"event": "push", "ref": f"{name}@{version}",
                                    "forced": manifest["forced"], "reasons": manifest["forced_reasons"]})
                os.rename(tmp, final)  # the commit point: the version exists from here on
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            try:
                fsync_dir(parent)
                atomic_write_json(self.routes_path, routes)
            except BaseException:
                # not recorded, so not pushed: take the version back (the lock is held, so no route names it)
                undo = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=str(parent)))
                with contextlib.suppress(OSError):
                    os.rename(final, undo / version)
                shutil.rmtree(undo, ignore_errors=True)
                raise
        return VersionInfo(name, version, final, manifest)


class _Held:
    def __init__(self, lock: FileLock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _make_read_only(d: Path) -> None:
    """Immutable on disk too: a stray `cp` over a version fails instead of silently changing what serves."""
    for p in d.iterdir():
        if p.is_file():
            os.chmod(p, 0o444)
