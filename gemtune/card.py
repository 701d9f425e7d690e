"""`gemtune card`: a Hugging Face model card (README.md) for an adapter, filled from what the pipeline recorded.

Sources, in the order the pipeline writes them: the dataset directory (`report.json`, `dataset.json`,
`train.jsonl` provenance), the adapter's `gemtune.json` (base, dataset lock, LoRA, preset, steps, eval summary,
privacy summary), the run directory beside it (`metrics.jsonl`, `run.json`), an eval output directory
(`summary.json`, `results.json`) and a probe report. Every number in the card comes from one of those files; what
no file records is written as "not run" or "not recorded", never guessed. Torch-free: writing a card needs no model.

The layout follows the Hugging Face model card template (model details, uses, bias/risks/limitations, training,
evaluation, environmental impact) with a privacy section and a serving section added; the YAML front matter
carries `base_model`, `library_name: peft`, `license`, `tags`, `datasets` and a `model-index` with the eval results.

Everything the card did not write itself (names, paths, labels, warnings, anything read from a file) goes through
`md()` (Markdown and HTML escaped, one line) or `code()` (a code span no content can close); table cells escape `|`;
shell and Python lines in the serving section quote their arguments. Structure (task -> labels) comes from the
structured `task`/`label` fields of the training rows, never from splitting a user string.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from gemtune.adapter import SIDECAR, base_named_in, check_adapter_dir, read_adapter_config, read_sidecar, weights_sha256
from gemtune.errors import UserError
from gemtune.utils import atomic_write_text

NOT_RUN = "not run"
NOT_RECORDED = "not recorded"
# Hub ids of the embedded bases, for `base_model` (the metadata links the card to its parent model).
HUB_IDS = {"gemma-3-270m": "google/gemma-3-270m"}


# ------------------------------------------------------------------------------------------------ sources
def _read_json(path: Path, what: str) -> Optional[dict]:
    """A JSON object from `path`, None when absent; a broken file is an input error naming the file."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{what} is not valid JSON: {e}", file=str(path)) from None
    if not isinstance(doc, dict):
        raise UserError(f"{what}: expected a JSON object", file=str(path))
    return doc


@dataclass
class Sources:
    """Everything the card is written from; None where the pipeline did not record (or run) that part."""

    adapter: Path
    name: str
    adapter_config: dict
    sidecar: dict
    data_dir: Optional[Path] = None
    report: Optional[dict] = None  # dataset report.json
    dataset: Optional[dict] = None  # dataset.json
    licenses: Counter = field(default_factory=Counter)  # provenance licenses of the train rows
    groups: Counter = field(default_factory=Counter)  # (task, label or None) of the train rows
    eval: Optional[dict] = None  # eval summary
    eval_meta: Optional[dict] = None  # results.json meta (suite path/sha)
    eval_source: Optional[str] = None
    privacy: Optional[dict] = None  # probe report (full) or the sidecar summary
    privacy_full: bool = False
    privacy_source: Optional[str] = None
    metrics: list[dict] = field(default_factory=list)
    run: Optional[dict] = None
    weights_sha256: Optional[str] = None


def _adapter_name(adapter: Path) -> str:
    """`run/adapter` is called after its run; any other adapter directory after itself."""
    return adapter.parent.name if adapter.name in ("adapter", "final") and adapter.parent.name else adapter.name


