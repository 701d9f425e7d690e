"""FSDP2 over gloo with two CPU processes: train, checkpoint (gathered adapter, optimizer state keyed by
parameter name, every process's RNG), SIGKILL, resume, and end with the adapter of an uninterrupted run."""

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

from gemtune.train.checkpoints import STATE_FILE, complete_checkpoints

SCRIPT = """
import sys
from gemtune.train.config import TrainConfig
from gemtune.train.trainer import train
base, data, out, stop, resume = sys.argv[1:6]
cfg = TrainConfig(base=base, batch_size=2, lr=1e-3, seed=3, save_every=1)
train(data, out, cfg, stop_after=int(stop), resume=resume == "1", progress=False)
"""


def launch(script: Path, *args, gate: Path | None = None) -> subprocess.Popen:
    """`accelerate launch --use_fsdp --fsdp_version 2` with two processes; on a host without GPUs they join over
    gloo, and the trainer shards with FSDP2 itself (accelerate leaves CPU process groups unsharded)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if gate is not None:  # every rank waits after step n until gate/step-n exists
        env["GEMTUNE_TEST_STEP_GATE"] = str(gate)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: SIGKILL reaches every rank


def _ranks_of(out_dir: Path) -> list[int]:
    """Pids of the training processes writing `out_dir` (their command line names it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out_dir).encode() in args:
            pids.append(int(proc.name))
    return pids


def _kill_ranks_of(out_dir: Path) -> None:
    """SIGKILL every rank of the run writing `out_dir` (as a node failure would) and wait until none is left, so
    no orphan is still held at the gate when the resumed run starts, or after the test."""
    deadline = time.time() + 120
    while pids := _ranks_of(out_dir):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.time() < deadline, f"ranks {pids} of the killed run would not die"
        time.sleep(0.05)


def finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_kill_and_resume_give_the_straight_adapter(tiny_gemma3, route_data, tmp_path):
    script = tmp_path / "t.py"
    script.write_text(SCRIPT)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finish(launch(script, tiny_gemma3, route_data, straight, 6, 0))
    run = json.loads((straight / "run.json").read_text())
    assert run["processes"] == 2 and run["distributed"].startswith("fsdp2")

    # held at step 3 by the gate: checkpoints 1 and 2 are whole, step 3's is never written, whatever the speed
    gate = tmp_path / "gate"
    gate.mkdir()
    for s in (1, 2):
        (gate / f"step-{s}").touch()
    p = launch(script, tiny_gemma3, route_data, killed, 6, 0, gate=gate)
    deadline = time.time() + 600  # generous: the run waits at the gate, so only a broken run reaches it
    while len(complete_checkpoints(killed)) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it was held at step 3: " + p.stderr.read()[-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    _kill_ranks_of(killed)  # torchrun starts its workers in sessions of their own: the group kill misses them
    done = [s for s, _ in complete_checkpoints(killed)]
    assert done == [1, 2] and not (killed / "adapter").exists(), done
    finish(launch(script, tiny_gemma3, route_data, killed, 6, 1))
    assert _ranks_of(killed) == [] and _ranks_of(straight) == []  # no rank outlives its run (no orphan at the gate)

    a, b = load_file(str(straight / "adapter" / "adapter_model.safetensors")), \
        load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 32
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0  # it trained

    # what a checkpoint holds: whole (gathered) LoRA tensors, optimizer state by parameter name at full size,
    # both processes' RNG states
    state = torch.load(killed / "checkpoint-6" / STATE_FILE, weights_only=True)
    assert state["optimizer_keys"] == "fqn" and len(state["rng"]) == 2
    exp_avg = {k: v["exp_avg"] for k, v in state["optimizer"]["state"].items()}
    q_a = next(k for k in exp_avg if k.endswith("layers.0.self_attn.q_proj.lora_A.default.weight"))
    assert tuple(exp_avg[q_a].shape) == tuple(a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape)

    # the adapter loads unchanged into PEFT on the plain base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_gemma3)), str(straight / "adapter"))
    sd = pm.state_dict()
    for k, v in a.items():
        assert torch.equal(sd[k.replace(".weight", ".default.weight")], v)


HOOK_SCRIPT = """
import sys, time
from gemtune.train.config import TrainConfig
from gemtune.train.trainer import train
base, data, out, hold = sys.argv[1:5]
calls = []
def hook(ck, step):  # rank 0 only: an eval that outlasts the training group's collective timeout
    calls.append(step)
    time.sleep(float(hold))
    return {"accuracy": 1.0}
train(data, out, TrainConfig(base=base, batch_size=2, lr=1e-3, seed=3, save_every=2), stop_after=2,
      on_checkpoint=hook, progress=False)
print("hook calls", calls)
"""


@pytest.mark.slow
def test_other_processes_outwait_rank0_checkpoint_eval_past_the_collective_timeout(tiny_gemma3, route_data,
                                                                                    tmp_path):
    """Two DDP processes, a 5 s collective timeout, a checkpoint eval on rank 0 that takes 15 s: rank 1 waits on
    its own long-timeout group instead of failing the run."""
    script = tmp_path / "h.py"
    script.write_text(HOOK_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(tiny_gemma3), str(route_data), str(tmp_path / "run"), "15"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "GEMTUNE_DIST_TIMEOUT_S": "5"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("hook calls [2]") == 1 and r.stdout.count("hook calls []") == 1
    side = json.loads((tmp_path / "run" / "adapter" / "gemtune.json").read_text())
    assert side["step"] == 2
