"""`gemtune data build` as a library call: raw files in, a dataset directory out, every row accounted for.

    read ─► sanitise + PII redaction ─► review + answer schema ─► benchmark decontamination ─► token limit ─► ids
         ─► dedup/decontaminate ─► split (or lock) ─► balance ─► generic mix ─► canaries
         ─► write (atomically: train, eval, lock, quarantine, report, dataset.json)

`build` is that list, one function a step (`_plan`, `_load_tokenizer`, `_read_inputs` (with review, schema and
`_drop_benchmark_rows`), `_limit_tokens`, `_assign_ids`, `_dedup`, `_drop_id_collisions`, `_split`, `_balance`,
`_mix`, `_records`, `_count`, `_report`, `_write`); row-level state (the examples, their hashes and ids, the quarantine, PII counts, timings, warnings) lives
on one `_Run`, and each step returns what the next ones need.

Accounting (checked before anything is written):
    input_rows = train − generic_added + eval + quarantined + exact_duplicates + near_duplicates
                 + decontaminated + balanced_out
(rows failing review, their answer schema or benchmark decontamination are quarantined, with the reason).
The output directory is built under a temporary name and renamed into place, so a failed or interrupted build
never leaves a half-written dataset that training could pick up.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

from gemtune.data import canaries as canary_mod
from gemtune.data.balance import balance
from gemtune.config import warn_advised
from gemtune.data.checks import provenance_key, raw_provenance, resolve_schema, review_reason, schema_reason
from gemtune.data.config import DataConfig
from gemtune.data.decontaminate import Benchmark, decontaminate, match_benchmarks, read_benchmark, register_eval
from gemtune.data.dedup import NearDup, normalise_key
from gemtune.data.mix import GENERIC_TASK, choose_generic, generic_count, read_generic
from gemtune.data.pii import Redactor
from gemtune.data.readers import expand_inputs, read_rows
from gemtune.data.records import DATASET_FILES, content_sha256, make_record, tokenizer_sha256
from gemtune.data.report import build_report, provenance_table, render_html
from gemtune.data.sanitise import ControlTokens, Example, Reject, sanitise_row
from gemtune.data.split import make_lock, read_lock, resolve_locked, stratified_split, rank_key
from gemtune.data.tokens import TokenCounter
from gemtune.errors import UserError
from gemtune.utils import (atomic_dir, atomic_write_json, atomic_write_text, check_out_dir, sha256_bytes,
                           sha256_file)

Progress = Callable[[str, int, Optional[int]], None]  # (stage, rows done so far, total or None)


def _no_progress(stage: str, done: int, total: Optional[int]) -> None:
    pass


@dataclass
class _Run:
    """State shared by the stages of one build."""

    cfg: DataConfig
    progress: Progress
    redactor: Redactor
    examples: list[Example] = field(default_factory=list)  # domain rows first, then generic rows
    n_domain: int = 0
    quarantine: list[dict] = field(default_factory=list)
    pii: dict[str, int] = field(default_factory=dict)
    pii_quarantine: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    shas: list[str] = field(default_factory=list)  # per example, from `_assign_ids`
    ids: list[str] = field(default_factory=list)
    prov_quarantined: Counter = field(default_factory=Counter)  # (source, review_status, license) -> rows
    benchmark_hits: list[dict] = field(default_factory=list)  # quarantined by benchmark decontamination

    def timed(self, name: str) -> "_Timer":
        """`with run.timed("dedup"):` adds the block's wall time to the report's `timings_s[name]`."""
        return _Timer(self, name)

    def quarantine_row(self, file: str, line: int, reason: str, raw: str, stage: str, generic: bool = False,
                       provenance: Optional[dict] = None) -> None:
        text, _ = self.redactor.redact(raw, self.pii_quarantine)
        q = {"file": file, "line": line, "reason": reason, "raw": text, "stage": stage}
        if generic:
            q["generic"] = True
        self.quarantine.append(q)
        self.prov_quarantined[provenance_key(provenance)] += 1

    def quarantine_example(self, e: Example, reason: str, stage: str, generic: bool) -> None:
        self.quarantine_row(e.file, e.line, reason, e.raw, stage, generic, e.provenance)

    def quarantine_raw(self, row, reason: str, stage: str, generic: bool) -> None:
        """A row sanitising rejected: its provenance, as far as it can be read, still counts in the report."""
        prov = raw_provenance(row.data, self.cfg.columns, self.cfg.provenance, Path(row.file).name)
        prov = {k: self.redactor.redact(v)[0] if isinstance(v, str) else v for k, v in prov.items()}
        self.quarantine_row(row.file, row.line, reason, row.raw, stage, generic, prov)


def schema_of(e: Example) -> Optional[dict]:
    """The JSON Schema the example's answer satisfies (its own, or its task's from the config), set by `_admit`."""
    return e.extra.get("schema")


def _admit(run: _Run, e: Example, generic: bool) -> Optional[tuple[str, str]]:
    """Review and answer-schema checks of a sanitised row: None to keep it, else (stage, quarantine reason)."""
    cfg = run.cfg
    why = review_reason(e.provenance, cfg.require_review, generic=generic, review_generic=cfg.review_generic)
    if why:
        return "review", why
    schema = resolve_schema(getattr(e, "schema", None), e.task, cfg.schemas)
    why = schema_reason(e.messages, schema)
    if why:
        return "schema", why
    if schema is not None:
        e.extra["schema"] = schema
    return None


class _Timer:
    def __init__(self, run: _Run, name: str):
        self.run, self.name = run, name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.run.timings[self.name] = round(self.run.timings.get(self.name, 0.0) + time.perf_counter() - self.t, 3)


# ------------------------------------------------------------------------------------------------ stages
def _read(run: _Run, files: Sequence[Path], control: ControlTokens, *, generic: bool) -> tuple[int, list[dict]]:
    """Sanitise + redact every row of `files` into run.examples; bad rows to quarantine. Returns (rows, per-file)."""
    redact = (lambda t: run.redactor.redact(t, run.pii)[0]) if not generic else (lambda t: run.redactor.redact(t)[0])
    total, per_file = 0, []
    stage = "generic" if generic else "read"
    for f in files:
        n = q = 0
        rows = read_generic(f) if generic else read_rows(f)
        for row in rows:
            n += 1
            try:
                e = sanitise_row(row, run.cfg, control, redact=redact, task_default=GENERIC_TASK if generic else None)
            except Reject as r:
                q += 1
                run.quarantine_raw(row, r.reason, "sanitise", generic)
            except (RecursionError, ValueError, TypeError, UnicodeError, OverflowError) as e:
                # a row no rule foresaw must cost one quarantine line, never the build
                q += 1
                run.quarantine_raw(row, f"unusable row ({type(e).__name__}: {str(e)[:200]})", "sanitise", generic)
            else:
                refused = _admit(run, e, generic)
                if refused:
                    q += 1
                    run.quarantine_example(e, refused[1], refused[0], generic)
                else:
                    run.examples.append(e)
            if n % 2000 == 0:
                run.progress(stage, total + n, None)
        total += n
        per_file.append({"file": str(f), "rows": n, "quarantined": q, "sha256": sha256_file(f)})
        run.progress(stage, total, None)
    return total, per_file


def _token_limit(run: _Run, counter: TokenCounter) -> tuple[list[Optional[int]], list[bool]]:
    """Quarantine examples over max_tokens. Returns (lengths, in-statistics-sample flags) of the kept examples;
    a length is None where the row provably fits and was not counted (large datasets, see tokens.py)."""
    done = 0
    total = len(run.examples)

    def tick(k: int) -> None:
        nonlocal done
        done += k
        run.progress("tokens", done, total)

    lengths, sample = counter.limit_and_sample([e.messages for e in run.examples], run.cfg.max_tokens, progress=tick)
    keep_ex, keep_len, keep_sample, n_domain = [], [], [], 0
    for i, (e, n) in enumerate(zip(run.examples, lengths)):
        is_domain = i < run.n_domain
        if n is not None and n > run.cfg.max_tokens:
            run.quarantine_example(e, f"too long: {n} tokens > max_tokens {run.cfg.max_tokens} "
                                      f"(chat template included, {counter.base} tokenizer)", "tokens", not is_domain)
            continue
        keep_ex.append(e)
        keep_len.append(n)
        keep_sample.append(i in sample)
        n_domain += is_domain
    run.examples, run.n_domain = keep_ex, n_domain
    return keep_len, keep_sample


def _resolve_lock_path(cfg: DataConfig, out: Path) -> Optional[str]:
    if cfg.eval_lock and cfg.refreeze:
        raise UserError("--eval-lock and --refreeze contradict each other: keep the lock or draw a new eval set",
                        field="refreeze")
    if cfg.eval_lock:
        return cfg.eval_lock
    existing = out / "eval.lock.json"
    if existing.is_file() and not cfg.refreeze:
        return str(existing)
    return None


def _plant_canaries(cfg: DataConfig, counter: TokenCounter, train: list[dict], eligible: list[int]) -> list[dict]:
    """Plant canaries in domain train rows that keep room for them under max_tokens (counted exactly)."""
    import random

    rng = random.Random(f"canary-rows:{cfg.seed}")
    pool = rng.sample(eligible, min(len(eligible), 4 * cfg.canaries + 16))
    room = [k for k, n in zip(pool, counter.count([train[k]["messages"] for k in pool])) if n + 48 <= cfg.max_tokens]
    if len(room) < cfg.canaries:
        raise UserError(f"--canaries {cfg.canaries} needs that many domain train rows with room for a canary; "
                        f"found {len(room)}", field="canaries")
    return canary_mod.plant(train, room, cfg.canaries, cfg.seed)


def _no_usable_rows(run: _Run, files: Sequence[Path], input_rows: int) -> UserError:
    names = ", ".join(str(f) for f in files)
    if input_rows == 0:
        return UserError(f"no rows in {names}", field="INPUT")
    reasons = Counter(q["reason"] for q in run.quarantine if not q.get("generic"))
    top = "; ".join(f"{r} ({n}×)" for r, n in reasons.most_common(3))
    first = next((q for q in run.quarantine if not q.get("generic")), None)
    where = f" first at {first['file']}:{first['line']}" if first else ""
    return UserError(f"no usable row: all {input_rows} input rows were rejected —{where}; reasons: {top}", field="INPUT")


# ------------------------------------------------------------------------------------------------ build
OUTPUT_FILES = frozenset(DATASET_FILES) | {"report.html"}
WRITER = "gemtune data build"


def is_dataset_output(d: Path) -> bool:
    """A dataset directory written before gemtune marked its outputs: only build files, dataset.json among them."""
    try:
        names = {p.name for p in d.iterdir()}
    except OSError:
        return False
    return "dataset.json" in names and names <= OUTPUT_FILES


def build(inputs: Sequence[str | Path], out: str | Path, config: Optional[DataConfig] = None, *,
          progress: Optional[Progress] = None, overwrite: bool = False) -> dict:
    """Build a dataset directory from raw files; return the report (also written to `out/report.json`).

    Raises UserError (CLI exit 2) for missing/unreadable inputs, bad options, a broken eval lock, or when no row
    at all is usable. Bad rows never raise: they are quarantined and counted.
    `out` is replaced whole; it must be missing, empty or a gemtune output (see `utils.check_out_dir`) unless
    `overwrite`, and no input may lie inside it.
    """
    cfg = config or DataConfig()
    out = Path(out)
    t_start = time.perf_counter()
    run = _Run(cfg=cfg, progress=progress or _no_progress, redactor=make_redactor(cfg),
               warnings=advice_warnings(cfg))
    src = _plan(cfg, inputs, out, overwrite)
    counter, control = _load_tokenizer(run)
    read = _read_inputs(run, src, control)  # read → sanitise + PII → review + answer schema → benchmarks
    lengths, in_sample = _limit_tokens(run, counter, src, read)
    _assign_ids(run)
    dd = _dedup(run, src)  # exact/near duplicates; rows of a locked eval set are decontaminated here
    kept = _drop_id_collisions(run, dd)
    eval_idx, train_idx = _split(run, src, dd, kept)  # frozen eval (+ decontamination dedup could not see)
    train_idx, balanced_out, balance_report = _balance(run, train_idx)
    chosen_generic, generic_report = _mix(run, src, dd, read, len(train_idx))
    recs = _records(run, counter, eval_idx, train_idx, chosen_generic)
    counts = _count(run, read, dd, balanced_out, recs)
    report = _report(run, src, counter, read, dd, counts, recs, lengths, in_sample, balance_report, generic_report,
                     balanced_out)
    _write(run, out, src, counter, recs, counts, report, read, t_start)
    report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    return report


# ------------------------------------------------------------------------------------------------ steps
@dataclass
class _Sources:
    """What one build reads: the input files, the generic files, the eval lock it keeps (if any)."""

    files: list[Path]
    generic_files: list[Path]
    guard: dict
    lock_path: Optional[str]
    lock: Optional[dict]
    benchmarks: list[Benchmark] = field(default_factory=list)


@dataclass
class _ReadResult:
    input_rows: int
    per_file: list[dict]
    generic_rows: int
    generic_files_info: list[dict]
    control_tokens: int = 0


@dataclass
class _DedupResult:
    nd: NearDup
    verdicts: dict
    locked: list[int]
    exact: list[int]
    near: list[int]
    decon: dict[int, tuple[int, float]]
    kept: list[int]
    conflicts: list[dict]


@dataclass
class _Records:
    eval_idx: list[int]
    train_idx: list[int]  # domain rows only
    chosen_generic: list[int]
    train_order: list[int]  # domain + generic, in the order written
    train: list[dict]
    eval: list[dict]
    canaries: list[dict]


def make_redactor(cfg: DataConfig) -> Redactor:
    """The PII redactor `cfg` asks for (engine, region, names pass, spaCy pipeline for Presidio)."""
    return Redactor(cfg.pii_engine, cfg.pii_region, names=cfg.pii_names, spacy_model=cfg.pii_spacy_model)


def advice_warnings(cfg: DataConfig) -> list[str]:
    """The values the playbook advises against (eval share, generic mix), as the report's warnings; loading the
    config from YAML or flags printed them already (see `gemtune.config.warn_advised`)."""
    return warn_advised(cfg, "data", warn=lambda _: None)


def _plan(cfg: DataConfig, inputs: Sequence[str | Path], out: Path, overwrite: bool) -> _Sources:
    """Expand the inputs, check the output directory may be replaced, read the eval lock to keep."""
    files = expand_inputs(list(inputs))
    generic_files = expand_inputs(cfg.generic) if cfg.generic else []
    guard = {"writer": WRITER, "overwrite": overwrite, "inputs": [*files, *generic_files],
             "recognise": is_dataset_output}
    check_out_dir(out, **{k: v for k, v in guard.items() if k != "writer"})
    lock_path = _resolve_lock_path(cfg, out)
    lock = read_lock(lock_path) if lock_path else None
    benchmarks = [read_benchmark(b.path, b.column) for b in cfg.decontaminate]
    return _Sources(files, generic_files, guard, lock_path, lock, benchmarks)


def _load_tokenizer(run: _Run) -> tuple[TokenCounter, ControlTokens]:
    with run.timed("tokenizer"):
        counter = TokenCounter(run.cfg.base_name())
        return counter, ControlTokens(counter.tokenizer, counter.special_tokens)


def _read_inputs(run: _Run, src: _Sources, control: ControlTokens) -> _ReadResult:
    """Domain rows, then generic rows, into run.examples (sanitised, PII redacted, reviewed, answers checked against
    their schema, benchmark copies quarantined); refuse a build with none."""
    with run.timed("read"):
        input_rows, per_file = _read(run, src.files, control, generic=False)
        run.n_domain = len(run.examples)
        if run.n_domain == 0:
            raise _no_usable_rows(run, src.files, input_rows)
        generic_rows, generic_info = (_read(run, src.generic_files, control, generic=True) if src.generic_files
                                      else (0, []))
    control_tokens = sum(e.control_tokens for e in run.examples[:run.n_domain])
    read = _ReadResult(input_rows, per_file, generic_rows, generic_info, control_tokens)
    _drop_benchmark_rows(run, src, read)
    return read


def _drop_benchmark_rows(run: _Run, src: _Sources, read: _ReadResult) -> None:
    """Quarantine every row (domain or generic) whose key near-duplicates a benchmark row; refuse a build with
    no domain row left."""
    if not src.benchmarks:
        return
    with run.timed("benchmarks"):
        hits = match_benchmarks([e.key_text for e in run.examples], src.benchmarks, run.cfg.near_dup_threshold)
        if not hits:
            return
        keep, n_domain = [], 0
        for i, e in enumerate(run.examples):
            hit = hits.get(i)
            if hit is None:
                keep.append(e)
                n_domain += i < run.n_domain
                continue
            run.quarantine_example(e, hit.reason(src.benchmarks), "benchmark", i >= run.n_domain)
            run.benchmark_hits.append({"file": e.file, "line": e.line, "generic": i >= run.n_domain,
                                       "benchmark": src.benchmarks[hit.benchmark].path, "benchmark_line": hit.line,
                                       "jaccard": round(hit.jaccard, 3)})
        run.examples, run.n_domain = keep, n_domain
    if run.n_domain == 0:
        raise _no_usable_rows(run, src.files, read.input_rows)


def _limit_tokens(run: _Run, counter: TokenCounter, src: _Sources, read: _ReadResult
                  ) -> tuple[list[Optional[int]], list[bool]]:
    with run.timed("tokens"):
        lengths, in_sample = _token_limit(run, counter)
    if run.n_domain == 0:
        raise _no_usable_rows(run, src.files, read.input_rows)
    return lengths, in_sample


def _assign_ids(run: _Run) -> None:
    """run.shas (content hashes) and run.ids (the row's own id, else a hash prefix; generic rows marked)."""
    run.shas, run.ids = [], []
    for i, e in enumerate(run.examples):
        sha = content_sha256(e.task, e.messages, e.label, schema_of(e), e.tools)
        run.shas.append(sha)
        if e.id is not None:
            run.ids.append(e.id if i < run.n_domain else f"generic:{e.id}")
        else:
            run.ids.append(sha[:16] if i < run.n_domain else f"generic-{sha[:16]}")


def _dedup(run: _Run, src: _Sources) -> _DedupResult:
    """Exact and near duplicates among domain rows (first seen is kept); with a lock, its eval rows are registered
    first, so a train row duplicating one is decontaminated instead."""
    cfg, ex, nd_count = run.cfg, run.examples, run.n_domain
    with run.timed("dedup"):
        keys = [normalise_key(e.key_text) for e in ex]
        nd = NearDup(keys, scopes=[e.task for e in ex] if cfg.dedup_scope == "task" else None,
                     threshold=cfg.near_dup_threshold)
        locked = (resolve_locked(src.lock, src.lock_path, run.ids[:nd_count], run.shas[:nd_count])
                  if src.lock else [])
        register_eval(nd, locked)
        locked_set = set(locked)
        order = [i for i in range(nd_count) if i not in locked_set]
        done = len(locked)

        def tick(k: int) -> None:
            nonlocal done
            done += k
            run.progress("dedup", done, nd_count)

        verdicts = dict(zip(order, nd.check_many(order, progress=tick)))
    exact = [i for i, v in verdicts.items() if v.status == "exact"]
    near = [i for i, v in verdicts.items() if v.status == "near"]
    decon = {i: (v.match, v.jaccard) for i, v in verdicts.items() if v.status == "decontaminated"}
    kept = [i for i in range(nd_count) if i not in locked_set and verdicts[i].status == "kept"]
    return _DedupResult(nd, verdicts, locked, exact, near, decon, kept, _conflicts(ex, exact, verdicts))


def _conflicts(ex: list[Example], exact: list[int], verdicts: dict) -> list[dict]:
    """Exact duplicates whose answers disagree: the report shows them (one of the two answers is wrong)."""
    def side(e: Example) -> dict:
        return {"file": e.file, "line": e.line, "output": e.output[:200], "label": e.label}

    out = []
    for i in exact:
        j = verdicts[i].match
        if ex[i].output != ex[j].output or ex[i].label != ex[j].label:
            out.append({"key": ex[i].key_text[:200], "first": side(ex[j]), "duplicate": side(ex[i])})
    return out


def _drop_id_collisions(run: _Run, dd: _DedupResult) -> list[int]:
    """Quarantine usable rows that claim an id an earlier row (or the locked eval set) already holds."""
    ex, ids = run.examples, run.ids
    seen_ids = {ids[i]: i for i in dd.locked}
    unique_kept = []
    for i in dd.kept:
        j = seen_ids.get(ids[i])
        if j is not None:
            run.quarantine_example(ex[i], f'field "id": duplicate id {ids[i]!r} (first used at '
                                          f"{ex[j].file}:{ex[j].line})", "ids", False)
            continue
        seen_ids[ids[i]] = i
        unique_kept.append(i)
    return unique_kept


def _split(run: _Run, src: _Sources, dd: _DedupResult, kept: list[int]) -> tuple[list[int], list[int]]:
    """(eval rows, train rows): the locked eval set kept whole, else a new stratified draw frozen into the lock."""
    cfg, ex = run.cfg, run.examples
    with run.timed("split"):
        if src.lock:
            pinned = sum(1 for i in kept if ex[i].split == "eval")
            if pinned:
                run.warnings.append(f"{pinned} row(s) pinned to split=eval are not in the eval lock and went to train")
            return list(dd.locked), kept
        rows = [(ex[i].task, ex[i].label, run.shas[i], ex[i].split) for i in kept]
        chosen = stratified_split(rows, cfg.eval_fraction, cfg.seed)
        eval_idx = sorted((kept[k] for k in chosen), key=lambda i: run.ids[i])
        train_idx = [kept[k] for k in range(len(kept)) if k not in chosen]
        register_eval(dd.nd, eval_idx)
        if cfg.dedup_scope == "task":
            train_idx = _decontaminate(dd, train_idx)
        return eval_idx, train_idx


def _decontaminate(dd: _DedupResult, train_idx: list[int]) -> list[int]:
    """Train rows near an eval row of another task (task-scoped dedup never compared them) leave train."""
    more = decontaminate(dd.nd, train_idx)
    dd.decon.update(more)
    return [i for i in train_idx if i not in more]


def _balance(run: _Run, train_idx: list[int]) -> tuple[list[int], list[int], dict]:
    """(train rows kept, rows balanced out, balance report): no task/label group above the cap."""
    ex, cfg = run.examples, run.cfg
    with run.timed("balance"):
        removed, report = balance([(ex[i].task, ex[i].label, run.shas[i]) for i in train_idx],
                                  cfg.balance_multiple, cfg.seed)
        balanced_out = [train_idx[k] for k in sorted(removed)]
        return [train_idx[k] for k in range(len(train_idx)) if k not in removed], balanced_out, report


def _mix(run: _Run, src: _Sources, dd: _DedupResult, read: _ReadResult, n_train: int) -> tuple[list[int], dict]:
    """(generic rows added to train, generic report): usable generic rows (not duplicating a domain or eval row)
    up to `generic_fraction` of the final train set."""
    cfg = run.cfg
    report: dict = {"files": read.generic_files_info, "input_rows": read.generic_rows}
    if not src.generic_files:
        return [], report
    with run.timed("generic"):
        g_rows = list(range(run.n_domain, len(run.examples)))
        g_verdicts = dd.nd.check_many(g_rows)
        g_status = Counter(v.status for v in g_verdicts)
        avail = [i for i, v in zip(g_rows, g_verdicts) if v.status == "kept"]
        want = generic_count(n_train, cfg.generic_fraction)
        pick = choose_generic([run.shas[i] for i in avail], min(want, len(avail)), cfg.seed)
        chosen = [avail[k] for k in pick]
        if len(avail) < want:
            run.warnings.append(f"generic mix: wanted {want} rows ({cfg.generic_fraction:.0%} of train) but only "
                                f"{len(avail)} usable generic rows exist")
        report.update(
            quarantined=sum(1 for q in run.quarantine if q.get("generic")),
            duplicates=g_status["exact"] + g_status["near"], decontaminated=g_status["decontaminated"],
            available=len(avail), wanted=want, added=len(chosen), fraction=cfg.generic_fraction)
    return chosen, report


def _records(run: _Run, counter: TokenCounter, eval_idx: list[int], train_idx: list[int],
             chosen_generic: list[int]) -> _Records:
    """The records to write: eval by id, train (domain + generic) in seeded hash order, canaries planted."""
    ex, shas, cfg = run.examples, run.shas, run.cfg

    def record(i: int) -> dict:
        e = ex[i]
        return make_record(run.ids[i], e.task, e.messages, e.provenance, e.label, shas[i], schema=schema_of(e),
                           tools=e.tools)

    eval_records = [record(i) for i in eval_idx]
    train_order = sorted(train_idx + chosen_generic, key=lambda i: rank_key(shas[i], cfg.seed))
    train_records = [record(i) for i in train_order]
    canaries: list[dict] = []
    if cfg.canaries:
        canaries = _plant_canaries(cfg, counter, train_records,
                                   [k for k, i in enumerate(train_order) if i < run.n_domain])
    return _Records(eval_idx, train_idx, chosen_generic, train_order, train_records, eval_records, canaries)


def _count(run: _Run, read: _ReadResult, dd: _DedupResult, balanced_out: list[int], recs: _Records) -> dict:
    """The row counts; refuses (a bug, not a data problem) when they do not account for every input row."""
    counts = {
        "input_rows": read.input_rows,
        "quarantined": sum(1 for q in run.quarantine if not q.get("generic")),
        "exact_duplicates": len(dd.exact),
        "near_duplicates": len(dd.near),
        "decontaminated": len(dd.decon),
        "balanced_out": len(balanced_out),
        "train": len(recs.train),
        "eval": len(recs.eval),
        "generic_added": len(recs.chosen_generic),
        "canaries": len(recs.canaries),
    }
    rhs = (counts["train"] - counts["generic_added"] + counts["eval"] + counts["quarantined"]
           + counts["exact_duplicates"] + counts["near_duplicates"] + counts["decontaminated"]
           + counts["balanced_out"])
    if rhs != read.input_rows:  # refuse to write an unaccounted dataset
        raise RuntimeError(f"row accounting broken: {read.input_rows} in, {rhs} accounted for ({counts})")
    return counts


def _provenance(run: _Run, dd: _DedupResult, balanced_out: list[int], recs: _Records) -> dict:
    """The report's provenance table: rows per (source, review_status, license) kept, quarantined, dropped."""
    ex = run.examples
    kept = Counter(provenance_key(ex[i].provenance) for i in recs.eval_idx + recs.train_order)
    chosen = set(recs.chosen_generic)
    gone = [*dd.exact, *dd.near, *dd.decon, *balanced_out,
            *(i for i in range(run.n_domain, len(ex)) if i not in chosen)]
    dropped = Counter(provenance_key(ex[i].provenance) for i in gone)
    return provenance_table(kept, run.prov_quarantined, dropped, run.cfg.require_review)


def _benchmarks_report(run: _Run, src: _Sources) -> Optional[dict]:
    if not src.benchmarks:
        return None
    return {"files": [b.summary() for b in src.benchmarks], "threshold": run.cfg.near_dup_threshold,
            "removed": sum(1 for h in run.benchmark_hits if not h["generic"]),
            "generic_removed": sum(1 for h in run.benchmark_hits if h["generic"]),
            "examples": run.benchmark_hits[:20]}


def _report(run: _Run, src: _Sources, counter: TokenCounter, read: _ReadResult, dd: _DedupResult, counts: dict,
            recs: _Records, lengths: list[Optional[int]], in_sample: list[bool], balance_report: dict,
            generic_report: dict, balanced_out: list[int]) -> dict:
    cfg, ex, lock = run.cfg, run.examples, src.lock
    eval_idx, train_idx, train_order = recs.eval_idx, recs.train_idx, recs.train_order
    empty_eval = [f"the eval set is empty: too few usable rows for a {cfg.eval_fraction:.0%} split"]
    return build_report(
        cfg=cfg, counts=counts, files=read.per_file,
        base={"name": cfg.base_name(), "path": str(counter.path), "template": counter.family.name},
        pii=run.pii, pii_quarantine=run.pii_quarantine, control_tokens=read.control_tokens,
        quarantine=run.quarantine, exact=[(i, dd.verdicts[i].match) for i in dd.exact],
        near=[(i, dd.verdicts[i].match, dd.verdicts[i].jaccard) for i in dd.near],
        decon=dd.decon, conflicts=dd.conflicts, examples=ex, ids=run.ids,
        train_lengths=[lengths[i] for i in train_order if in_sample[i]],
        eval_lengths=[lengths[i] for i in eval_idx if in_sample[i]],
        max_length=max((lengths[i] for i in train_order + eval_idx if lengths[i] is not None), default=0),
        sampled=not all(in_sample),
        train_groups=Counter((ex[i].task, ex[i].label) for i in train_idx + recs.chosen_generic),
        eval_groups=Counter((ex[i].task, ex[i].label) for i in eval_idx),
        balance=balance_report, generic=generic_report if src.generic_files else None,
        split={"locked": bool(lock), "lock_file": str(src.lock_path) if lock else None,
               "fraction_target": (lock.get("fraction") if lock else cfg.eval_fraction),
               "fraction_actual": round(len(recs.eval) / max(1, len(recs.eval) + len(train_idx)), 4)},
        warnings=run.warnings + (empty_eval if not recs.eval else []),
        n_domain_examples=len(train_idx) + len(recs.eval),
        provenance=_provenance(run, dd, balanced_out, recs), benchmarks=_benchmarks_report(run, src),
    )


def _write(run: _Run, out: Path, src: _Sources, counter: TokenCounter, recs: _Records, counts: dict, report: dict,
           read: _ReadResult, t_start: float) -> None:
    """Everything at once: `out` appears complete (train, eval, lock, quarantine, reports, dataset.json) or not at
    all; the canaries file (outside `out`) after it."""
    cfg, lock = run.cfg, src.lock
    canary_path = Path(cfg.canary_file) if cfg.canary_file else canary_mod.default_canary_path(out)
    with run.timed("write"):
        run.progress("write", 0, None)
        with atomic_dir(out, **src.guard) as tmp:
            _write_jsonl(tmp / "train.jsonl", recs.train)
            eval_bytes = _write_jsonl(tmp / "eval.jsonl", recs.eval)
            fraction = lock.get("fraction", cfg.eval_fraction) if lock else cfg.eval_fraction
            lock_doc = make_lock(recs.eval, fraction, eval_bytes)
            lock_bytes = (json.dumps(lock_doc, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
            (tmp / "eval.lock.json").write_bytes(lock_bytes)
            _write_jsonl(tmp / "quarantine.jsonl", run.quarantine)
            report["timings_s"] = dict(run.timings, total=round(time.perf_counter() - t_start, 3))
            report["eval_lock_sha256"] = sha256_bytes(lock_bytes)
            atomic_write_json(tmp / "report.json", report)
            atomic_write_text(tmp / "report.html", render_html(report))
            atomic_write_json(tmp / "dataset.json", {
                "version": 1,
                "base": report["base"],
                "tokenizer_sha256": tokenizer_sha256(counter.path),
                "eval_lock_sha256": sha256_bytes(lock_bytes),
                "eval_sha256": lock_doc["eval_sha256"],
                "max_tokens": cfg.max_tokens,
                "counts": counts,
                "options": cfg.model_dump(mode="json"),
                "inputs": read.per_file,
                "provenance": report["provenance"],
                "canaries": ({"count": len(recs.canaries), "file": str(canary_path.resolve())} if recs.canaries
                             else None),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
        if recs.canaries:
            atomic_write_json(canary_path, canary_mod.canary_document(recs.canaries, out))
        run.progress("write", 1, 1)


def _write_jsonl(path: Path, rows: list[dict]) -> bytes:
    data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(data)
    return data
