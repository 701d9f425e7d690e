"""CLI verbs of the training stage: `gemtune plan` (train/plan.py) and `gemtune train` (train/trainer.py, with
the per-checkpoint eval of evals/checkpoint.py wired in). Wiring only: parse flags, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        model: Optional[str] = typer.Option(None, "--model", help="Base name, directory or hub id."),
        params: Optional[str] = typer.Option(None, "--params", help="Size instead of a model: 9b, 27b, 270m…"),
        config: Optional[Path] = typer.Option(None, "--config", help="Plan the run this gemtune.yaml would start on "
                                              "a GPU (its base, method, batch, seq, rank, dtype, checkpointing); "
                                              "flags given as well override it."),
        method: Optional[str] = typer.Option(None, "--method", help="lora | qlora  [default: lora]"),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help="[default: 2048]"),
        batch: Optional[int] = typer.Option(None, "--batch", help="[default: 1]"),
        rank: Optional[int] = typer.Option(None, "--rank", help="[default: 16]"),
        mlp: Optional[bool] = typer.Option(None, "--mlp/--no-mlp", help="LoRA on MLP projections too "
                                           "(structured/code presets)."),
        grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="[default: on, as the "
                                                 "trainer on a GPU]"),
        supervised_frac: float = typer.Option(1.0, "--supervised-frac", help="Share of tokens that carry loss."),
        train_tokens: Optional[float] = typer.Option(None, "--train-tokens", help="Tokens per epoch, for "
                                                     "hours/epoch."),
        price: Optional[list[str]] = typer.Option(None, "--price",
                                                  help="GPU=USD per GPU-hour, overriding the indicative list price "
                                                       "(repeatable), e.g. --price H100-80GB=2.10."),
        as_json: bool = typer.Option(False, "--json"),
    ):
        """GPU memory plan for a LoRA/QLoRA run: the GPUs it fits on, and the one to rent."""
        from gemtune.train.plan import plan_run

        shape, p, kw = plan_run(model=model, params=params, config=config,
                                settings={"method": method, "seq_len": seq_len, "batch": batch, "rank": rank,
                                          "mlp": mlp, "grad_ckpt": grad_ckpt},
                                supervised_frac=supervised_frac, train_tokens=train_tokens, prices=_prices(price))
        if as_json:
            print(json.dumps(p, indent=2))
        else:
            _print_plan(shape, p, kw, by_epoch=bool(train_tokens))

    @app.command("train")
    def train_cmd(
        data: Path = typer.Option(..., "--data", help="Dataset directory from `gemtune data build`."),
        out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, adapter, metrics)."),
        config: Optional[Path] = typer.Option(None, "--config", help="gemtune.yaml (its `train:` section)."),
        preset: Optional[str] = typer.Option(None, "--preset", help="default | routing | style | structured | code"),
        base: Optional[str] = typer.Option(None, "--base", help="Base model name, directory or hub id."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Train this many steps: the LR "
                                                "schedule's horizon, as train.max_steps and HF Trainer's "
                                                "max_steps."),
        stop_after: Optional[int] = typer.Option(None, "--stop-after-steps", help="Stop after this step without "
                                                 "moving the LR horizon (resume later to finish the schedule)."),
        log_every: Optional[int] = typer.Option(None, "--log-every", help="Off a terminal: a progress line every "
                                                "N steps (default: every 30 s)."),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Run the eval suite on every Nth "
                                                 "step's checkpoint."),
        eval_suite: Optional[Path] = typer.Option(None, "--eval-suite", help="Suite for --eval-every (default: "
                                                  "DATA/eval.jsonl)."),
        eval_max_cases: Optional[int] = typer.Option(None, "--eval-max-cases", help="Evaluate at most N cases per "
                                                     "checkpoint."),
        gate: float = typer.Option(0.02, "--gate", help="Max fraction of regressed cases for a checkpoint to ship."),
        gate_baseline: Optional[str] = typer.Option(None, "--gate-baseline", help="What each checkpoint must beat: "
                                                    "base, an adapter dir, a results.json, registry:NAME@ALIAS or "
                                                    "openai:URL#MODEL (default: eval.gate_baseline; its auto is the "
                                                    "version live under eval.live when it routes somewhere, else "
                                                    "the base)."),
        registry: Optional[str] = typer.Option(None, "--registry", help="Registry directory for the gate baseline "
                                               "(default: $GEMTUNE_REGISTRY, then eval.registry)."),
        slack_webhook: Optional[str] = typer.Option(None, "--slack-webhook", envvar="SLACK_WEBHOOK_URL"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        lr: Optional[float] = typer.Option(None, "--lr"),
        rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank override."),
        quant: Optional[str] = typer.Option(None, "--quant", help="4bit = QLoRA (bitsandbytes NF4)."),
        packing: Optional[bool] = typer.Option(None, "--packing/--no-packing"),
        seed: Optional[int] = typer.Option(None, "--seed"),
        resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint in --out."),
        report_to: Optional[str] = typer.Option(None, "--report-to", help="mlflow | wandb | tensorboard (when "
                                                "installed)."),
    ):
        """Train a LoRA adapter on a dataset directory."""
        from gemtune.evals.checkpoint import checkpoint_evals
        from gemtune.evals.config import load_eval_config
        from gemtune.train.config import load_train_config
        from gemtune.train.trainer import train

        cfg = load_train_config(config, {
            "preset": preset, "base": base, "save_every": save_every, "eval_every": eval_every,
            "batch_size": batch_size, "lr": lr, "lora.r": rank, "quant": quant, "packing": packing, "seed": seed,
            "report_to": report_to, "max_steps": max_steps, "log_every": log_every,
        }, flags={"max_steps": "--max-steps", "log_every": "--log-every"})
        with checkpoint_evals(out, data, cfg.base, enabled=bool(cfg.eval_every), suite=eval_suite, gate=gate,
                              webhook=slack_webhook, max_cases=eval_max_cases, baseline=gate_baseline,
                              registry=registry,
                              config=load_eval_config(config) if cfg.eval_every else None) as hook:
            res = train(data, out, cfg, stop_after=stop_after, resume=resume, on_checkpoint=hook, console=console)
        _print_result(res)


def _print_result(res) -> None:
    t = Table(title=f"trained {res.steps} steps in {res.seconds:.0f}s")
    t.add_column("what")
    t.add_column("value")
    t.add_row("adapter", str(res.adapter_dir))
    t.add_row("final train loss", f"{res.losses[-1]:.4f}" if res.losses else "-")
    if res.eval_losses:
        s = max(res.eval_losses)
        t.add_row("eval loss", f"{res.eval_losses[s]:.4f} (step {s})")
    t.add_row("trainable", f"{res.trainable:,} ({100 * res.trainable / max(res.total_params, 1):.3f}%)")
    t.add_row("throughput", f"{res.examples_per_s:.2f} examples/s, {res.tokens_per_s:,.0f} tokens/s")
    console.print(t)


def _print_plan(shape, p: dict, kw: dict, *, by_epoch: bool) -> None:
    console.print(f"[bold]{shape.params / 1e9:.2f}B params, {kw['method']}, seq {kw['seq_len']} x batch "
                  f"{kw['batch']}, rank {kw['rank']}[/bold]: {p['total_gib']:.1f} GiB")
    for k, v in p["breakdown"].items():
        console.print(f"  {k[:-4]:<26} {v:8.2f} GiB")
    t = Table(title="minimum GPUs")
    for col in ("GPU", "count", "GiB/GPU", "headroom", "$/h") + (("h/epoch", "$/epoch") if by_epoch else ("$/1B tok",)):
        t.add_column(col, justify="left" if col == "GPU" else "right")
    rec = p["recommended"] or {}
    for f in p["fits"]:
        mark = " *" if f["gpu"] == rec.get("gpu") else ""
        t.add_row(f["gpu"] + mark, str(f["count"]), f"{f['per_gpu_gib']:.1f}", f"{100 * f['headroom']:.0f}%",
                  f"{f['usd_per_hour']:.2f}",
                  *([f"{f['hours_per_epoch']:.2f}", f"{f['usd_per_epoch']:.2f}"] if by_epoch
                    else [f"{f['usd_per_1b_tokens']:.2f}"]))
    for g in p["does_not_fit"]:
        t.add_row(g, "does not fit on 8", "-", "-", "-", "-", *(["-"] if by_epoch else []))
    console.print(t)
    if rec:
        console.print(f"recommended: {rec['count']} x {rec['gpu']} — {rec['why']} "
                      "(indicative on-demand prices; --price GPU=USD to use yours)", highlight=False)
    else:
        console.print("[red]does not fit on up to 8 of any listed GPU[/red]: lower --seq-len or --batch, or use "
                      "--method qlora")


def _prices(price: Optional[list[str]]) -> dict[str, float]:
    from gemtune.errors import UserError

    prices = {}
    for item in price or []:
        gpu, _, usd = item.partition("=")
        try:
            prices[gpu.strip()] = float(usd)
        except ValueError:
            raise UserError(f"--price {item!r}: expected GPU=USD, e.g. H100-80GB=2.10", field="price") from None
        if prices[gpu.strip()] <= 0:
            raise UserError(f"--price {item!r}: the price must be positive", field="price")
    return prices
