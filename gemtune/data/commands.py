"""`gemtune data build` and `gemtune data report`: CLI wiring only: parse flags, call the pipeline (pipeline.py,
config.py, report.py), print with rich."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

STAGE_LABELS = {"read": "reading + sanitising + PII", "generic": "generic rows", "tokens": "counting tokens",
                "dedup": "dedup + decontaminate", "write": "writing"}


class _RichProgress:
    """Adapter from the pipeline's (stage, done, total) callback to rich progress bars, one per stage."""

    def __init__(self, progress):
        self.p = progress
        self.tasks: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.totals: dict[str, Optional[int]] = {}

    def __call__(self, stage: str, done: int, total: Optional[int]) -> None:
        if stage not in self.tasks:
            for s, tid in self.tasks.items():  # a new stage means the earlier ones are finished
                if self.totals[s] is None:
                    n = max(self.done[s], 1)
                    self.p.update(tid, total=n, completed=n)
            self.tasks[stage] = self.p.add_task(STAGE_LABELS.get(stage, stage), total=total)
        self.done[stage], self.totals[stage] = done, total
        self.p.update(self.tasks[stage], completed=done, total=total)


def _summary_table(report: dict, out: str) -> Table:
    c = report["counts"]
    t = Table(title=f"dataset {out}", show_header=True, header_style="bold")
    t.add_column("rows")
    t.add_column("count", justify="right")
    for k in ("input_rows", "quarantined", "exact_duplicates", "near_duplicates", "decontaminated", "balanced_out",
              "eval", "generic_added", "train", "canaries"):
        if k in c:
            t.add_row(k.replace("_", " "), f"{c[k]:,}")
    by_stage = {st["stage"]: st.get("quarantined", 0) for st in report.get("stages", [])}
    for stage, label in (("review (require_review)", "  of which unreviewed"), ("answer schema", "  of which schema-invalid"),
                         ("benchmark decontamination", "  of which benchmark copies")):
        if by_stage.get(stage):
            t.add_row(label, f"{by_stage[stage]:,}")
    pii = {k: v for k, v in report.get("pii", {}).items() if v}
    t.add_row("PII redacted", ", ".join(f"{k} {v}" for k, v in pii.items()) or "none")
    tok = report.get("tokens", {}).get("all", {})
    if tok.get("count"):
        t.add_row("tokens p50 / p99 / max", f"{tok['p50']} / {tok['p99']} / {tok['max']}")
    if "timings_s" in report:
        t.add_row("time", f"{report['timings_s'].get('total', 0):.1f} s")
    return t


