"""`gemtune probe` as a library call: the three privacy probes on an adapter and on its base, one report.

    load train.jsonl (+ canaries) ─► check every input ─► load the base once
        ─► base: extraction, canary ranks, PII samples ─► attach the adapter ─► the same on the adapter
        ─► checks against the thresholds ─► report JSON (atomic) ─► summary into the adapter's gemtune.json

Every input is validated before the model loads, so a bad file costs no model time. The report is written whether
or not a threshold is exceeded; `enforce` then turns a failed check into `GateFailed` (CLI exit 1).

The report (`--out FILE`, JSON): `adapter`, `base`, `dataset`, `config` (the effective PrivacyConfig), and
    extraction  definition, train_rows, examined, sampled, skipped_short, probes, status ("run" | "not run"),
                adapter/base {examples, exact, extracted, exact_rate, extraction_rate}, worst [up to 5 examples:
                id, probe, answer_repeats, context_tail, held_out, adapter_output/similarity, base_output/similarity]
    canaries    definition, status, file, count, candidates, max_possible (log2 R),
                adapter/base {max_exposure, mean_exposure, max_exposure_extrapolated, rank1},
                per_canary [{row_id, format, adapter/base {rank, exposure, exposure_extrapolated, log_likelihood}}]
    pii         status, engine, temperature, top_k, max_new_tokens, known_values, known_sources, raw_inputs_missing,
                adapter/base {samples, samples_with_pii, hits, hits_by_type, leaks, leaks_by_type, examples,
                canary_secrets_in_samples} (base null with pii_base: false)
    checks      [{name, adapter, base, limit, unit, passed[, note]}], passed, timings_s, created_at, report
    placement   where the models ran: {device, dtype, device_name, requested, ...} (gemtune.base.device)
Texts in the report have canary secrets masked and detected PII redacted. `summary(report)` is what goes into
gemtune.json under "privacy" (the checks and headline numbers, plus the report's path).
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional

from gemtune.adapter import (SIDECAR, attached, base_of, check_adapter_dir, read_sidecar, sidecar_path,
                             weights_sha256)
from gemtune.adapter import update_sidecar as _update_sidecar  # run_probe has a flag of that name
from gemtune.errors import GateFailed, UserError
from gemtune.privacy import canary as canary_probe
from gemtune.privacy import extraction
from gemtune.privacy import regurgitation as pii_probe
from gemtune.privacy.config import PrivacyConfig
from gemtune.utils import atomic_write_json, iter_jsonl

REPORT_VERSION = 1


# ------------------------------------------------------------------------------------------------ inputs
def load_train(data_dir: str | Path) -> tuple[list[dict], dict]:
    """(train records, dataset.json or {}) of a dataset directory; every malformed line is a located error."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError("dataset directory not found; pass the `gemtune data build` output", file=str(d), field="--data")
    f = d / "train.jsonl"
    if not f.is_file():
        raise UserError("not a dataset directory: train.jsonl is missing", file=str(d), field="--data")
    records = []
    for n, rec in iter_jsonl(f):
        if not isinstance(rec.get("messages"), list) or not rec["messages"]:
            raise UserError("record has no messages list", file=str(f), line=n, field="messages")
        for k, m in enumerate(rec["messages"]):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                    "system", "user", "assistant"):
                raise UserError("each message needs a role (system/user/assistant) and a string content",
                                file=str(f), line=n, field=f"messages[{k}]")
        rec.setdefault("id", f"line-{n}")
        records.append(rec)
    if not records:
        raise UserError("train.jsonl has no records", file=str(f))
    meta = {}
    if (d / "dataset.json").is_file():
        try:
            meta = json.loads((d / "dataset.json").read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"not valid JSON: {e}", file=str(d / "dataset.json")) from None
    return records, meta if isinstance(meta, dict) else {}


def resolve_data_dir(data: Optional[str | Path], sidecar: dict, adapter: Path) -> Path:
    if data:
        return Path(data)
    d = (sidecar.get("dataset") or {}).get("dir") if isinstance(sidecar.get("dataset"), dict) else None
    if not d:
        raise UserError(f"no --data given and the adapter's {SIDECAR} records no dataset dir",
                        file=str(sidecar_path(adapter)), field="dataset.dir")
    return Path(d)


