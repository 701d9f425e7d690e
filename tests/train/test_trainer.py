"""Trainer: outputs, exact resume (also after SIGKILL), QLoRA, atomic checkpoints, bad input, early stopping."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemtune.errors import UserError
from gemtune.train.config import TrainConfig
from gemtune.train.trainer import complete_checkpoints, train

GEMTUNE = [sys.executable, "-m", "gemtune.cli"]


def cfg(base, **kw):
    d = dict(base=str(base), batch_size=4, lr=1e-3, seed=7)
    d.update(kw)
    return TrainConfig(**d)


def weights(d: Path) -> dict:
    return load_file(str(d / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_cli_train_writes_adapter_and_checkpoints(tiny_gemma3, route_data, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(GEMTUNE + ["train", "--data", str(route_data), "--out", str(run), "--base", str(tiny_gemma3),
                                  "--max-steps", "4", "--save-every", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ac = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (ac["r"], ac["lora_alpha"], ac["lora_dropout"]) == (16, 32, 0.05)
    assert sorted(ac["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert ac["modules_to_save"] is None and ac["bias"] == "none" and not ac["use_dora"]
    assert not ac["rank_pattern"] and not ac["alpha_pattern"]
    side = json.loads((run / "adapter" / "gemtune.json").read_text())
    assert side["base_model"] == str(tiny_gemma3) and side["step"] == 4
    assert side["dataset"]["eval_lock_sha256"] and len(side["base_revision_sha256"]) == 64
    assert [s for s, _ in complete_checkpoints(run)] == [2, 4]
    assert (run / "checkpoint-2" / "adapter_model.safetensors").is_file()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert (run / "loss.png").stat().st_size > 1000
    # the adapter loads with PEFT and changes the output (B is no longer zero)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3))
    ids = torch.tensor([[2, 105, 400, 401]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        pm = PeftModel.from_pretrained(base, str(run / "adapter"))
        after = pm(input_ids=ids).logits
    assert (before - after).abs().max() > 1e-6


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_resume_gives_same_weights_as_straight_run(family, request, route_data, tmp_path):
    base = request.getfixturevalue(f"tiny_{family}")
    straight = train(route_data, tmp_path / "a", cfg(base, max_steps=None), stop_after=4, progress=False)
    train(route_data, tmp_path / "b", cfg(base, save_every=2), stop_after=2, progress=False)
    resumed = train(route_data, tmp_path / "b", cfg(base, save_every=2), stop_after=4, resume=True, progress=False)
    assert resumed.steps == 4
    assert max_diff(weights(straight.adapter_dir), weights(resumed.adapter_dir)) < 1e-5
    # and a differently seeded run really is different (the comparison can fail)
    other = train(route_data, tmp_path / "c", cfg(base, seed=8), stop_after=4, progress=False)
    assert max_diff(weights(straight.adapter_dir), weights(other.adapter_dir)) > 1e-4
    # metrics of the resumed run are continuous and match the straight run's losses
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [round(r["loss"], 4) for r in rows] == [round(x, 4) for x in straight.losses]


def test_sigkill_mid_run_then_resume(tiny_gemma3, route_data, tmp_path):
    straight = train(route_data, tmp_path / "a", cfg(tiny_gemma3), stop_after=8, progress=False)
    run = tmp_path / "killed"
    cmd = GEMTUNE + ["train", "--data", str(route_data), "--out", str(run), "--base", str(tiny_gemma3),
                     "--max-steps", "8", "--save-every", "1", "--batch-size", "4", "--lr", "1e-3", "--seed", "7"]
    # the run is held at step 4 (GEMTUNE_TEST_STEP_GATE): checkpoints 1-3 are whole, step 4's is never written,
    # and the kill lands there whatever the machine's speed
    gate = tmp_path / "gate"
    gate.mkdir()
    for s in (1, 2, 3):
        (gate / f"step-{s}").touch()
    env = {**os.environ, "GEMTUNE_TEST_STEP_GATE": str(gate)}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600  # generous: the run waits at the gate, so only a broken run reaches it
    while len(complete_checkpoints(run)) < 3 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it was held at step 4"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = [s for s, _ in complete_checkpoints(run)]
    assert done == [1, 2, 3] and not (run / "adapter").exists(), done
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert max_diff(weights(straight.adapter_dir), weights(run / "adapter")) < 1e-5


def test_checkpoint_write_failure_keeps_previous_checkpoint(tiny_gemma3, route_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(route_data, run, cfg(tiny_gemma3, save_every=2), stop_after=2, progress=False)
    before = weights(run / "checkpoint-2")
    import gemtune.train.trainer as tr

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("trainer_state.pt") and "checkpoint-4" in str(Path(f).parent.name) or ".checkpoint-4" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(tr.torch, "save", full_disk)
    with pytest.raises(OSError):
        train(route_data, run, cfg(tiny_gemma3, save_every=2), stop_after=4, resume=True, progress=False)
    assert [s for s, _ in complete_checkpoints(run)] == [2]
    assert not [p for p in run.iterdir() if "checkpoint-4" in p.name]
    assert max_diff(before, weights(run / "checkpoint-2")) == 0


def test_qlora_step_and_adapter_loads_on_unquantised_base(tiny_gemma3, route_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    res = train(route_data, tmp_path / "q", cfg(tiny_gemma3, quant="4bit"), stop_after=2, progress=False)
    assert len(res.losses) == 2 and all(l == l for l in res.losses)
    ac = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert ac["modules_to_save"] is None and ac["r"] == 16
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3))
    pm = PeftModel.from_pretrained(base, str(res.adapter_dir))
    kinds = {type(m).__name__ for m in pm.modules()}
    assert "Linear4bit" not in kinds
    w = weights(res.adapter_dir)
    assert any(float(v.abs().max()) > 0 for k, v in w.items() if "lora_B" in k)


def test_hook_called_per_checkpoint_and_early_stopping(tiny_gemma3, route_data, tmp_path):
    seen = []

    def hook(ck, step):
        seen.append((step, (ck / "adapter_model.safetensors").is_file()))
        return {"accuracy": 0.5}

    res = train(route_data, tmp_path / "h", cfg(tiny_gemma3, save_every=2), stop_after=6, on_checkpoint=hook,
                progress=False)
    assert seen == [(2, True), (4, True), (6, True)]
    # train always answers "aaaa", eval expects "zzzz": fitting train makes eval loss worse, patience 2 stops
    def rows(answer, n):
        return "".join(json.dumps({"id": f"{answer}{i}", "messages": [
            {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}]}) + "\n" for i in range(n))

    d = tmp_path / "conflict"
    d.mkdir()
    (d / "train.jsonl").write_text(rows("aaaa", 16))
    (d / "eval.jsonl").write_text(rows("zzzz", 4))
    res = train(d, tmp_path / "e", cfg(tiny_gemma3, lr=1e-2, eval_loss_every=1, early_stopping_patience=2,
                                      max_steps=40), progress=False)
    losses = [res.eval_losses[k] for k in sorted(res.eval_losses)]
    assert res.stopped_early and res.steps < 40, losses
    assert losses[-2] > min(losses[:-2]) - 1e-6
    assert (tmp_path / "e" / "adapter").is_dir()


def test_bad_inputs_exit_2(tiny_gemma3, route_data, tmp_path):
    def run(*args):
        return subprocess.run(GEMTUNE + ["train", "--data", str(route_data), "--out", str(tmp_path / "r"), *args],
                              capture_output=True, text=True)

    y = tmp_path / "g.yaml"
    y.write_text(f"train:\n  base: {tiny_gemma3}\n  batch_size: 0\n")
    r = run("--config", str(y))
    assert r.returncode == 2 and "train.batch_size" in r.stderr and "Traceback" not in r.stderr
    y.write_text(f"train:\n  base: {tiny_gemma3}\n  lora:\n    target_modules: [w_qkv]\n")
    r = run("--config", str(y))
    assert r.returncode == 2 and "q_proj" in r.stderr and "w_qkv" in r.stderr  # lists the modules that do exist
    y.write_text(f"train:\n  base: {tiny_gemma3}\n  lora:\n    r: 12\n")
    r = run("--config", str(y))
    assert r.returncode == 2 and "train.lora.r" in r.stderr
    (route_data / "dataset.json").write_text(json.dumps({"tokenizer_sha256": "0" * 64}))
    r = run("--base", str(tiny_gemma3))
    assert r.returncode == 2 and "another tokenizer" in r.stderr
    (route_data / "dataset.json").unlink()
    (route_data / "train.jsonl").unlink()
    r = run("--base", str(tiny_gemma3))
    assert r.returncode == 2 and "train.jsonl" in r.stderr
    with pytest.raises(UserError):
        TrainConfig(base="x", preset="nope") and train(route_data, tmp_path / "z", TrainConfig(base=str(tiny_gemma3), preset="nope"))


def test_split_packed_keeps_every_example_within_budget():
    from gemtune.train.collate import Example
    from gemtune.train.trainer import split_packed

    exs = [Example(f"e{n}", list(range(n)), list(range(n))) for n in (70, 10, 40, 120, 30, 60, 5)]
    assert split_packed(exs[:3], 200) == [exs[:3]]  # within budget: one piece, order kept
    pieces = split_packed(exs, 100)
    assert sorted(id(e) for p in pieces for e in p) == sorted(id(e) for e in exs)
    sizes = [sum(len(e.input_ids) for e in p) for p in pieces]
    assert all(s <= 100 for s, p in zip(sizes, pieces) if len(p) > 1)
    assert [len(e.input_ids) for e in pieces[0]] == [120]  # longer than the budget: alone
    assert len(pieces) == 4  # first-fit decreasing: 120 | 70+30 | 60+40 | 10+5


@pytest.mark.parametrize("packing", [True, False])
def test_micro_batch_token_budget_does_not_change_the_math(tiny_gemma3, route_data, tmp_path, packing, monkeypatch):
    """Splitting a batch into token-bounded micro-batches sums the same token losses: same weights, same losses."""
    import gemtune.train.trainer as trainer

    seen = []
    for name in ("pack", "collate"):
        real = getattr(trainer, name)

        def counted(mb, *a, _real=real, **k):
            out = _real(mb, *a, **k)
            seen.append((len(mb), out["input_ids"].numel()))
            return out

        monkeypatch.setattr(trainer, name, counted)
    kw = dict(packing=packing, lora={"dropout": 0.0})
    whole = train(route_data, tmp_path / "whole", cfg(tiny_gemma3, micro_batch_tokens=None, **kw), stop_after=3,
                  progress=False)
    steps, final_eval = seen[:-2], seen[-2:]  # the final eval loss: 8 eval examples in batches of 4, never split
    assert len(steps) == 3 and all(n == 4 for n, _ in steps)
    seen.clear()
    split = train(route_data, tmp_path / "split", cfg(tiny_gemma3, micro_batch_tokens=96, **kw), stop_after=3,
                  progress=False)
    steps = seen[:-2]
    assert seen[-2:] == final_eval and len(steps) > 3 and sum(n for n, _ in steps) == 12
    assert all(tokens <= 96 for n, tokens in steps if n > 1)  # the budget holds wherever it can
    # the same summed loss and the same gradient at every step (its norm, before clipping, is logged); Adam's
    # sign-like first updates amplify float-order noise in near-zero gradients, so the weights get a looser bound
    norms = [[json.loads(l)["grad_norm"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
             for d in ("whole", "split")]
    assert all(abs(a - b) <= 1e-5 * max(a, 1e-3) for a, b in zip(*norms)) and min(norms[0]) > 0
    assert [round(x, 5) for x in whole.losses] == [round(x, 5) for x in split.losses]
    assert max_diff(weights(whole.adapter_dir), weights(split.adapter_dir)) < 1e-3


def test_micro_batch_budget_auto_and_validation():
    from gemtune.train.trainer import micro_batch_budget

    base = dict(base="x")
    assert micro_batch_budget(TrainConfig(**base), torch.device("cpu")) == 1024
    assert micro_batch_budget(TrainConfig(**base), torch.device("cuda")) is None  # a GPU run is sized by plan
    assert micro_batch_budget(TrainConfig(**base, micro_batch_tokens=512), torch.device("cuda")) == 512
    assert micro_batch_budget(TrainConfig(**base, micro_batch_tokens=None), torch.device("cpu")) is None
    with pytest.raises(Exception, match="at least 16 tokens"):
        TrainConfig(**base, micro_batch_tokens=8)


def test_4bit_base_is_loaded_on_the_training_device(monkeypatch):
    """accelerate refuses a 4-bit model on another device than the process's, and bnb weights cannot move after
    quantisation: QLoRA must load straight onto this process's device (a GPU's index included). On a bf16 GPU the
    4-bit weights are stored in bf16 containers (FSDP can shard them), computing in bf16 with double quant."""
    pytest.importorskip("bitsandbytes")
    import transformers

    import gemtune.base.loader as loader
    from gemtune.train.policy import resolve_policy
    from gemtune.train.trainer import load_model_for_training, quant_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert quant_device(torch.device("cuda")) == "cuda:1" and quant_device(torch.device("cuda", 3)) == "cuda:3"
    assert quant_device(torch.device("cpu")) == "cpu"
    seen = []

    class Stop(Exception):
        pass

    def fake_load(path, **kw):
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(loader, "load_base", fake_load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_load)
    for quant, device, want, storage in (("4bit", torch.device("cuda"), "cuda:1", torch.bfloat16),
                                         ("4bit", torch.device("cpu"), "cpu", torch.uint8),
                                         (None, torch.device("cuda"), None, None)):
        c = cfg("x", quant=quant)
        with pytest.raises(Stop):
            load_model_for_training(c, Path("x"), device, resolve_policy(c, device, native_bf16=True))
        kw = seen[-1]
        if quant is None:
            assert kw == {"dtype": "bfloat16"}  # a GPU's auto dtype
            continue
        q = kw["quantization_config"]
        assert kw["device_map"] == {"": want} and q.load_in_4bit and q.bnb_4bit_quant_type == "nf4"
        assert q.bnb_4bit_use_double_quant and q.bnb_4bit_quant_storage == storage
        assert q.bnb_4bit_compute_dtype == (torch.bfloat16 if device.type == "cuda" else torch.float32)
        assert kw["attn_implementation"] == "sdpa"


class _Payload:
    """Unpickling this creates `path` (by calling open(path, "w")): proof that a pickle ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_never_unpickles_code_and_refuses_old_pickled_states(tiny_gemma3, route_data, tmp_path):
    import numpy as np

    from gemtune.train.trainer import STATE_FILE, STATE_FORMAT

    run = tmp_path / "run"
    train(route_data, run, cfg(tiny_gemma3, save_every=2), stop_after=2, progress=False)
    state_file = run / "checkpoint-2" / STATE_FILE
    state = torch.load(state_file, weights_only=True)  # what the trainer writes loads without any pickle
    assert state["format"] == STATE_FORMAT and state["step"] == 2
    assert isinstance(state["rng"][0]["numpy"]["key"], torch.Tensor)
    assert isinstance(state["rng"][0]["python"]["internal"], list)
    marker = tmp_path / "pwned"
    torch.save({**state, "optimizer": _Payload(marker)}, state_file)
    with pytest.raises(UserError, match="refused to unpickle it") as e:
        train(route_data, run, cfg(tiny_gemma3, save_every=2), stop_after=4, resume=True, progress=False)
    assert str(state_file) in str(e.value) and "io.open" in str(e.value)
    assert not marker.exists()
    # a state pickled the old way (numpy RNG state as an ndarray): refused with a clear message, not unpickled
    old = {k: v for k, v in state.items() if k != "format"}
    old["rng"] = [{"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
                   "numpy": np.random.get_state()}]
    torch.save(old, state_file)
    with pytest.raises(UserError, match="earlier gemtune") as e:
        train(route_data, run, cfg(tiny_gemma3, save_every=2), stop_after=4, resume=True, progress=False)
    assert "numpy" in str(e.value) and not (run / "checkpoint-4").exists()
