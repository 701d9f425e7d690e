"""`gemtune eval` and `gemtune eval compare`.

`eval` is a Typer group whose callback runs when no sub-verb is given (`invoke_without_command=True`), so
`gemtune eval --adapter … --suite … --out …` and `gemtune eval compare CAND BASE` live under one name.
Exit codes: 0 gate passed (or no gate), 1 gate failed (`GateFailed`), 2 usage or input error (`UserError`).
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from gemtune.errors import UserError


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr)


def _config(config_path: Optional[str], **overrides):
    from gemtune.evals.config import load_eval_config

    return load_eval_config(config_path, **overrides)


def register(app: typer.Typer) -> None:
    eval_app = typer.Typer(help="Evaluate an adapter on a locked suite and gate it against a baseline.",
                           invoke_without_command=True, no_args_is_help=False)

    @eval_app.callback(invoke_without_command=True)
    def eval_run(
        ctx: typer.Context,
        adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter directory, or `base`."),
        suite: Optional[str] = typer.Option(None, "--suite", help="Suite JSONL, or a dataset dir with eval.jsonl."),
        out: Optional[str] = typer.Option(None, "--out", help="Directory for results.json, summary.json, report.html."),
        baseline: str = typer.Option("auto", "--baseline",
                                     help="`base`, an adapter dir, a results.json, `registry:NAME@ALIAS` (the version "
                                          "live under an alias), `openai:URL#MODEL` (any OpenAI-compatible endpoint) "
                                          "or `none`; default: eval.gate_baseline (the live version named by "
                                          "eval.live when it routes somewhere, else the base) for an adapter."),
        registry: Optional[str] = typer.Option(None, "--registry", help="Registry directory for registry: baselines "
                                               "(default: $GEMTUNE_REGISTRY, then eval.registry)."),
        baseline_key_env: Optional[str] = typer.Option(None, "--baseline-key-env",
                                                       help="Environment variable holding the openai: baseline's API "
                                                            "key (default: OPENAI_API_KEY when set; none for a local "
                                                            "server)."),
        baseline_concurrency: int = typer.Option(4, "--baseline-concurrency", min=1, max=256,
                                                 help="Requests in flight to an openai: baseline."),
        price: Optional[str] = typer.Option(None, "--price", help="IN,OUT: USD per 1M input and output tokens of the "
                                            "openai: baseline; the summary shows its cost per 1k cases."),
        adapter_price: Optional[str] = typer.Option(None, "--adapter-price", help="IN,OUT: USD per 1M input and "
                                                    "output tokens of the adapter, shown beside the baseline's."),
        gate: Optional[float] = typer.Option(None, "--gate", help="Largest tolerated share of regressed cases [0.02]."),
        slack_webhook: Optional[str] = typer.Option(None, "--slack-webhook",
                                                    help="Post the one-line result here (default: $SLACK_WEBHOOK_URL)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Regenerate every output (the cache is still refreshed)."),
        latency: bool = typer.Option(False, "--latency", help="Also time each case unbatched (p50/p95)."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        max_cases: Optional[int] = typer.Option(None, "--max-cases", help="Only the first N cases (smoke runs)."),
        base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the adapter's gemtune.json)."),
        judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint for the pairwise judge."),
        judge_model: str = typer.Option("judge", "--judge-model", help="`model` field sent to the judge endpoint."),
        config: Optional[str] = typer.Option(None, "--config", help="gemtune.yaml whose `eval:` section sets the defaults."),
        record: bool = typer.Option(False, "--record",
                                    help="Write the summary and the gate verdict (`shippable`) into the adapter's "
                                         "gemtune.json, as the per-checkpoint eval does; `registry push` then "
                                         "refuses a failed adapter. Needs a gate (a baseline) and the full suite."),
    ):
        """Evaluate --adapter on --suite, compare with --baseline, write --out; exit 1 when the gate fails."""
        if ctx.invoked_subcommand is not None:
            return
        missing = [f for f, v in (("--adapter", adapter), ("--suite", suite), ("--out", out)) if not v]
        if missing:
            raise UserError(f"missing {', '.join(missing)} (see `gemtune eval --help`)", field=missing[0].lstrip("-"))
        from gemtune.evals.baselines import ExternalOptions, parse_price
        from gemtune.evals.gate import enforce
        from gemtune.evals.pipeline import check_record, record_verdict, run_eval

        if record:  # refused before anything is generated
            check_record(adapter, baseline, max_cases)

        cfg = _config(config, gate=gate, max_new_tokens=max_new_tokens, batch_size=batch_size)
        external = ExternalOptions(key_env=baseline_key_env, concurrency=baseline_concurrency,
                                   price=parse_price(price))
        outcome = run_eval(adapter, suite, out, baseline=baseline, config=cfg, webhook=slack_webhook,
                           no_cache=no_cache, latency=latency, base=base, judge_url=judge_url, judge_model=judge_model,
                           max_cases=max_cases, progress=_progress, registry=registry, external=external,
                           adapter_price=parse_price(adapter_price, "adapter_price"))
        _progress(f"wrote {outcome.out}/results.json, summary.json, report.html")
        if record:
            path, side = record_verdict(adapter, outcome)
            _progress(f"recorded eval verdict in {path}: shippable {side['shippable']} against "
                      f"{outcome.baseline_spec.id if outcome.baseline_spec else '?'}")
        if outcome.gate is not None:
            enforce(outcome.gate, outcome.line)

    @eval_app.command("compare")
    def eval_compare(
        candidate: str = typer.Argument(..., help="Candidate results.json (or its directory)."),
        baseline: str = typer.Argument(..., help="Baseline results.json (or its directory)."),
        gate: Optional[float] = typer.Option(None, "--gate", help="Largest tolerated share of regressed cases [0.02]."),
        slack_webhook: Optional[str] = typer.Option(None, "--slack-webhook"),
        out: Optional[str] = typer.Option(None, "--out", help="Also write summary.json and report.html here."),
        judge_url: Optional[str] = typer.Option(None, "--judge-url"),
        judge_model: str = typer.Option("judge", "--judge-model"),
        config: Optional[str] = typer.Option(None, "--config"),
    ):
        """Compare two saved results: win-rate, regressions, McNemar p, CI; exit 1 when the gate fails."""
        from gemtune.evals.gate import enforce
        from gemtune.evals.pipeline import compare_files

        cfg = _config(config, gate=gate)
        outcome = compare_files(candidate, baseline, config=cfg, webhook=slack_webhook, out=out,
                                judge_url=judge_url, judge_model=judge_model)
        enforce(outcome.gate, outcome.line)

    app.add_typer(eval_app, name="eval")