def resolve_canaries(explicit: Optional[str | Path], data_dir: Path, meta: dict) -> tuple[Optional[dict], Optional[Path]]:
    from gemtune.data.canaries import find_canary_file, load_canaries

    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError("canaries file not found", file=str(p), field="--canaries")
        return load_canaries(p), p
    p = find_canary_file(data_dir, meta)
    return (load_canaries(p), p) if p else (None, None)


# ------------------------------------------------------------------------------------------------ probing
class _Stage:
    """Times a phase and reports progress lines."""

    def __init__(self, timings: dict, name: str, say: Callable[[str], None]):
        self.timings, self.name, self.say = timings, name, say

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = round(self.timings.get(self.name, 0.0) + time.perf_counter() - self.t, 3)


def _probe_model(label: str, model, tok, fam, cfg: PrivacyConfig, probes, tasks, pii_prompts, timings, say) -> dict:
    """Run the three probes on one model (the bare base or the base with the adapter attached)."""
    out: dict = {}
    with _Stage(timings, f"{label}.extraction", say):
        say(f"{label}: extraction, {len(probes.probes)} greedy probes")
        out["extraction"] = extraction.greedy_outputs(model, tok, fam, probes.probes, batch_size=cfg.batch_size,
                                                      near=cfg.near_similarity)
    with _Stage(timings, f"{label}.canaries", say):
        if tasks:
            say(f"{label}: canaries, {len(tasks)} x {cfg.candidates} candidates")
        out["canaries"] = canary_probe.score_tasks(model, tasks) if tasks else []
    with _Stage(timings, f"{label}.pii", say):
        run = pii_prompts and (label == "adapter" or cfg.pii_base)
        if run:
            say(f"{label}: PII, {len(pii_prompts)} sampled generations")
        out["pii"] = pii_probe.sample_outputs(model, tok, fam, pii_prompts, max_new_tokens=cfg.pii_max_new_tokens,
                                              temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed,
                                              batch_size=cfg.batch_size) if run else None
    return out


class SecretMask:
    """Hides canary secrets (and pieces of them) in everything the report shows.

    The secrets are kept outside the dataset so that nothing shipped with it reveals them; the probe report must
    not undo that. Masked: a whole secret anywhere; any beginning of a secret after its prefix ("code is PMX-B",
    where the held-out text was cut); a tail of 4+ characters at the start of a text (where a probe began mid-secret).
    """

    def __init__(self, entries: list[dict]):
        import re

        self.rules = []
        for e in entries:
            sec, pre = e["secret"], e["prefix"]
            nested = ""
            for c in reversed(sec):  # any non-empty beginning of the secret: P(?:M(?:X...)?)?
                nested = re.escape(c) + (f"(?:{nested})?" if nested else "")
            self.rules.append((re.compile(re.escape(pre) + r"\s*" + nested), pre + " <CANARY>"))
            self.rules.append((re.compile(re.escape(sec)), "<CANARY>"))
            tails = [re.escape(sec[k:]) for k in range(1, len(sec) - 3)]
            if tails:
                self.rules.append((re.compile(r"^\s*(?:" + "|".join(tails) + ")"), "<CANARY>"))

    def __call__(self, text: str) -> str:
        for pattern, repl in self.rules:
            text = pattern.sub(repl, text)
        return text


@dataclass
class Inputs:
    """Everything the probe reads, checked: the adapter, its base, the training rows, the canaries."""

    adapter_dir: Path
    base_name: str
    base_path: Path
    data_dir: Path
    records: list[dict]
    meta: dict
    canary_doc: Optional[dict]
    canary_path: Optional[Path]


@dataclass
class Plan:
    """What will be generated and scored, tokenised once and shared by the base and the adapter passes."""

    tok: object
    fam: object
    probes: extraction.ProbeSet
    tasks: list
    pii_ids: list[str]
    pii_prompts: list[list[int]]
    known: pii_probe.KnownValues


def check_inputs(adapter, data, out, base, canaries) -> Inputs:
    from gemtune.base.provision import pull

    adapter_dir = check_adapter_dir(adapter, or_base=True)
    sidecar = read_sidecar(adapter_dir)
    base_name = base_of(adapter_dir, base)
    data_dir = resolve_data_dir(data, sidecar, adapter_dir)
    records, meta = load_train(data_dir)
    canary_doc, canary_path = resolve_canaries(canaries, data_dir, meta)
    if out is not None and Path(out).is_dir():
        raise UserError("--out must be a file path (the JSON report), not a directory", file=str(out), field="--out")
    return Inputs(adapter_dir, base_name, pull(base_name), data_dir, records, meta, canary_doc, canary_path)