def _train_rows_summary(data_dir: Path) -> tuple[Counter, Counter]:
    """(provenance licenses, (task, label) groups) of the train rows, from their structured fields."""
    lic: Counter = Counter()
    groups: Counter = Counter()
    f = data_dir / "train.jsonl"
    if not f.is_file():
        return lic, groups
    with open(f, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(rec, dict):
                continue
            prov = rec.get("provenance")
            if isinstance(prov, dict) and prov.get("license"):
                lic[str(prov["license"])] += 1
            task, label = rec.get("task"), rec.get("label")
            if isinstance(task, str) and task:
                groups[(task, str(label) if label is not None else None)] += 1
    return lic, groups


def gather(adapter: str | Path, *, data: Optional[str | Path] = None, eval_dir: Optional[str | Path] = None,
           probe: Optional[str | Path] = None, name: Optional[str] = None) -> Sources:
    """Read every source the card draws on; explicit paths must exist, recorded ones are used when present."""
    a = check_adapter_dir(adapter, field="--adapter")
    src = Sources(a, name or _adapter_name(a.resolve()), read_adapter_config(a), read_sidecar(a))
    src.weights_sha256 = weights_sha256(a)
    _gather_data(src, data)
    _gather_eval(src, eval_dir)
    _gather_privacy(src, probe)
    run_dir = a.resolve().parent
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                src.metrics.append(json.loads(line))
            except ValueError:
                continue
    src.run = _read_json(run_dir / "run.json", "run.json") if (run_dir / "run.json").is_file() else None
    return src


def _gather_data(src: Sources, data: Optional[str | Path]) -> None:
    if data is not None:
        d = Path(data)
        if not d.is_dir():
            raise UserError("dataset directory not found", file=str(d), field="--data")
    else:
        rec = (src.sidecar.get("dataset") or {}).get("dir") if isinstance(src.sidecar.get("dataset"), dict) else None
        d = Path(rec) if rec else None
        if d is not None and not d.is_dir():
            d = None  # recorded but moved: the card says the dataset report is unavailable
    if d is None:
        return
    src.data_dir = d
    src.report = _read_json(d / "report.json", "report.json")
    src.dataset = _read_json(d / "dataset.json", "dataset.json")
    src.licenses, src.groups = _train_rows_summary(d)


def _gather_eval(src: Sources, eval_dir: Optional[str | Path]) -> None:
    if eval_dir is not None:
        e = Path(eval_dir)
        summary_path = e / "summary.json" if e.is_dir() else e
        if not summary_path.is_file():
            raise UserError("no summary.json here: pass the `gemtune eval --out` directory", file=str(e), field="--eval")
        src.eval = _read_json(summary_path, "summary.json")
        results = _read_json(summary_path.parent / "results.json", "results.json")
        src.eval_meta = (results or {}).get("meta")
        src.eval_source = str(summary_path)
    elif isinstance(src.sidecar.get("eval"), dict):
        src.eval = src.sidecar["eval"]
        src.eval_source = "gemtune.json (eval at the final checkpoint)"


def _gather_privacy(src: Sources, probe: Optional[str | Path]) -> None:
    recorded = src.sidecar.get("privacy") if isinstance(src.sidecar.get("privacy"), dict) else None
    path = Path(probe) if probe is not None else None
    if path is not None and not path.is_file():
        raise UserError("probe report not found", file=str(path), field="--probe")
    if path is None and recorded and recorded.get("report") and Path(recorded["report"]).is_file():
        path = Path(recorded["report"])
    if path is not None:
        doc = _read_json(path, "probe report")
        if not isinstance(doc.get("checks"), list) or "extraction" not in doc:
            raise UserError("not a `gemtune probe` report (no checks/extraction)", file=str(path), field="--probe")
        src.privacy, src.privacy_full, src.privacy_source = doc, True, str(path)
    elif recorded:
        src.privacy, src.privacy_source = recorded, SIDECAR


# ------------------------------------------------------------------------------------------------ formatting
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_MD_ESCAPE = re.compile(r"[\\`*\[\]{}~#!]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_LINE_START = re.compile(r"^([-+=]|\d{1,9}(?=[.)](\s|$)))")


def one_line(x: Any) -> str:
    """A user string on one line: line breaks and control characters become spaces (a newline could end a
    paragraph, start a heading or a list, or close a code span)."""
    return _CONTROL.sub(" ", str(x))


def md(x: Any) -> str:
    """Text the card did not write, made inert Markdown: emphasis, links, code, headings, lists and raw HTML are
    escaped, so it renders as the characters it holds. (`|` is escaped by `table`, where it matters.)"""
    s = _MD_ESCAPE.sub(lambda m: "\\" + m.group(0), one_line(x))
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _LINE_START.sub(lambda m: m.group(0) + "\\" if m.group(1)[0].isdigit() else "\\" + m.group(0), s, count=1)


def code(x: Any) -> str:
    """`x` as an inline code span that its content cannot close (the fence is longer than any backtick run in
    it); HTML inside a code span is shown, never rendered."""
    s = one_line(x)
    if not s.strip():
        return "(empty)" if not s else "`" + s + "`"
    fence = "`" * (max((len(r) for r in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s[0] in "` " or s[-1] in "` " else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def fenced(body: str, info: str = "") -> str:
    """A fenced code block that no line of `body` can close."""
    fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", body)), default=0) + 1)
    return f"{fence}{info}\n{body.rstrip(chr(10))}\n{fence}"


def _pct_raw(v: Any, digits: int) -> str:
    if v is None:
        return "n/a"
    try:
        return f"{100 * float(v):.{digits}f}%"
    except (TypeError, ValueError):
        return str(v)


def pct(v: Any, digits: int = 1) -> str:
    return md(_pct_raw(v, digits))


def _num_raw(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def num(v: Any, digits: int = 2) -> str:
    return md(_num_raw(v, digits))


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A GFM table; cells are already Markdown (escape user text with md()/code() first): `|` is escaped here,
    inside code spans too, as GFM requires."""
    def cell(x: Any) -> str:
        return one_line(x).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def base_ids(src: Sources) -> tuple[str, str]:
    """(hub id for the metadata, what the card calls the base)."""
    name = base_named_in(src.sidecar, src.adapter_config) or NOT_RECORDED
    hub = HUB_IDS.get(str(name), str(name))
    return hub, str(name)


def tasks_and_labels(src: Sources) -> dict[str, list[str]]:
    """Task -> labels, from the `task` and `label` fields of the training rows (most rows first). Group names
    in the report join the two with "/", which a task or label may itself contain: they are never split."""
    totals: Counter = Counter()
    for (task, _), n in src.groups.items():
        totals[task] += n
    out: dict[str, list[str]] = {}
    for task, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])):
        labels = [(label, n) for (t, label), n in src.groups.items() if t == task and label is not None]
        out[task] = [label for label, _ in sorted(labels, key=lambda kv: (-kv[1], kv[0]))]
    return out


TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# ------------------------------------------------------------------------------------------------ front matter
def model_index(src: Sources) -> Optional[list[dict]]:
    ev = src.eval
    if not ev or ev.get("accuracy") is None:
        return None
    cmp = ev.get("compare") or {}
    dataset_name = src.data_dir.name if src.data_dir else "frozen-eval"
    metrics = [{"type": "accuracy", "value": round(float(ev["accuracy"]), 4), "name": "Accuracy (adapter)"}]
    if (cmp.get("accuracy") or {}).get("baseline") is not None:
        metrics.append({"type": "accuracy", "value": round(float(cmp["accuracy"]["baseline"]), 4),
                        "name": f"Accuracy ({cmp.get('baseline', 'baseline')})"})
    if cmp.get("win_rate") is not None:
        metrics.append({"type": "win_rate", "value": round(float(cmp["win_rate"]), 4), "name": "Win-rate vs baseline"})
    if cmp.get("regression_rate") is not None:
        metrics.append({"type": "regression_rate", "value": round(float(cmp["regression_rate"]), 4),
                        "name": "Regression rate vs baseline"})
    task = next(iter(tasks_and_labels(src)), None) or "text-generation"
    return [{"name": src.name, "results": [{
        "task": {"type": "text-generation", "name": task},
        "dataset": {"name": f"{dataset_name} (frozen eval)", "type": dataset_name, "split": "eval"},
        "metrics": metrics,
    }]}]


def front_matter(src: Sources, license: Optional[str]) -> dict:
    hub, _ = base_ids(src)
    tags = ["gemtune", "lora", "peft", "text-generation"]
    for t in tasks_and_labels(src):
        if TAG_RE.fullmatch(t) and t not in tags:  # a Hub tag is a plain word: other task names stay in the body
            tags.append(t)
    meta: dict[str, Any] = {
        "base_model": hub,
        "base_model_relation": "adapter",
        "library_name": "peft",
        # every base gemtune trains is a Gemma model: the adapter is a derivative under the Gemma terms
        "license": license or "gemma",
        "pipeline_tag": "text-generation",
        "tags": tags,
        "datasets": [src.data_dir.name] if src.data_dir else [],
    }
    mi = model_index(src)
    if mi:
        meta["model-index"] = mi
    return meta


def render_front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def parse_front_matter(text: str, source: Optional[str] = None) -> dict:
    """The YAML metadata block of a card (what the Hub reads); invalid YAML is a UserError at `source:line`
    (gemtune/config.py's one YAML reader)."""
    from gemtune.config import parse_yaml

    if not text.startswith("---\n"):
        raise ValueError("no front matter")
    end = text.index("\n---\n", 4)
    return parse_yaml(text[4:end], source, first_line=2).data or {}


# ------------------------------------------------------------------------------------------------ sections
def section_intro(src: Sources) -> str:
    _, base = base_ids(src)
    data = f" on the {code(src.data_dir.name)} dataset" if src.data_dir else ""
    status = []
    ev = src.eval
    if ev and ev.get("shippable") is not None:
        status.append("passed its eval gate" if ev.get("shippable") else "FAILED its eval gate")
    else:
        status.append(f"eval gate {NOT_RUN}")
    pv = src.privacy
    if pv and pv.get("passed") is not None:
        status.append("passed its privacy probe" if pv["passed"] else "FAILED its privacy probe")
    else:
        status.append(f"privacy probe {NOT_RUN}")
    return (f"# {md(src.name)}\n\n{code(src.name)} is a LoRA adapter for {code(base)}, trained with gemtune{data}. "
            f"Release status: {'; '.join(status)}.\n")


def _lora(src: Sources) -> dict:
    lo = src.sidecar.get("lora") if isinstance(src.sidecar.get("lora"), dict) else {}
    cfg = src.adapter_config
    targets = lo.get("target_modules") or cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        targets = ", ".join(sorted(targets))
    return {"r": lo.get("r", cfg.get("r")), "alpha": lo.get("alpha", cfg.get("lora_alpha")),
            "dropout": lo.get("dropout", cfg.get("lora_dropout")), "targets": targets}


def section_details(src: Sources, license: Optional[str]) -> str:
    hub, base = base_ids(src)
    side = src.sidecar
    lo = _lora(src)
    base_line = code(base) + (f" (Hugging Face: {code(hub)})" if hub != base else "")
    if base == "gemma-3-270m":
        base_line += ", provisioned from the Q4_K_M GGUF and de-quantised to fp32"
    trainable = side.get("trainable_params")
    lic = ", ".join(f"{md(k)} ({num(n)} rows)" for k, n in src.licenses.most_common()) or NOT_RECORDED
    rows = [
        ("Model type", f"LoRA adapter (PEFT, plain LoRA, bias none, no modules_to_save): rank {num(lo['r'])}, "
                       f"alpha {num(lo['alpha'])}, dropout {num(lo['dropout'])}, on "
                       f"{md(lo['targets']) if lo['targets'] else NOT_RECORDED}"),
        ("Finetuned from", base_line),
        ("Base revision (sha256)", md(side.get("base_revision_sha256") or NOT_RECORDED)),
        ("Preset", md(side.get("preset") or NOT_RECORDED)),
        ("Trainable parameters", f"{num(trainable)} of {num(side.get('total_params', 0))} "
                                 f"({md(side.get('trainable_pct'))}%)" if isinstance(trainable, int) else NOT_RECORDED),
        ("Adapter weights (sha256)", src.weights_sha256 or NOT_RECORDED),
        ("License", f"{md(license or 'gemma')} (the Gemma Terms of Use apply to the base and to derivatives)"),
        ("Training data licenses", lic),
        ("Built with", f"gemtune, PEFT {md(src.adapter_config.get('peft_version') or NOT_RECORDED)}"),
    ]
    return "## Model details\n\n### Model description\n\n" + "\n".join(f"- **{k}:** {v}" for k, v in rows) + "\n"


def section_uses(src: Sources) -> str:
    _, base = base_ids(src)
    tasks = tasks_and_labels(src)
    if tasks:
        lines = []
        for t, labels in tasks.items():
            if labels:
                shown = ", ".join(code(x) for x in labels[:20]) + (" …" if len(labels) > 20 else "")
                lines.append(f"- {code(t)}: answers with one of {len(labels)} labels seen in training: {shown}.")
            else:
                lines.append(f"- {code(t)}: the task of the training rows tagged {code(t)}.")
        direct = ("The tasks it was trained on, with prompts in the training format (the base's chat template and "
                  "the same instructions):\n\n" + "\n".join(lines))
    else:
        direct = (f"The tasks it was trained on are {NOT_RECORDED} (no training rows (train.jsonl) were available "
                  "to this card).")
    out = [
        "- Tasks, labels, languages or domains absent from the training data: outputs there were never evaluated.",
        "- Decisions with legal or similarly significant effects on people without human review.",
        f"- Any base other than {code(base)}: LoRA weights only mean something on the exact base they were trained on.",
        "- Storing or looking up personal data: the model is not a database (see Privacy).",
    ]
    return ("## Uses\n\n### Direct use\n\n" + direct + "\n\n### Out-of-scope use\n\n" + "\n".join(out) + "\n")


def section_risks(src: Sources) -> str:
    _, base = base_ids(src)
    items = []
    counts = (src.report or {}).get("counts") or (src.dataset or {}).get("counts")
    if counts:
        files = ", ".join(md(Path(str(f.get("file"))).name) for f in (src.report or src.dataset or {}).get("inputs", [])
                          if isinstance(f, dict)) or NOT_RECORDED
        items.append(f"Trained on {num(counts.get('train'))} examples ({num(counts.get('generic_added'))} of them "
                     f"generic instructions) from {files}: it inherits their coverage, wording and biases.")
        groups = (((src.report or {}).get("balance") or {}).get("train_final") or {})
        if len(groups) > 1:
            vals = list(groups.values())
            vals = [v for v in vals if isinstance(v, (int, float))] or [0]
            items.append(f"Training groups are uneven: the largest has {num(max(vals))} examples, the smallest "
                         f"{num(min(vals))}; "
                         "expect weaker answers on rare groups.")
    else:
        items.append(f"The training data's composition is {NOT_RECORDED} (no dataset report available).")
    cmp = (src.eval or {}).get("compare") or {}
    ci = cmp.get("delta_ci") or {}
    if cmp:
        items.append(f"The evaluation has {num(cmp.get('n'))} frozen cases; the 95% interval of the accuracy change is "
                     f"[{pct(ci.get('low'))}, {pct(ci.get('high'))}]: smaller differences are noise.")
    items.append(f"{code(base)} is the base: outside the training distribution it can produce fluent but wrong answers.")
    for w in ((src.report or {}).get("warnings") or [])[:5]:
        items.append(f"Dataset build warning: {md(w)}")
    recs = ["Re-run `gemtune eval` and `gemtune probe` for every new version and keep the eval set frozen.",
            "Route a share of traffic to a new version first (`gemtune registry split`) and watch its regressions.",
            "Keep personal data out of prompts where the task allows it; outputs are not scrubbed at serving time."]
    return ("## Bias, risks, and limitations\n\n" + "\n".join(f"- {i}" for i in items)
            + "\n\n### Recommendations\n\n" + "\n".join(f"- {r}" for r in recs) + "\n")


def _data_section(src: Sources) -> str:
    if src.report is None and src.dataset is None:
        where = f" {code(src.data_dir)}" if src.data_dir else ""
        return f"### Training data\n\nDataset report: {NOT_RECORDED} (dataset directory{where} unavailable to this card).\n"
    rep = src.report or {}
    counts = rep.get("counts") or (src.dataset or {}).get("counts") or {}
    parts = [f"### Training data\n\nDataset {code(src.data_dir)}"
             + (f", built by `gemtune data build` on {md(rep['created_at'])}" if rep.get("created_at") else "")
             + ("." if src.report else f" (its report.json is {NOT_RECORDED}).")]
    labels = [("input_rows", "input rows"), ("quarantined", "quarantined (malformed or unusable)"),
              ("exact_duplicates", "exact duplicates removed"), ("near_duplicates", "near duplicates removed"),
              ("decontaminated", "removed for overlapping the eval set"), ("balanced_out", "removed by balancing"),
              ("train", "train rows"), ("eval", "frozen eval rows"), ("generic_added", "generic rows mixed in"),
              ("canaries", "canaries planted")]
    shown = [[lab, num(counts.get(k))] for k, lab in labels if k in counts]
    parts.append(table(["stage", "rows"], shown) if shown else f"Row counts: {NOT_RECORDED}.")
    pii = rep.get("pii")
    if isinstance(pii, dict):
        rows = [[md(t), num(n)] for t, n in pii.items()]
        names = " Personal names were not redacted (`data.pii_names: false`)." if rep.get("pii_names") is False else ""
        parts.append(f"PII redacted before training (engine {code(rep.get('pii_engine', 'builtin'))}), values per type:"
                     f"{names}\n\n" + table(["type", "values"], rows))
    else:
        parts.append(f"PII counts: {NOT_RECORDED}.")
    dd = rep.get("dedup") or {}
    if dd.get("definition"):
        parts.append(f"Near duplicates: {md(dd['definition'])}.")
    bm = (rep.get("decontamination") or {}).get("benchmarks")
    if isinstance(bm, dict) and isinstance(bm.get("files"), list):
        names = ", ".join(code(f.get("file")) for f in bm["files"] if isinstance(f, dict)) or NOT_RECORDED
        parts.append(f"Benchmark decontamination against {names}: {num(bm.get('removed'))} domain and "
                     f"{num(bm.get('generic_removed'))} generic row(s) near-duplicating a benchmark row were "
                     "quarantined.")
    parts.append(_provenance_part(rep.get("provenance") or (src.dataset or {}).get("provenance")))
    lock = (src.dataset or {}).get("eval_lock_sha256") or rep.get("eval_lock_sha256")
    trained = (src.sidecar.get("dataset") or {}).get("eval_lock_sha256") if isinstance(src.sidecar.get("dataset"), dict) else None
    line = f"Frozen eval lock (`eval.lock.json`) sha256: {code(lock or NOT_RECORDED)}."
    if lock and trained and lock != trained:
        line += f" **The adapter was trained against lock {code(trained)}: the dataset directory changed since training.**"
    parts.append(line)
    inputs = rep.get("inputs") or (src.dataset or {}).get("inputs") or []
    if inputs:
        parts.append("Input files:\n\n" + table(["file", "rows", "quarantined", "sha256"],
                                                [[md(f.get("file")), num(f.get("rows")), num(f.get("quarantined")),
                                                  md(str(f.get("sha256", ""))[:16])] for f in inputs if isinstance(f, dict)]))
    return "\n\n".join(parts) + "\n"


PROVENANCE_CARD_ROWS = 20


def _provenance_part(prov: Any) -> str:
    """Provenance as the data report counted it: source × review status × license, rows kept / quarantined /
    dropped, and the review the build required."""
    if not isinstance(prov, dict) or not isinstance(prov.get("rows"), list):
        return f"Provenance (source, review status, license): {NOT_RECORDED}."
    need = prov.get("require_review")
    review = (f"Only rows whose review status is one of {', '.join(code(x) for x in need)} were kept "
              "(`data.require_review`); the others were quarantined." if isinstance(need, list) and need
              else "No review was required by the build (`data.require_review` unset): kept rows may be unreviewed.")
    rows = [r for r in prov["rows"] if isinstance(r, dict)]

    def cell(v: Any) -> str:
        return "(none)" if v in (None, "") else md(v)

    shown = [[cell(r.get("source")), cell(r.get("review_status")), cell(r.get("license")), num(r.get("kept")),
              num(r.get("quarantined")), num(r.get("dropped"))] for r in rows[:PROVENANCE_CARD_ROWS]]
    more = (f"\n\n{num(len(rows) - PROVENANCE_CARD_ROWS)} more provenance row(s) in the dataset report."
            if len(rows) > PROVENANCE_CARD_ROWS else "")
    return ("Provenance of the input rows (kept: in train or the frozen eval; dropped: duplicates, decontaminated, "
            f"balanced out or generic rows not mixed in). {review}\n\n"
            + table(["source", "review status", "license", "kept", "quarantined", "dropped"], shown) + more)


def _procedure_section(src: Sources) -> str:
    side = src.sidecar
    if not side:
        return f"### Training procedure\n\nTraining configuration: {NOT_RECORDED} (no gemtune.json beside the adapter).\n"
    cfg = side.get("config") if isinstance(side.get("config"), dict) else {}
    lo = _lora(src)
    lr = cfg.get("lr")
    if lr is None and side.get("preset"):
        try:
            from gemtune.train.presets import get_preset

            lr = f"{get_preset(side['preset']).lr} (preset default)"
        except Exception:  # an unknown preset name: say what was recorded
            lr = None
    horizon = (src.run or {}).get("horizon")
    rows = [
        ["preset", side.get("preset")], ["LoRA rank / alpha / dropout", f"{lo['r']} / {lo['alpha']} / {lo['dropout']}"],
        ["target modules", lo["targets"]], ["learning rate", lr],
        ["batch size x grad accumulation", f"{cfg.get('batch_size')} x {cfg.get('grad_accum')}" if cfg else None],
        ["steps", f"{side.get('step')}" + (f" (planned {horizon})" if horizon else "")],
        ["scheduler / warmup", f"{cfg.get('scheduler')} / {cfg.get('warmup_ratio')}" if cfg else None],
        ["max length (tokens)", cfg.get("max_len")], ["dtype", cfg.get("dtype")],
        ["quantisation", cfg.get("quant") or ("none" if cfg else None)], ["packing", cfg.get("packing")],
        ["seed", cfg.get("seed")],
        ["trainable parameters", f"{_num_raw(side['trainable_params'])} ({side.get('trainable_pct')}%)"
                                 if isinstance(side.get("trainable_params"), int) else None],
        ["final train loss", _num_raw(side.get("final_train_loss"), 4) if side.get("final_train_loss") is not None
         else None],
        ["final eval loss", _num_raw(side.get("final_eval_loss"), 4) if side.get("final_eval_loss") is not None else None],
    ]
    return "### Training procedure\n\n" + table(["setting", "value"], [[k, NOT_RECORDED if v is None else md(v)]
                                                                     for k, v in rows]) + "\n"


def section_training(src: Sources) -> str:
    return "## Training details\n\n" + _data_section(src) + "\n" + _procedure_section(src)


def section_evaluation(src: Sources) -> str:
    ev = src.eval
    if not ev:
        return ("## Evaluation\n\nEvaluation: " + NOT_RUN + " (no eval summary in gemtune.json and no `--eval` "
                "directory given). Run `gemtune eval --adapter … --suite DATA/eval.jsonl --out DIR`.\n")
    cmp = ev.get("compare") or {}
    suite = (src.eval_meta or {}).get("suite") or {}
    testing = [f"Source: {md(src.eval_source)}."]
    if suite:
        testing.append(f"Suite {code(suite.get('path'))}: {num(suite.get('n'))} cases, sha256 "
                       f"{code(str(suite.get('sha256'))[:16])}.")
    else:
        testing.append(f"{num(ev.get('n'))} cases of the frozen eval set.")
    if not cmp:
        return ("## Evaluation\n\n### Testing data\n\n" + " ".join(testing) + "\n\n### Results\n\n"
                + table(["metric", "adapter"], [["accuracy", pct(ev.get("accuracy"))]])
                + f"\n\nComparison with a baseline: {NOT_RUN}.\n")
    acc = cmp.get("accuracy") or {}
    gate = cmp.get("gate") or ev.get("gate") or {}
    ci = cmp.get("delta_ci") or {}
    p = (cmp.get("mcnemar") or {}).get("p_value")
    status = NOT_RUN if gate.get("passed") is None else ("PASS" if gate["passed"] else "FAIL")
    rows = [
        ["accuracy", pct(acc.get("candidate")), pct(acc.get("baseline"))],
        ["accuracy change", f"{'+' if (acc.get('delta') or 0) >= 0 else ''}{pct(acc.get('delta'))} "
                            f"(95% CI {pct(ci.get('low'))} to {pct(ci.get('high'))})", ""],
        ["win-rate (ties count half)", num(cmp.get("win_rate"), 3), ""],
        ["wins / losses / ties", f"{num(cmp.get('wins'))} / {num(cmp.get('losses'))} / {num(cmp.get('ties'))}", ""],
        ["regressions (baseline right, adapter wrong)", f"{len(cmp.get('regressions') or [])} "
                                                        f"({pct(cmp.get('regression_rate'))})", ""],
        ["McNemar exact p", num(p, 4) if isinstance(p, float) else num(p), ""],
        ["regression gate", f"{status} (limit {pct(gate.get('threshold'))} of cases)", ""],
    ]
    out = ("## Evaluation\n\n### Testing data\n\n" + " ".join(testing) + "\n\n### Results\n\n"
           + table(["metric", "adapter", f"baseline ({md(cmp.get('baseline', 'base'))})"], rows))
    if ev.get("line"):
        out += f"\n\n{code(ev['line'])}"
    return out + "\n"


def _privacy_numbers(src: Sources) -> dict:
    """The probe's headline numbers whether the card has the full report or the gemtune.json summary."""
    pv = src.privacy or {}
    ext, can, pii = pv.get("extraction") or {}, pv.get("canaries") or {}, pv.get("pii") or {}
    if src.privacy_full:
        n = {"sampled": ext.get("sampled"), "probes": ext.get("probes"), "near": (pv.get("config") or {}).get("near_similarity"),
             "pii_samples": (pii.get("adapter") or {}).get("samples"), "engine": pii.get("engine")}
    else:
        n = {"sampled": ext.get("sampled"), "probes": ext.get("probes"), "near": ext.get("near_similarity"),
             "pii_samples": pii.get("samples"), "engine": None}
    n.update(ext_status=ext.get("status"), can_status=can.get("status"), pii_status=pii.get("status"),
             ext={k: ext.get(k) or {} for k in ("adapter", "base")}, can={k: can.get(k) or {} for k in ("adapter", "base")},
             pii={k: pii.get(k) or {} for k in ("adapter", "base")}, count=can.get("count"),
             candidates=can.get("candidates"), max_possible=can.get("max_possible"),
             known=pii.get("known_values"))
    return n


def _check_status(src: Sources, name: str) -> str:
    for c in (src.privacy or {}).get("checks") or []:
        if c.get("name") == name:
            if c.get("adapter") is None:
                return NOT_RUN
            if c.get("limit") is None:
                return "reported (no limit)"
            return "PASS" if c.get("passed") else "FAIL"
    return NOT_RUN


def _limit(src: Sources, name: str, unit: str) -> str:
    for c in (src.privacy or {}).get("checks") or []:
        if c.get("name") == name and c.get("limit") is not None:
            return pct(c["limit"]) if unit == "share" else f"{num(c['limit'])}{' bits' if unit == 'bits' else ''}"
    return "none"


def residual_risk(src: Sources) -> str:
    """A plain statement of what the probes showed and what they cannot show."""
    if not src.privacy:
        return ("The privacy probes were not run for this adapter, so how much of its training data it memorised is "
                "unmeasured. Treat every training example as potentially reproducible until `gemtune probe` has run.")
    n = _privacy_numbers(src)
    said = []
    rep = src.report or {}
    pii_counts = {k: v for k, v in (rep.get("pii") or {}).items() if v}
    if pii_counts:
        said.append("Before training, " + ", ".join(f"{num(v)} {md(k)}" for k, v in pii_counts.items())
                    + " value(s) were redacted from the data, and "
                    f"{num((rep.get('counts') or {}).get('exact_duplicates'))} exact and "
                    f"{num((rep.get('counts') or {}).get('near_duplicates'))} near duplicates removed.")
    if n["ext_status"] == "run":
        a, b = n["ext"]["adapter"], n["ext"]["base"]
        said.append(f"Of {num(n['sampled'])} sampled training examples, the adapter reproduced {pct(a.get('extraction_rate'))} "
                    f"exactly or nearly ({pct(a.get('exact_rate'))} exactly); the base alone reproduced "
                    f"{pct(b.get('extraction_rate'))}.")
    else:
        said.append("The extraction probe did not run (no training answer was long enough to carry a memorised string).")
    if n["can_status"] == "run":
        a, b = n["can"]["adapter"], n["can"]["base"]
        s = (f"The most exposed of {num(n['count'])} planted canaries reached {num(a.get('max_exposure'))} bits of a possible "
             f"{num(n['max_possible'])} (mean {num(a.get('mean_exposure'))}; base {num(b.get('mean_exposure'))}; "
             "a secret the model never learned averages about 1.4 bits).")
        if a.get("rank1"):
            s += (f" {num(a['rank1'])} canary secret(s) ranked first among {num(n['candidates'])} candidates: the adapter has "
                  "memorised rare strings it saw in training, so other rare strings in that data may be extractable too.")
        said.append(s)
    else:
        said.append("No canaries were planted, so memorisation of rare strings was not measured directly.")
    if n["pii_status"] == "run":
        a, b = n["pii"]["adapter"], n["pii"]["base"]
        said.append(f"In {num(n['pii_samples'])} sampled generations the adapter wrote {num(a.get('hits'))} PII-shaped "
                    f"value(s) (base: {num(b.get('hits')) if b else NOT_RUN}); {num(a.get('leaks'))} matched a value "
                    "from the training "
                    "data.")
    else:
        said.append("PII regurgitation was not probed.")
    said.append("These probes test samples, greedy decoding and one sampling temperature; they show memorisation of "
                "what they probed and cannot prove that nothing else was memorised."
                + ("" if n.get("engine") == "presidio" else " Names and street addresses are not detected by the builtin "
                   "PII engine."))
    verdict = (src.privacy or {}).get("passed")
    said.append("Verdict: every privacy threshold held." if verdict else
                "Verdict: at least one privacy threshold was exceeded; do not release this adapter as is." if verdict is False
                else "")
    return " ".join(s for s in said if s)


def section_privacy(src: Sources) -> str:
    if not src.privacy:
        return ("## Privacy\n\nPrivacy probes: " + NOT_RUN + " (run `gemtune probe --adapter … --data … --out …`).\n\n"
                "### Residual risk\n\n" + residual_risk(src) + "\n")
    n = _privacy_numbers(src)
    pv = src.privacy
    rows = []
    if n["ext_status"] == "run":
        a, b = n["ext"]["adapter"], n["ext"]["base"]
        rows.append(["training examples reproduced exactly", pct(a.get("exact_rate")), pct(b.get("exact_rate")), "", ""])
        rows.append([f"... exactly or nearly (edit similarity >= {md(n['near'])})", pct(a.get("extraction_rate")),
                     pct(b.get("extraction_rate")), _limit(src, "extraction rate", "share"),
                     _check_status(src, "extraction rate")])
    else:
        rows.append(["training examples reproduced", NOT_RUN, NOT_RUN, "", NOT_RUN])
    if n["can_status"] == "run":
        a, b = n["can"]["adapter"], n["can"]["base"]
        rows.append([f"canary exposure, max (bits, of {num(n['max_possible'])})", num(a.get("max_exposure")),
                     num(b.get("max_exposure")), _limit(src, "canary exposure (max, rank)", "bits"),
                     _check_status(src, "canary exposure (max, rank)")])
        rows.append(["canary exposure, mean (bits)", num(a.get("mean_exposure")), num(b.get("mean_exposure")), "", ""])
        rows.append(["canary exposure, max extrapolated (bits)", num(a.get("max_exposure_extrapolated")),
                     num(b.get("max_exposure_extrapolated")), _limit(src, "canary exposure (max, extrapolated)", "bits"),
                     _check_status(src, "canary exposure (max, extrapolated)")])
    else:
        rows.append(["canary exposure", NOT_RUN, NOT_RUN, "", NOT_RUN])
    if n["pii_status"] == "run":
        a, b = n["pii"]["adapter"], n["pii"]["base"]
        bh, bl = (num(b.get("hits")), num(b.get("leaks"))) if b else (NOT_RUN, NOT_RUN)
        rows.append(["PII values in sampled generations", num(a.get("hits")), bh,
                     _limit(src, "PII hits", "values"), _check_status(src, "PII hits")])
        rows.append(["... of which values from the data", num(a.get("leaks")), bl,
                     _limit(src, "PII leaks (values from the data)", "values"),
                     _check_status(src, "PII leaks (values from the data)")])
    else:
        rows.append(["PII in sampled generations", NOT_RUN, NOT_RUN, "", NOT_RUN])
    probed = pv.get("adapter_sha256")
    mismatch = ""
    if probed and src.weights_sha256 and probed != src.weights_sha256:
        mismatch = (f"\n\n**These probe results were measured on other adapter weights (sha256 {code(probed)}), not "
                    f"on this adapter's ({code(src.weights_sha256)}): re-run `gemtune probe` on this adapter.**")
    head = (f"Probe report: {code(src.privacy_source)}" + (f", {md(pv.get('created_at'))}" if pv.get("created_at") else "")
            + f". Extraction: {num(n['sampled'])} sampled training examples, {num(n['probes'])} greedy probes "
            "(k-extractable, Carlini et al. 2023). Canaries: exposure = log2 R - log2 rank of the true secret among "
            f"R = {num(n['candidates'])} candidates (Carlini et al. 2019). PII: seeded temperature sampling from "
            "training prompts, scanned with the data stage's detector.")
    return ("## Privacy\n\n" + head + mismatch + "\n\n" + table(["probe", "adapter", "base", "limit", "status"], rows)
            + "\n\n### Residual risk\n\n" + residual_risk(src) + "\n")


def section_environment(src: Sources) -> str:
    side = src.sidecar
    hw = side.get("hardware") or (src.run or {}).get("hardware")
    if isinstance(hw, dict):
        hw = ", ".join(f"{md(k)}: {md(v)}" for k, v in hw.items())
    elif hw:
        hw = md(hw)
    rows = [f"- **Hardware:** {hw or NOT_RECORDED}"]
    if (src.run or {}).get("processes"):
        rows.append(f"- **Training processes:** {num(src.run['processes'])}")
    if src.metrics:
        last = src.metrics[-1]
        t = last.get("time")
        rows.append(f"- **Training time:** {num(t, 1)} s for {num(last.get('step'))} steps"
                    + (f" ({num(last.get('tokens_per_s'), 0)} tokens/s at the end)" if last.get("tokens_per_s") else ""))
    else:
        rows.append(f"- **Training time:** {NOT_RECORDED}")
    timings = (src.privacy or {}).get("timings_s") if src.privacy_full else None
    if timings:
        rows.append(f"- **Privacy probe time:** {num(timings.get('total'), 1)} s")
    rows.append("- **Carbon emitted:** not estimated (no power measurement was recorded).")
    return "## Environmental impact\n\n" + "\n".join(rows) + "\n"


def section_serving(src: Sources) -> str:
    hub, base = base_ids(src)
    lo = _lora(src)
    adapter = str(src.adapter.resolve())
    base_arg = side_path if (side_path := src.sidecar.get("base_path")) else hub
    name = registry_name(src.name)  # [a-z0-9._-] only: safe in a shell line and in JSON
    q = shlex.quote
    gemtune_sh = (f"gemtune registry --root registry push {name} {q(adapter)}\n"
                  f"gemtune registry --root registry promote {name} v1 --alias prod\n"
                  f"gemtune serve --registry registry --base {q(str(base))}\n"
                  "curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                  f"""  -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "..."}}]}}'""")
    vllm_sh = (f"vllm serve {q(str(base_arg))} --enable-lora --max-lora-rank {q(str(lo['r']))} "
               f"--lora-modules {q(f'{name}={adapter}')}")
    py = ("from peft import PeftModel\n"
          "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
          f"base = AutoModelForCausalLM.from_pretrained({json.dumps(str(base_arg))}, dtype=\"float32\")\n"
          f"model = PeftModel.from_pretrained(base, {json.dumps(adapter)})\n"
          f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(str(base_arg))})")
    return ("## How to serve\n\nWith gemtune (OpenAI-compatible server; the registry verifies sha256 on every load):"
            f"\n\n{fenced(gemtune_sh, 'bash')}\n\n"
            f"With vLLM (the adapter is plain LoRA, rank {num(lo['r'])}, so it loads unchanged):\n\n"
            f"{fenced(vllm_sh, 'bash')}\n\n"
            "With PEFT (use bfloat16 or float32 with Gemma, never float16):\n\n"
            f"{fenced(py, 'python')}\n")


def registry_name(name: str) -> str:
    """The card's name as the registry accepts it (lower case, letters, digits, '.', '_', '-')."""
    import re

    s = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:64]
    return s if s and s != "base" else "my-adapter"


# ------------------------------------------------------------------------------------------------ card
def build_card(adapter: str | Path, *, data: Optional[str | Path] = None, eval_dir: Optional[str | Path] = None,
               probe: Optional[str | Path] = None, name: Optional[str] = None, license: Optional[str] = None) -> str:
    """The model card text (front matter + Markdown) for `adapter`."""
    src = gather(adapter, data=data, eval_dir=eval_dir, probe=probe, name=name)
    sections = [section_intro(src), section_details(src, license), section_uses(src), section_risks(src),
                section_training(src), section_evaluation(src), section_privacy(src), section_environment(src),
                section_serving(src)]
    return render_front_matter(front_matter(src, license)) + "\n" + "\n".join(sections)


def write_card(adapter: str | Path, out: str | Path, **kw) -> Path:
    """Write the card atomically to `out` (a file; README.md by convention)."""
    out = Path(out)
    if out.is_dir():
        raise UserError("--out must be a file path such as README.md, not a directory", file=str(out), field="--out")
    atomic_write_text(out, build_card(adapter, **kw))
    return out
