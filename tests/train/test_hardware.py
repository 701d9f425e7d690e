"""The trainer on whatever hardware it finds: inputs on the model's device, the dtype/checkpointing policy and the
plan that shares it, progress lines in a log, --max-steps as the LR horizon."""

import json
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import gemtune.train.trainer as trainer
from gemtune.errors import UserError
from gemtune.train.collate import collate
from gemtune.train.config import TrainConfig
from gemtune.train.loss import SupervisedLM, _causal_lm
from gemtune.train.policy import resolve_policy

GEMTUNE = [sys.executable, "-m", "gemtune.cli"]


class Reached(Exception):
    """Raised by the pre-hook at the model's first forward: nothing after it needs to run."""


def record_input_devices(model) -> list[set]:
    """A forward pre-hook on the decoder body (what SupervisedLM calls) that records the devices of every tensor
    it is handed, then stops the run."""
    seen: list[set] = []

    def hook(module, args, kwargs):
        seen.append({str(t.device) for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)})
        raise Reached

    _causal_lm(model).model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_training_step_hands_the_model_inputs_on_its_device(tiny_gemma3, route_data, tmp_path, monkeypatch):
    """The batch is built on the CPU; with the model on `meta` (standing in for a GPU), the first forward of a
    real training step must see only meta tensors."""
    seen = []
    real_prepare = trainer.prepare

    def prepare_then_move(r):
        real_prepare(r)
        r.wrapper.to("meta")
        seen.append(record_input_devices(r.model))

    monkeypatch.setattr(trainer, "prepare", prepare_then_move)
    cfg = TrainConfig(base=str(tiny_gemma3), batch_size=4, seed=7)
    with pytest.raises(Reached):
        trainer.train(route_data, tmp_path / "run", cfg, stop_after=1, progress=False)
    assert seen and seen[0] == [{"meta"}]


def test_eval_loss_hands_the_model_inputs_on_its_device(tiny_gemma3, route_data):
    from gemtune.base.families import family_of
    from gemtune.base.loader import load_base
    from gemtune.train.collate import encode_records

    model, tok = load_base(tiny_gemma3)
    examples, _ = encode_records([json.loads(l) for l in (route_data / "eval.jsonl").read_text().splitlines()],
                                 tok, family_of(model), 256)
    wrapper = SupervisedLM(model).to("meta")
    seen = record_input_devices(model)
    with pytest.raises(Reached):
        trainer.eval_loss(wrapper, examples, tok.pad_token_id, 4)
    assert seen == [{"meta"}]
    assert collate(examples[:2], tok.pad_token_id)["input_ids"].device.type == "cpu"  # built on the CPU


# ---------------------------------------------------------------- policy and plan

def test_policy_by_hardware():
    c = TrainConfig(base="x")
    cpu = resolve_policy(c, "cpu", native_bf16=False)
    assert (cpu.dtype, cpu.adapter_dtype, cpu.gradient_checkpointing, cpu.attn_implementation) == \
        ("float32", "float32", False, "sdpa")
    # a CPU with native bf16 still trains in fp32 by default (bf16 storage is the lean path's business)
    assert resolve_policy(c, "cpu", native_bf16=True).dtype == "float32"
    gpu = resolve_policy(c, "cuda", native_bf16=True)
    assert (gpu.device, gpu.dtype, gpu.adapter_dtype, gpu.gradient_checkpointing) == \
        ("cuda:0", "bfloat16", "float32", True)
    assert resolve_policy(c, "cuda", native_bf16=False).dtype == "float32"  # e.g. a T4: no bf16
    q = resolve_policy(TrainConfig(base="x", quant="4bit"), "cuda:1", native_bf16=True)
    assert (q.device, q.quant_storage, q.dtype) == ("cuda:1", "bfloat16", "bfloat16")
    explicit = TrainConfig(base="x", dtype="bfloat16", gradient_checkpointing=False)
    p = resolve_policy(explicit, "cpu", native_bf16=False)
    assert p.dtype == "bfloat16" and not p.gradient_checkpointing
    from gemtune.train.policy import emulated_bf16_warning

    assert "emulates" in emulated_bf16_warning(p) and emulated_bf16_warning(cpu) is None
    from gemtune.errors import UserError

    with pytest.raises(UserError, match="GPU only"):
        resolve_policy(TrainConfig(base="x", attn_implementation="flash_attention_2"), "cpu")