def make_plan(inp: Inputs, cfg: PrivacyConfig, find) -> Plan:
    """Tokenise every probe with the base's tokenizer alone: a bad canaries file fails here, before the model loads."""
    from transformers import AutoConfig

    from gemtune.base.families import family_of
    from gemtune.base.loader import load_tokenizer

    tok = load_tokenizer(inp.base_path)
    fam = family_of(AutoConfig.from_pretrained(str(inp.base_path)))
    tasks = []
    if inp.canary_doc is not None:
        tasks = canary_probe.load_tasks(inp.canary_doc, inp.canary_path, inp.records, tok, fam,
                                        candidates=cfg.candidates, seed=cfg.seed)
    probes = extraction.build_probes(inp.records, tok, fam, samples=cfg.samples, seed=cfg.seed,
                                     min_answer_tokens=cfg.min_answer_tokens, suffix_tokens=cfg.suffix_tokens,
                                     long_answer_tokens=cfg.long_answer_tokens, prefix_tokens=cfg.prefix_tokens)
    pii_ids, pii_prompts = pii_probe.training_prompts(inp.records, cfg.pii_samples, cfg.seed, tok, fam)
    known = pii_probe.known_values(inp.records, inp.meta, inp.data_dir, find)
    return Plan(tok, fam, probes, tasks, pii_ids, pii_prompts, known)


def run_models(inp: Inputs, plan: Plan, cfg: PrivacyConfig, timings: dict, say) -> dict:
    """The base once, then the same base with the adapter attached (unmerged, as vLLM serves it), on the device and
    in the dtype of `privacy.device`/`privacy.dtype`; `results["placement"]` records where."""
    from gemtune.base.device import resolve
    from gemtune.base.loader import load_base

    placement = resolve(cfg.device, cfg.dtype)
    with _Stage(timings, "load", say):
        say(f"loading base {inp.base_name} ({placement.device}, {placement.dtype_name})")
        model, _ = load_base(inp.base_path, placement=placement, tokenizer=False)  # the plan holds the tokenizer
    args = (plan.tok, plan.fam, cfg, plan.probes, plan.tasks, plan.pii_prompts, timings, say)
    results = {"placement": placement.describe(), "base": _probe_model("base", model, *args)}
    with attached(model, inp.adapter_dir) as peft_model:
        results["adapter"] = _probe_model("adapter", peft_model, *args)
    return results


def run_probe(adapter: str | Path, data: Optional[str | Path] = None, out: Optional[str | Path] = None, *,
              base: Optional[str] = None, config: Optional[PrivacyConfig] = None,
              canaries: Optional[str | Path] = None, progress: Optional[Callable[[str], None]] = None,
              update_sidecar: bool = True) -> dict:
    """Probe `adapter` (and its base) on the training set of `data` (default: the dataset dir its gemtune.json
    records); write the report to `out`; merge its summary into the adapter's gemtune.json; return the report.

    Raises UserError for bad inputs before any model is loaded. A failed threshold does not raise here: the report
    says `passed: false` and `enforce(report)` raises.
    """
    from gemtune.data.pii import find_pii, redact

    cfg = config or PrivacyConfig()
    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def find(text: str):
        return find_pii(text, engine=cfg.pii_engine, region=cfg.pii_region)

    inp = check_inputs(adapter, data, out, base, canaries)
    with _Stage(timings, "prepare", say):
        plan = make_plan(inp, cfg, find)
    results = run_models(inp, plan, cfg, timings, say)

    entries = (inp.canary_doc or {}).get("canaries", [])
    hide = SecretMask(entries)

    def show(ids: list[int]) -> str:
        """What the report may show of a token sequence: special tokens kept, secrets masked, PII redacted."""
        text = hide(extraction.decode(plan.tok, ids, skip_special_tokens=False))
        return redact(text, engine=cfg.pii_engine, region=cfg.pii_region)[0]

    report = assemble(cfg, inp, plan, results, find=find, redact=redact, show=show, hide=hide,
                      secrets=[e["secret"] for e in entries])
    report["placement"] = results["placement"]
    report["timings_s"] = dict(timings, total=round(time.perf_counter() - t0, 3))
    if out is not None:
        report["report"] = str(Path(out).resolve())
        atomic_write_json(out, report)
    if update_sidecar:
        record_privacy(inp.adapter_dir, summary(report))
    return report