def _print_summary(report: dict, out: str) -> None:
    console.print(_summary_table(report, out))
    q = report["quarantine"]
    if q["total"]:
        first = q["first"][0]
        console.print(f"[yellow]{q['total']} row(s) quarantined[/yellow] — see {escape(str(Path(out) / q['file']))} "
                      f"(first: {escape(str(first['file']))}:{first['line']}: {escape(first['reason'])})",
                      highlight=False, soft_wrap=True)
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False, soft_wrap=True)
    lock = report.get("split", {})
    console.print(("eval kept identical to " + str(lock["lock_file"])) if lock.get("locked")
                  else f"eval frozen in {Path(out) / 'eval.lock.json'}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Curate raw examples into a training dataset (PII, dedup, frozen eval).",
                           no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("build")
    def build_cmd(
        inputs: list[str] = typer.Argument(..., help="JSONL, CSV or Parquet files (or directories of them)."),
        out: str = typer.Option(..., "--out", help="Dataset directory to write."),
        config: Optional[str] = typer.Option(None, "--config", help="gemtune.yaml (its `data:` section); default ./gemtune.yaml if present."),
        base: Optional[str] = typer.Option(None, "--base", help="Base whose tokenizer counts tokens (default gemma-3-270m)."),
        eval_fraction: Optional[float] = typer.Option(None, "--eval-fraction", help="Share of rows frozen for eval (0.10–0.15, default 0.12)."),
        eval_lock: Optional[str] = typer.Option(None, "--eval-lock", help="Keep exactly the eval set of this eval.lock.json."),
        refreeze: bool = typer.Option(False, "--refreeze", help="Draw a new eval set even though OUT holds a lock."),
        generic: Optional[list[str]] = typer.Option(None, "--generic", help="Generic instruction file(s) to mix into train."),
        generic_fraction: Optional[float] = typer.Option(None, "--generic-fraction", help="Generic share of the final train set (0.05–0.10, default 0.07)."),
        instruction: Optional[str] = typer.Option(None, "--instruction", help="Instruction for rows that have none."),
        map_: Optional[list[str]] = typer.Option(None, "--map", help="FIELD=COLUMN, e.g. --map input=text --map output=category."),
        task: Optional[str] = typer.Option(None, "--task", help="Task name for rows without one."),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Longest full example in tokens (default 2048)."),
        balance_multiple: Optional[float] = typer.Option(None, "--balance-multiple", help="Cap task/label groups at this multiple of the median (default 3)."),
        pii_engine: Optional[str] = typer.Option(None, "--pii-engine", help="builtin, or presidio for names/locations."),
        canaries: Optional[int] = typer.Option(None, "--canaries", help="Plant N secret canaries in train for the privacy probe."),
        canary_file: Optional[str] = typer.Option(None, "--canary-file", help="Where to record canaries (default OUT.canaries.json, outside OUT)."),
        decontaminate: Optional[list[str]] = typer.Option(
            None, "--decontaminate", help="Benchmark file (JSONL, CSV, Parquet), FILE or FILE:COLUMN, repeatable: rows "
            "near-duplicating any of its rows are quarantined. Replaces data.decontaminate."),
        decontaminate_column: Optional[str] = typer.Option(
            None, "--decontaminate-column", help="Column of the --decontaminate files that holds the text (default: "
            "prompt, question, text, input, instruction or the user turns of messages)."),
        require_review: Optional[list[str]] = typer.Option(
            None, "--require-review", help="Keep only rows whose review_status is this (repeatable), e.g. approved."),
        seed: Optional[int] = typer.Option(None, "--seed"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT even if it is a non-empty directory "
                                       "gemtune did not write (everything in it is deleted)."),
    ):
        """Build a dataset directory: sanitise, redact PII, dedup, freeze eval, balance, mix, report."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from gemtune.data.config import load_data_config, parse_decontaminate_flags, parse_map_flags
        from gemtune.data.pipeline import build

        overrides = {
            "base": base, "eval_fraction": eval_fraction, "eval_lock": eval_lock, "refreeze": refreeze or None,
            "generic": list(generic) if generic else None, "generic_fraction": generic_fraction,
            "instruction": instruction, "columns": parse_map_flags(map_) if map_ else None, "task": task,
            "max_tokens": max_tokens, "balance_multiple": balance_multiple, "pii_engine": pii_engine,
            "canaries": canaries, "canary_file": canary_file, "seed": seed,
            "decontaminate": parse_decontaminate_flags(decontaminate, decontaminate_column) if decontaminate else None,
            "require_review": list(require_review) if require_review else None,
        }
        if decontaminate_column and not decontaminate:
            from gemtune.errors import UserError

            raise UserError("--decontaminate-column names the column of --decontaminate files; give those too",
                            field="--decontaminate-column")
        cfg = load_data_config(config, overrides)
        if quiet:
            report = build(inputs, out, cfg, overwrite=overwrite)
        else:
            with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err_console, transient=False) as p:
                report = build(inputs, out, cfg, progress=_RichProgress(p), overwrite=overwrite)
        _print_summary(report, out)

    @data_app.command("report")
    def report_cmd(directory: str = typer.Argument(..., help="A dataset directory written by `data build`.")):
        """Print the summary of an existing build."""
        from gemtune.data.report import read_report

        _print_summary(read_report(directory), directory)