def test_plan_config_assumes_what_the_trainer_does_on_a_gpu(tiny_gemma3, tmp_path):
    """`gemtune plan --config` plans the run the config starts: the same dtype, checkpointing, batch, seq and
    rank the trainer resolves on a GPU."""
    from gemtune.train.config import load_train_config
    from gemtune.train.plan import plan, shape_from_config

    y = tmp_path / "gemtune.yaml"
    y.write_text(f"train:\n  base: {tiny_gemma3}\n  preset: structured\n  batch_size: 4\n  max_len: 512\n"
                 "  quant: 4bit\n")
    r = subprocess.run(GEMTUNE + ["plan", "--config", str(y), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    trainer_gpu = resolve_policy(load_train_config(y), "cuda", native_bf16=True)
    res = p["config"]["resolved"]
    assert res == trainer_gpu.record()
    assert (p["method"], p["seq_len"], p["batch"], p["rank"], p["gradient_checkpointing"]) == \
        ("qlora", 512, 4, 32, trainer_gpu.gradient_checkpointing)
    assert res["dtype"] == "bfloat16" and res["gradient_checkpointing"] is True
    want = plan(shape_from_config(tiny_gemma3), method="qlora", seq_len=512, batch=4, rank=32, mlp=True,
                grad_ckpt=True, act_bytes=2.0)
    assert p["total_gib"] == want["total_gib"]
    # a flag given as well overrides the config
    r = subprocess.run(GEMTUNE + ["plan", "--config", str(y), "--batch", "1", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["batch"] == 1


# ---------------------------------------------------------------- CLI: progress lines and the LR horizon

def test_progress_lines_reach_a_pipe_while_the_run_goes_on(tiny_gemma3, route_data, tmp_path):
    """stdout is a pipe: progress lines (step, loss, examples/s, eta) arrive while the run is held at a step."""
    gate = tmp_path / "gate"
    gate.mkdir()
    cmd = GEMTUNE + ["train", "--data", str(route_data), "--out", str(tmp_path / "run"), "--base", str(tiny_gemma3),
                     "--max-steps", "1000", "--save-every", "1000", "--log-every", "2", "--batch-size", "4"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe is block-buffered, as for users
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**env, "GEMTUNE_TEST_STEP_GATE": str(gate)})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in p.stdout], daemon=True).start()

    def next_progress() -> str:
        while True:
            ln = lines.get(timeout=300)  # generous: the run is held at a step, so a late line never arrives
            if ln.startswith("train: step"):
                return ln

    try:
        first = next_progress()  # the run now waits at step 1
        assert re.match(r"train: step 1/1000  loss \d+\.\d{4}  lr \S+  \d+\.\d\d examples/s  [\d,]+ tokens/s  "
                        r"eta \d+:\d\d:\d\d$", first.strip()), first
        assert p.poll() is None
        (gate / "step-1").touch()
        (gate / "step-2").touch()
        assert next_progress().startswith("train: step 2/1000")
        (gate / "step-3").touch()
        (gate / "step-4").touch()
        assert next_progress().startswith("train: step 4/1000")  # every 2 steps: no line for step 3
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def _run_cli(cli, base, data, out, *flags):
    """`gemtune train …` in-process through the real entry point (a subprocess costs ~8 s of imports)."""
    assert cli("train", "--data", data, "--out", out, "--base", base, "--batch-size", "4", "--lr", "1e-3", *flags) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "run.json").read_text()), [row["lr"] for row in rows]


def test_max_steps_sets_the_lr_horizon_and_stop_after_steps_does_not(tiny_gemma3, route_data, tmp_path, cli):
    run, lrs = _run_cli(cli, tiny_gemma3, route_data, tmp_path / "a", "--max-steps", "6")
    assert run["horizon"] == 6 and len(lrs) == 6
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cosine reaches zero at the horizon
    assert run["resolved"] == resolve_policy(TrainConfig(base=str(tiny_gemma3), batch_size=4, lr=1e-3,
                                                         max_steps=6), "cpu").record()
    assert run["resolved"]["dtype"] == "float32" and run["resolved"]["device"] == "cpu"
    side = json.loads((tmp_path / "a" / "adapter" / "gemtune.json").read_text())
    assert side["resolved"] == run["resolved"]
    run, early = _run_cli(cli, tiny_gemma3, route_data, tmp_path / "b", "--max-steps", "6", "--stop-after-steps", "3")
    assert run["horizon"] == 6 and run["stop_at"] == 3 and early == lrs[:3]
    # without --max-steps the horizon is one epoch: 32 examples / 4 = 8 steps
    run, _ = _run_cli(cli, tiny_gemma3, route_data, tmp_path / "c", "--stop-after-steps", "2")
    assert run["horizon"] == 8 and run["stop_at"] == 2


def test_python_api_max_steps_is_the_horizon_as_on_the_command_line(tiny_gemma3, route_data, tmp_path):
    """`train(..., max_steps=6)` means what `--max-steps 6` means: the LR horizon (replacing train.max_steps), the
    schedule ending at zero there; `stop_after` stops early on the same schedule."""
    from gemtune.train.trainer import train

    def run(out, **kw):
        cfg = TrainConfig(base=str(tiny_gemma3), batch_size=4, lr=1e-3, max_steps=20)
        train(route_data, out, cfg, progress=False, **kw)
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return json.loads((out / "run.json").read_text()), [row["lr"] for row in rows]

    whole, lrs = run(tmp_path / "a", max_steps=6)  # one epoch would be 8 steps, the config says 20
    assert whole["horizon"] == 6 and whole["stop_at"] == 6 and len(lrs) == 6
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    early, first = run(tmp_path / "b", max_steps=6, stop_after=3)
    assert early["horizon"] == 6 and early["stop_at"] == 3 and first == lrs[:3]
    with pytest.raises(UserError, match="max_steps 0: must be at least 1"):
        run(tmp_path / "c", max_steps=0)