# ------------------------------------------------------------------------------------------------ report
def assemble(cfg: PrivacyConfig, inp: Inputs, plan: Plan, results: dict, *, find, redact, show, hide,
             secrets: list[str]) -> dict:
    """The report document: per-probe numbers for the adapter and the base, examples, checks, verdict."""
    records, probes, tasks, known, pii_ids = inp.records, plan.probes, plan.tasks, plan.known, plan.pii_ids
    canary_doc, canary_path = inp.canary_doc, inp.canary_path
    near = cfg.near_similarity
    ext = {"definition": extraction.DEFINITION.format(long=cfg.long_answer_tokens, prefix=cfg.prefix_tokens,
                                                      suffix=cfg.suffix_tokens, near=near, min=cfg.min_answer_tokens),
           "train_rows": len(records), "examined": probes.examined, "sampled": len(probes.examples),
           "skipped_short": probes.skipped_short, "skipped_unrenderable": probes.skipped_unrenderable,
           "probes": len(probes.probes)}
    if probes.examples:
        scored = {k: extraction.score(probes, results[k]["extraction"]) for k in ("adapter", "base")}
        ext["adapter"] = extraction.rates(scored["adapter"], near)
        ext["base"] = extraction.rates(scored["base"], near)
        ext["worst"] = extraction.worst_examples(probes, scored["adapter"], scored["base"],
                                                 results["adapter"]["extraction"], results["base"]["extraction"], show)
        ext["status"] = "run"
    else:
        ext.update(status="not run", reason=f"no training answer has {cfg.min_answer_tokens}+ tokens (labels only)")

    can: dict = {"definition": canary_probe.DEFINITION}
    if tasks:
        entries = canary_doc["canaries"]
        per = []
        for t, a, b in zip(tasks, results["adapter"]["canaries"], results["base"]["canaries"]):
            per.append({"row_id": t.row_id, "format": entries[t.index].get("format") or canary_doc.get("format"),
                        "adapter": a, "base": b})
        can.update(status="run", file=str(canary_path), count=len(tasks), candidates=cfg.candidates,
                   max_possible=round(math.log2(cfg.candidates), 4),
                   adapter=canary_probe.summarise([p["adapter"] for p in per]),
                   base=canary_probe.summarise([p["base"] for p in per]), per_canary=per)
        if cfg.max_canary_exposure is not None and cfg.max_canary_exposure >= math.log2(cfg.candidates):
            can["warning"] = (f"max_canary_exposure {cfg.max_canary_exposure} bits cannot be exceeded with "
                              f"R={cfg.candidates} candidates (at most {math.log2(cfg.candidates):.2f}); raise --candidates "
                              "or gate on max_canary_exposure_extrapolated")
    else:
        can.update(status="not run", reason="no canaries file (build with `gemtune data build --canaries N`)")

    pii: dict = {"engine": cfg.pii_engine, "temperature": cfg.temperature, "top_k": cfg.top_k,
                 "max_new_tokens": cfg.pii_max_new_tokens, "known_values": known.count(),
                 "known_sources": known.sources, "raw_inputs_missing": known.missing}
    if pii_ids:
        pii["status"] = "run"
        for k in ("adapter", "base"):
            if results[k]["pii"] is None:
                pii[k] = None  # pii_base: false
                continue
            pii[k] = pii_probe.scan(results[k]["pii"], pii_ids, known, find, redact)
            if secrets:
                pii[k]["canary_secrets_in_samples"] = pii_probe.secrets_in(results[k]["pii"], secrets)
            for row in pii[k]["examples"]:
                row["output_redacted"] = hide(row["output_redacted"])
    else:
        pii.update(status="not run", reason="pii_samples is 0 or no training row has a prompt")

    checks = evaluate_checks(cfg, ext, can, pii)
    return {
        "version": REPORT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "adapter": str(inp.adapter_dir.resolve()),
        "adapter_sha256": weights_sha256(inp.adapter_dir),
        "base": inp.base_name, "base_path": str(inp.base_path),
        "dataset": str(Path(inp.data_dir).resolve()),
        "config": cfg.model_dump(mode="json"),
        "extraction": ext, "canaries": can, "pii": pii,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
    }


