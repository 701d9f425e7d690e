"""Training speed: gemtune vs TRL SFTTrainer + PEFT on the real Gemma 3 270M, banking77 routing.

Same machine, same run of this script, same data, LoRA (r16, alpha 32, dropout 0.05, q/k/v/o), batch, steps,
learning rate and seed; fp32. Each trainer runs in its own child process so its peak RSS is its own.
TRL uses the defaults a user picks for prompt-completion data (completion-only loss).
Both adapters' eval loss is measured by the same function (mean token loss on the answer + end-of-turn).

    .venv/bin/python bench/train.py [--steps 60] [--batch 8] [--train 1000] [--eval 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import banking77_rows, peak_rss_gib, routing_records, write_result  # noqa: E402

LR, R, ALPHA, DROPOUT, MAXLEN, SEED = 2e-4, 16, 32, 0.05, 256, 42


def write_dataset(d: Path, n_train: int, n_eval: int) -> Path:
    recs = routing_records(banking77_rows("train"), n_train + n_eval, seed=SEED)
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:n_train]))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[n_train:]))
    return d


def measure_eval_loss(adapter: str, data: Path) -> float:
    import torch
    from peft import PeftModel

    from gemtune.base.families import family_of
    from gemtune.base.loader import load_base
    from gemtune.train.collate import encode_records
    from gemtune.train.loss import SupervisedLM
    from gemtune.train.trainer import eval_loss

    model, tok = load_base("gemma-3-270m")
    model = PeftModel.from_pretrained(model, adapter)
    recs = [json.loads(l) for l in (data / "eval.jsonl").read_text().splitlines()]
    ex, _ = encode_records(recs, tok, family_of(model), MAXLEN)
    with torch.no_grad():
        return eval_loss(SupervisedLM(model), ex, tok.pad_token_id, 16)


def cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared machine wall-clock swings with the neighbours' load,
    CPU time much less (children run with OMP_WAIT_POLICY=PASSIVE so idle threads do not spin)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_gemtune(data: Path, out: Path, steps: int, batch: int) -> dict:
    from gemtune.train.config import TrainConfig
    from gemtune.train.trainer import train

    cfg = TrainConfig(base="gemma-3-270m", batch_size=batch, lr=LR, seed=SEED, max_len=MAXLEN, max_steps=steps,
                      warmup_ratio=0.0, scheduler="linear")
    t, c = time.time(), cpu_seconds()
    res = train(data, out, cfg, progress=False)
    secs, cpu = time.time() - t, cpu_seconds() - c
    return {"seconds": secs, "cpu_seconds": cpu, "loop_examples_per_s": res.examples_per_s,
            "examples_per_cpu_s": steps * batch / cpu, "adapter": str(res.adapter_dir), "train_loss": res.losses[-1]}


def run_trl(data: Path, out: Path, steps: int, batch: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from gemtune.base.provision import pull

    base = pull("gemma-3-270m")
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="float32")
    recs = [json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()]
    # prompt-completion in the Gemma 3 template (the GGUF tokenizer has no chat template of its own)
    rows = [{"prompt": f"<start_of_turn>user\n{r['messages'][0]['content']}<end_of_turn>\n<start_of_turn>model\n",
             "completion": f"{r['messages'][1]['content']}<end_of_turn>"} for r in recs]
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="linear", warmup_steps=0, seed=SEED, max_length=MAXLEN, logging_steps=10,
                     save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
                     dataloader_num_workers=0)
    peft_cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_cfg)
    t, c = time.time(), cpu_seconds()
    out_metrics = trainer.train()
    secs, cpu = time.time() - t, cpu_seconds() - c
    trainer.model.save_pretrained(str(out / "adapter"))
    return {"seconds": secs, "cpu_seconds": cpu, "loop_examples_per_s": steps * batch / secs,
            "examples_per_cpu_s": steps * batch / cpu, "adapter": str(out / "adapter"),
            "train_loss": out_metrics.training_loss}


def accuracy(adapter: str, data: Path, out: Path, cases: int) -> dict:
    """Frozen-eval routing accuracy of the adapter and of the base (greedy, label scorer)."""
    from gemtune.evals.config import EvalConfig
    from gemtune.evals.pipeline import run_eval

    t = time.time()
    o = run_eval(adapter, data / "eval.jsonl", out, baseline="base", config=EvalConfig(max_new_tokens=12),
                 max_cases=cases, echo=lambda m: None)
    comp = o.comparison or {}
    return {"cases": cases, "adapter_accuracy": o.summary["accuracy"],
            "base_accuracy": comp.get("baseline_accuracy"), "line": o.line, "seconds": time.time() - t}


def child(which: str, data: Path, out: Path, steps: int, batch: int) -> None:
    if which == "accuracy":
        print("RESULT " + json.dumps(accuracy(str(out / "adapter"), data, out / "eval", int(os.environ["CASES"]))),
              flush=True)
        return
    t = time.time()
    res = run_gemtune(data, out, steps, batch) if which == "gemtune" else run_trl(data, out, steps, batch)
    res["wall_seconds"] = time.time() - t  # includes model load
    res["peak_rss_gib"] = peak_rss_gib()
    res["eval_loss"] = measure_eval_loss(res["adapter"], data)
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--only", choices=["gemtune", "trl"])
    ap.add_argument("--child", choices=["gemtune", "trl", "accuracy"])
    ap.add_argument("--accuracy-cases", type=int, default=200, help="frozen-eval cases for adapter vs base accuracy")
    ap.add_argument("--data")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.child:
        child(a.child, Path(a.data), Path(a.out), a.steps, a.batch)
        return
    tmp = Path(tempfile.mkdtemp(prefix="gemtune-bench-train-"))
    data = write_dataset(tmp / "data", a.train, a.eval)
    results = {}
    for which in ([a.only] if a.only else ["gemtune", "trl"]):
        p = subprocess.run([sys.executable, __file__, "--child", which, "--data", str(data), "--out", str(tmp / which),
                            "--steps", str(a.steps), "--batch", str(a.batch)], capture_output=True, text=True,
                           env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(p.stdout[-3000:], p.stderr[-5000:])
            raise SystemExit(f"{which} failed")
        results[which] = json.loads(line[-1][7:])
    if "gemtune" in results and a.accuracy_cases:
        p = subprocess.run([sys.executable, __file__, "--child", "accuracy", "--data", str(data), "--out",
                            str(tmp / "gemtune")], capture_output=True, text=True,
                           env={**os.environ, "CASES": str(a.accuracy_cases), "OMP_WAIT_POLICY": "PASSIVE"})
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(p.stderr[-3000:])
            raise SystemExit("accuracy eval failed")
        results["accuracy"] = json.loads(line[-1][7:])
    g, t = results.get("gemtune"), results.get("trl")
    print(f"\nbanking77 routing, Gemma 3 270M fp32, LoRA r{R} q/k/v/o, batch {a.batch}, {a.steps} steps, max_len {MAXLEN}")
    print(f"{'':22}{'gemtune':>12}{'TRL+PEFT':>12}{'ratio':>10}")
    rows = [("examples/s", "loop_examples_per_s", lambda x, y: x / y),
            ("examples/CPU-s", "examples_per_cpu_s", lambda x, y: x / y),
            ("peak RSS GiB", "peak_rss_gib", lambda x, y: x / y),
            ("final eval loss", "eval_loss", lambda x, y: x / y),
            ("train seconds", "seconds", lambda x, y: x / y)]
    summary = {}
    for label, key, ratio in rows:
        gv = g[key] if g else float("nan")
        tv = t[key] if t else float("nan")
        r = ratio(gv, tv) if g and t else float("nan")
        summary[key] = {"gemtune": gv, "trl": tv, "ratio": r}
        print(f"{label:22}{gv:12.3f}{tv:12.3f}{r:10.2f}")
    if "accuracy" in results:
        acc = results["accuracy"]
        print(f"frozen-eval routing accuracy ({acc['cases']} cases, 77 intents): {acc['line']}")
    import os as _os

    out = write_result("train", {"load_average_at_end": list(_os.getloadavg()), "config": {"steps": a.steps, "batch": a.batch, "train": a.train, "eval": a.eval,
                                            "rank": R, "alpha": ALPHA, "dropout": DROPOUT, "max_len": MAXLEN, "lr": LR},
                                 "results": results, "summary": summary,
                                 "goals": {"examples_per_s_ratio": ">= 3.0", "eval_loss_ratio": "within 2%",
                                           "peak_rss_ratio": "<= 0.5"}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
