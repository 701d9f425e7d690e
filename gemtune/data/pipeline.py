"""`gemtune data build` as a library call: raw files in, a dataset directory out, every row accounted for.

    read ─► sanitise + PII redaction ─► token limit ─► ids ─► dedup/decontaminate ─► split (or lock) ─► balance
         ─► generic mix ─► canaries ─► write (atomically: train, eval, lock, quarantine, report, dataset.json)

Accounting (checked before anything is written):
    input_rows = train − generic_added + eval + quarantined + exact_duplicates + near_duplicates
                 + decontaminated + balanced_out
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
from gemtune.data.config import DataConfig
from gemtune.data.decontaminate import decontaminate, register_eval
from gemtune.data.dedup import NearDup, normalise_key
from gemtune.data.mix import GENERIC_TASK, choose_generic, generic_count, read_generic
from gemtune.data.pii import Redactor
from gemtune.data.readers import expand_inputs, read_rows
from gemtune.data.records import DATASET_FILES, content_sha256, make_record, tokenizer_sha256
from gemtune.data.report import build_report, render_html
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

    def quarantine_row(self, file: str, line: int, reason: str, raw: str, stage: str, generic: bool = False) -> None:
        text, _ = self.redactor.redact(raw, self.pii_quarantine)
        q = {"file": file, "line": line, "reason": reason, "raw": text, "stage": stage}
        if generic:
            q["generic"] = True
        self.quarantine.append(q)


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
                run.examples.append(sanitise_row(row, run.cfg, control, redact=redact,
                                                 task_default=GENERIC_TASK if generic else None))
            except Reject as r:
                q += 1
                run.quarantine_row(row.file, row.line, r.reason, row.raw, "sanitise", generic)
            except (RecursionError, ValueError, TypeError, UnicodeError, OverflowError) as e:
                # a row no rule foresaw must cost one quarantine line, never the build
                q += 1
                run.quarantine_row(row.file, row.line, f"unusable row ({type(e).__name__}: {str(e)[:200]})",
                                   row.raw, "sanitise", generic)
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
            run.quarantine_row(e.file, e.line, f"too long: {n} tokens > max_tokens {run.cfg.max_tokens} "
                                               f"(chat template included, {counter.base} tokenizer)", e.raw, "tokens",
                               not is_domain)
            continue
        keep_ex.append(e)
        keep_len.append(n)
        keep_sample.append(i in sample)
        n_domain += is_domain
    run.examples, run.n_domain = keep_ex, n_domain
    return keep_len, keep_sample


def _ids(run: _Run) -> tuple[list[str], list[str]]:
    shas, ids = [], []
    for i, e in enumerate(run.examples):
        sha = content_sha256(e.task, e.messages, e.label)
        shas.append(sha)
        if e.id is not None:
            ids.append(e.id if i < run.n_domain else f"generic:{e.id}")
        else:
            ids.append(sha[:16] if i < run.n_domain else f"generic-{sha[:16]}")
    return shas, ids


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
    run = _Run(cfg=cfg, progress=progress or _no_progress, redactor=Redactor(cfg.pii_engine, cfg.pii_region))
    files = expand_inputs(list(inputs))
    generic_files = expand_inputs(cfg.generic) if cfg.generic else []
    guard = {"writer": WRITER, "overwrite": overwrite, "inputs": [*files, *generic_files],
             "recognise": is_dataset_output}
    check_out_dir(out, **{k: v for k, v in guard.items() if k != "writer"})
    lock_path = _resolve_lock_path(cfg, out)
    lock = read_lock(lock_path) if lock_path else None

    with _Timer(run, "tokenizer"):
        counter = TokenCounter(cfg.base_name())
        control = ControlTokens(counter.tokenizer, counter.special_tokens)
    with _Timer(run, "read"):
        input_rows, per_file = _read(run, files, control, generic=False)
        run.n_domain = len(run.examples)
        if run.n_domain == 0:
            raise _no_usable_rows(run, files, input_rows)
        generic_rows, generic_files_info = (_read(run, generic_files, control, generic=True) if generic_files else (0, []))
    control_tokens = sum(e.control_tokens for e in run.examples[:run.n_domain])
    with _Timer(run, "tokens"):
        lengths, in_sample = _token_limit(run, counter)
    if run.n_domain == 0:
        raise _no_usable_rows(run, files, input_rows)
    ex, nd_count = run.examples, run.n_domain
    shas, ids = _ids(run)

    # ---- dedup + decontamination against a locked eval set
    with _Timer(run, "dedup"):
        keys = [normalise_key(e.key_text) for e in ex]
        nd = NearDup(keys, scopes=[e.task for e in ex] if cfg.dedup_scope == "task" else None,
                     threshold=cfg.near_dup_threshold)
        locked = resolve_locked(lock, lock_path, ids[:nd_count], shas[:nd_count]) if lock else []
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
    conflicts = []
    for i in exact:
        j = verdicts[i].match
        if ex[i].output != ex[j].output or ex[i].label != ex[j].label:
            conflicts.append({"key": ex[i].key_text[:200],
                              "first": {"file": ex[j].file, "line": ex[j].line, "output": ex[j].output[:200], "label": ex[j].label},
                              "duplicate": {"file": ex[i].file, "line": ex[i].line, "output": ex[i].output[:200], "label": ex[i].label}})

    # ---- id collisions among usable rows (two different rows claiming one id)
    seen_ids = {ids[i]: i for i in locked}
    unique_kept = []
    for i in kept:
        j = seen_ids.get(ids[i])
        if j is not None:
            run.quarantine_row(ex[i].file, ex[i].line, f'field "id": duplicate id {ids[i]!r} (first used at '
                                                       f"{ex[j].file}:{ex[j].line})", ex[i].raw, "ids")
            continue
        seen_ids[ids[i]] = i
        unique_kept.append(i)
    kept = unique_kept

    # ---- frozen eval split
    with _Timer(run, "split"):
        if lock:
            eval_idx, train_idx = list(locked), kept
            pinned = sum(1 for i in kept if ex[i].split == "eval")
            if pinned:
                run.warnings.append(f"{pinned} row(s) pinned to split=eval are not in the eval lock and went to train")
        else:
            rows = [(ex[i].task, ex[i].label, shas[i], ex[i].split) for i in kept]
            chosen = stratified_split(rows, cfg.eval_fraction, cfg.seed)
            eval_idx = sorted((kept[k] for k in chosen), key=lambda i: ids[i])
            train_idx = [kept[k] for k in range(len(kept)) if k not in chosen]
            register_eval(nd, eval_idx)
            if cfg.dedup_scope == "task":  # rows of other tasks were never compared by dedup
                more = decontaminate(nd, train_idx)
                decon.update(more)
                train_idx = [i for i in train_idx if i not in more]
    # ---- balance
    with _Timer(run, "balance"):
        removed, balance_report = balance([(ex[i].task, ex[i].label, shas[i]) for i in train_idx], cfg.balance_multiple, cfg.seed)
        balanced_out = [train_idx[k] for k in sorted(removed)]
        train_idx = [train_idx[k] for k in range(len(train_idx)) if k not in removed]

    # ---- generic mix
    generic_report: dict = {"files": generic_files_info, "input_rows": generic_rows}
    chosen_generic: list[int] = []
    with _Timer(run, "generic"):
        if generic_files:
            g_rows = list(range(nd_count, len(ex)))
            g_verdicts = nd.check_many(g_rows)
            g_status = Counter(v.status for v in g_verdicts)
            avail = [i for i, v in zip(g_rows, g_verdicts) if v.status == "kept"]
            want = generic_count(len(train_idx), cfg.generic_fraction)
            pick = choose_generic([shas[i] for i in avail], min(want, len(avail)), cfg.seed)
            chosen_generic = [avail[k] for k in pick]
            if len(avail) < want:
                run.warnings.append(f"generic mix: wanted {want} rows ({cfg.generic_fraction:.0%} of train) but only "
                                    f"{len(avail)} usable generic rows exist")
            generic_report.update(
                quarantined=sum(1 for q in run.quarantine if q.get("generic")),
                duplicates=g_status["exact"] + g_status["near"], decontaminated=g_status["decontaminated"],
                available=len(avail), wanted=want, added=len(chosen_generic), fraction=cfg.generic_fraction)

    # ---- records
    def record(i: int) -> dict:
        e = ex[i]
        return make_record(ids[i], e.task, e.messages, e.provenance, e.label, shas[i])

    eval_records = [record(i) for i in eval_idx]
    train_order = sorted(train_idx + chosen_generic, key=lambda i: rank_key(shas[i], cfg.seed))
    train_records = [record(i) for i in train_order]
    canary_entries: list[dict] = []
    if cfg.canaries:
        canary_entries = _plant_canaries(cfg, counter, train_records, [k for k, i in enumerate(train_order) if i < nd_count])

    counts = {
        "input_rows": input_rows,
        "quarantined": sum(1 for q in run.quarantine if not q.get("generic")),
        "exact_duplicates": len(exact),
        "near_duplicates": len(near),
        "decontaminated": len(decon),
        "balanced_out": len(balanced_out),
        "train": len(train_records),
        "eval": len(eval_records),
        "generic_added": len(chosen_generic),
        "canaries": len(canary_entries),
    }
    rhs = (counts["train"] - counts["generic_added"] + counts["eval"] + counts["quarantined"] + counts["exact_duplicates"]
           + counts["near_duplicates"] + counts["decontaminated"] + counts["balanced_out"])
    if rhs != input_rows:  # a bug, not a data problem: refuse to write an unaccounted dataset
        raise RuntimeError(f"row accounting broken: {input_rows} in, {rhs} accounted for ({counts})")

    report = build_report(
        cfg=cfg, counts=counts, files=per_file, base={"name": cfg.base_name(), "path": str(counter.path),
                                                      "template": counter.family.name},
        pii=run.pii, pii_quarantine=run.pii_quarantine, control_tokens=control_tokens, quarantine=run.quarantine,
        exact=[(i, verdicts[i].match) for i in exact], near=[(i, verdicts[i].match, verdicts[i].jaccard) for i in near],
        decon=decon, conflicts=conflicts, examples=ex, ids=ids,
        train_lengths=[lengths[i] for i in train_order if in_sample[i]],
        eval_lengths=[lengths[i] for i in eval_idx if in_sample[i]],
        max_length=max((lengths[i] for i in train_order + eval_idx if lengths[i] is not None), default=0),
        sampled=not all(in_sample),
        train_groups=Counter((ex[i].task, ex[i].label) for i in train_idx + chosen_generic),
        eval_groups=Counter((ex[i].task, ex[i].label) for i in eval_idx),
        balance=balance_report, generic=generic_report if generic_files else None,
        split={"locked": bool(lock), "lock_file": str(lock_path) if lock else None,
               "fraction_target": (lock.get("fraction") if lock else cfg.eval_fraction),
               "fraction_actual": round(len(eval_records) / max(1, len(eval_records) + len(train_idx)), 4)},
        warnings=run.warnings + (["the eval set is empty: too few usable rows for a "
                                  f"{cfg.eval_fraction:.0%} split"] if not eval_records else []),
        n_domain_examples=len(train_idx) + len(eval_records),
    )

    # ---- write everything atomically
    canary_path = Path(cfg.canary_file) if cfg.canary_file else canary_mod.default_canary_path(out)
    with _Timer(run, "write"):
        run.progress("write", 0, None)
        with atomic_dir(out, **guard) as tmp:
            _write_jsonl(tmp / "train.jsonl", train_records)
            eval_bytes = _write_jsonl(tmp / "eval.jsonl", eval_records)
            lock_doc = make_lock(eval_records, lock.get("fraction", cfg.eval_fraction) if lock else cfg.eval_fraction, eval_bytes)
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
                "inputs": per_file,
                "canaries": {"count": len(canary_entries), "file": str(canary_path.resolve())} if canary_entries else None,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
        if canary_entries:
            atomic_write_json(canary_path, canary_mod.canary_document(canary_entries, out))
        run.progress("write", 1, 1)
    report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    return report


def _write_jsonl(path: Path, rows: list[dict]) -> bytes:
    data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(data)
    return data