def evaluate_checks(cfg: PrivacyConfig, ext: dict, can: dict, pii: dict) -> list[dict]:
    """One row per threshold: the adapter's value, the base's for reference, the limit, the verdict."""
    rows = []

    def add(name, value, base_value, limit, unit, skipped_reason=None):
        passed = True if value is None or limit is None else value <= limit
        rows.append({"name": name, "adapter": value, "base": base_value, "limit": limit, "unit": unit,
                     "passed": passed, **({"note": skipped_reason} if skipped_reason else {})})

    if ext.get("status") == "run":
        add("extraction rate", ext["adapter"]["extraction_rate"], ext["base"]["extraction_rate"],
            cfg.max_extraction_rate, "share")
    else:
        add("extraction rate", None, None, cfg.max_extraction_rate, "share", "not run")
    for key, name, limit in (("max_exposure", "canary exposure (max, rank)", cfg.max_canary_exposure),
                             ("max_exposure_extrapolated", "canary exposure (max, extrapolated)",
                              cfg.max_canary_exposure_extrapolated)):
        if can.get("status") == "run":
            add(name, can["adapter"][key], can["base"][key], limit, "bits")
        else:
            add(name, None, None, limit, "bits", "not run")
    run = pii.get("status") == "run"
    a, b = (pii.get("adapter") or {}), (pii.get("base") or {})
    add("PII hits", a.get("hits") if run else None, b.get("hits"), cfg.max_pii_hits, "values", None if run else "not run")
    add("PII leaks (values from the data)", a.get("leaks") if run else None, b.get("leaks"), cfg.max_pii_leaks,
        "values", None if run else "not run")
    return rows


def summary(report: dict) -> dict:
    """The compact form stored under "privacy" in the adapter's gemtune.json (read by the card and the registry)."""
    ext, can, pii = report["extraction"], report["canaries"], report["pii"]
    s = {"passed": report["passed"], "created_at": report["created_at"], "report": report.get("report"),
         "adapter_sha256": report.get("adapter_sha256"),
         "dataset": report["dataset"],
         "checks": [{k: c[k] for k in ("name", "adapter", "base", "limit", "passed")} for c in report["checks"]],
         "extraction": {"status": ext["status"], "sampled": ext["sampled"], "probes": ext["probes"],
                        "near_similarity": report["config"]["near_similarity"]},
         "canaries": {"status": can["status"]},
         "pii": {"status": pii["status"]}}
    if ext["status"] == "run":
        for k in ("adapter", "base"):
            s["extraction"][k] = {m: ext[k][m] for m in ("exact", "extracted", "exact_rate", "extraction_rate")}
    if can["status"] == "run":
        s["canaries"].update(count=can["count"], candidates=can["candidates"], max_possible=can["max_possible"],
                             adapter=can["adapter"], base=can["base"])
    if pii["status"] == "run":
        s["pii"].update(samples=pii["adapter"]["samples"], known_values=pii["known_values"],
                        raw_inputs_missing=len(pii["raw_inputs_missing"]),
                        **{k: ({m: pii[k][m] for m in ("hits", "hits_by_type", "leaks", "leaks_by_type")}
                               if pii.get(k) else None) for k in ("adapter", "base")})
    return s


def record_privacy(adapter_dir: Path, privacy: dict) -> dict:
    """`privacy` (the `summary` of a report) into the adapter's sidecar, keeping what training and eval wrote
    there; returns the sidecar."""
    return _update_sidecar(adapter_dir, {"privacy": privacy})


def enforce(report: dict) -> None:
    """`GateFailed` (CLI exit 1) naming every check that failed."""
    failed = [c for c in report["checks"] if not c["passed"]]
    if failed:
        parts = [f"{c['name']} {fmt_value(c['adapter'], c['unit'])} > limit {fmt_value(c['limit'], c['unit'])}" for c in failed]
        where = f" (report: {report['report']})" if report.get("report") else ""
        raise GateFailed("privacy probe failed: " + "; ".join(parts) + where)


def fmt_value(v, unit: str) -> str:
    """A check's number as the gate message and `gemtune probe`'s table show it: a share as %, bits with 2 decimals
    and the unit, "-" when not measured."""
    if v is None:
        return "-"
    if unit == "share":
        return f"{100 * v:.1f}%"
    if unit == "bits":
        return f"{v:.2f} bits"
    return str(v)
