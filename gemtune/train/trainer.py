"""The training loop: accelerate underneath (so `accelerate launch` with DDP/FSDP/DeepSpeed configs works),
deterministic on CPU, exact resume, atomic checkpoints, early stopping, a hook after every checkpoint.

Data order is a pure function of (seed, step): step s consumes the global example indices [s*G, (s+1)*G) of an
endless sequence of seeded epoch permutations, G = batch_size * grad_accum * processes. Rank r takes its slice of
each micro-batch. Nothing about the order needs saving, and N processes see exactly the examples one process
would, so their per-step losses agree.

The learning-rate horizon is the planned run: `max_steps` (`train.max_steps` in config, `--max-steps` on the
command line, as in HF Trainer), else `epochs` over the data. `--stop-after-steps` stops early without changing
it, so a run stopped at step 2 and resumed to step 4 ends with the same weights as a straight 4-step run.

`train` reads as its steps, torchtune-recipe style: `setup` (accelerator, policy, data, model) → `prepare`
(optimizer, schedule, accelerate) → `resume_from_checkpoint` or `start_fresh` → `train_loop` (`train_step`,
`log_step`, `save_checkpoint` and the eval hook) → `save_final`. Inputs meet the model on the model's device
(`SupervisedLM.forward` moves them), whatever device accelerate put it on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from gemtune.adapter import read_sidecar
from gemtune.base.families import family_of, linear_leaf_names, matched_modules, target_modules
from gemtune.base.provision import pull
from gemtune.errors import UserError
from gemtune.train.checkpoints import (STATE_FILE, STATE_FORMAT, complete_checkpoints, hardware_record,  # noqa: F401
                                       load_trainer_state, plain, prune, rng_state, save_adapter, set_rng_state,
                                       sidecar)
from gemtune.train.collate import Example, collate, encode_records, pack
from gemtune.train.config import TrainConfig
from gemtune.train.loss import SupervisedLM
from gemtune.train.policy import TrainPolicy, emulated_bf16_warning, resolve_policy
from gemtune.train.presets import get_preset
from gemtune.train.progress import make_progress
from gemtune.train.sharded import cpu_fsdp_requested, fully_shard_cpu, local_value
from gemtune.utils import atomic_write_json, iter_jsonl, sha256_file

CheckpointHook = Callable[[Path, int], Optional[dict]]
# how long the other processes wait for rank 0's checkpoint eval (a gloo barrier of its own, not the training
# group's collective timeout, which an eval of a few hundred cases on a 27B model would exceed)
EVAL_WAIT = timedelta(hours=float(os.environ.get("GEMTUNE_EVAL_WAIT_HOURS", "24")))


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)
    trainable: int = 0
    total_params: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    examples_per_s: float = 0.0
    tokens_per_s: float = 0.0


# ---------------------------------------------------------------- dataset

def read_dataset_dir(data_dir: Path, base_path: Path) -> tuple[list[dict], list[dict], dict]:
    """Read a `gemtune data build` directory and check it was built for this base's tokenizer."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError("dataset directory not found", file=str(data_dir))
    train_f = data_dir / "train.jsonl"
    if not train_f.is_file():
        raise UserError("missing train.jsonl: is this a `gemtune data build` output directory?", file=str(data_dir))
    meta = {}
    if (data_dir / "dataset.json").is_file():
        meta = json.loads((data_dir / "dataset.json").read_text())
    tok_file = base_path / "tokenizer.json"
    built_for = meta.get("tokenizer_sha256")
    if built_for and tok_file.is_file() and sha256_file(tok_file) != built_for:
        raise UserError(
            f"dataset was built for another tokenizer (tokenizer_sha256 {built_for[:12]}…, base {base_path} has "
            f"{sha256_file(tok_file)[:12]}…); rebuild it with `gemtune data build --base {base_path}`",
            file=str(data_dir / "dataset.json"), field="tokenizer_sha256")

    def load(f: Path) -> list[dict]:
        rows = []
        for i, rec in iter_jsonl(f):
            if not isinstance(rec.get("messages"), list):
                raise UserError("record has no messages list", file=str(f), line=i, field="messages")
            rows.append(rec)
        return rows

    train = load(train_f)
    evals = load(data_dir / "eval.jsonl") if (data_dir / "eval.jsonl").is_file() else []
    if not train:
        raise UserError("train.jsonl has no records", file=str(train_f))
    lock = data_dir / "eval.lock.json"
    meta["eval_lock_sha256"] = sha256_file(lock) if lock.is_file() else None
    return train, evals, meta


# ---------------------------------------------------------------- model

def build_lora_config(model, cfg: TrainConfig):
    from peft import LoraConfig

    preset = get_preset(cfg.preset)
    fam = family_of(model)
    modules = tuple(cfg.lora.target_modules) if cfg.lora.target_modules else preset.modules
    targets = target_modules(fam, modules)
    found = matched_modules(model, targets)
    if not found:
        raise UserError(
            f"preset {preset.name!r} targets {list(modules)} but the model has none of them; its linear layers are: "
            f"{', '.join(linear_leaf_names(model))}", field="lora.target_modules")
    missing = [m for m in modules if not any(n.split('.')[-1] == m for n in found)]
    if missing:
        raise UserError(f"target modules {missing} do not exist in this model; linear layers are: "
                        f"{', '.join(linear_leaf_names(model))}", field="lora.target_modules")
    return LoraConfig(
        r=cfg.lora.r or preset.r,
        lora_alpha=cfg.lora.alpha or preset.alpha,
        lora_dropout=preset.dropout if cfg.lora.dropout is None else cfg.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2  # two 4-bit weights per stored byte
        total += n
    return trainable, total


def quant_device(device: torch.device) -> str:
    """Where a 4-bit base must be loaded: bitsandbytes weights cannot be moved after quantisation, and accelerate
    refuses a 4-bit model that sits on another device than the process's (`device_map={"": this process's GPU}`)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def load_training_base(base_path: Path, policy: TrainPolicy, device: torch.device | None = None):
    """(model, tokenizer) as the policy says: dtype, attention kernel; for QLoRA NF4 with double quantisation,
    compute in the run's dtype and 4-bit storage FSDP can shard (bf16 containers on a GPU), loaded straight onto
    this process's device."""
    from gemtune.base.loader import load_base, load_tokenizer, resolve_dtype

    if not policy.quant:
        model, tok = load_base(base_path, dtype=policy.dtype)
        if getattr(model.config, "_attn_implementation", None) != policy.attn_implementation:
            model.set_attn_implementation(policy.attn_implementation)
        return model, tok
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("4-bit loading needs bitsandbytes: pip install 'gemtune[quant]'", field="quant") from None
    dtype = resolve_dtype(policy.dtype)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=getattr(torch, policy.quant_storage),
                           llm_int8_skip_modules=["lm_head", "embed_tokens", "vision_tower", "audio_tower"])
    where = quant_device(device if device is not None else torch.device(policy.device))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype, quantization_config=q,
                                                     device_map={"": where}, trust_remote_code=False,
                                                     attn_implementation=policy.attn_implementation)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from {base_path}: {e}", field="base") from None
    family_of(model)
    model.eval()
    return model, load_tokenizer(base_path)


def load_model_for_training(cfg: TrainConfig, base_path: Path, device: torch.device | None = None,
                            policy: TrainPolicy | None = None):
    """The PEFT model to train. The base is frozen in its dtype (bf16 on a GPU; embeddings and norms are not
    upcast, which `prepare_model_for_kbit_training` would do); PEFT keeps the LoRA weights in fp32."""
    from peft import get_peft_model

    policy = policy or resolve_policy(cfg, device if device is not None else torch.device("cpu"))
    model, tok = load_training_base(base_path, policy, device)
    for p in model.parameters():
        p.requires_grad_(False)
    if policy.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_cfg = build_lora_config(model, cfg)
    torch.manual_seed(cfg.seed)  # LoRA A init is identical across processes and runs
    model = get_peft_model(model, lora_cfg, autocast_adapter_dtype=True)
    model.config.use_cache = False
    return model, tok, lora_cfg


# ---------------------------------------------------------------- schedule / order

def example_indices(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Global example indices consumed by `step` (0-based): a window over seeded epoch permutations."""
    out, start = [], step * global_batch
    cache: dict[int, list[int]] = {}
    for g in range(start, start + global_batch):
        epoch, pos = divmod(g, n)
        if epoch not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(cache[epoch][pos])
    return out


def planned_steps(cfg: TrainConfig, n_train: int, global_batch: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_train / global_batch))


# ---------------------------------------------------------------- the recipe: setup → resume → loop → save

@dataclass
class Run:
    """What the steps of `train` share. Built by `setup`, completed by `plan_steps` and `prepare`."""

    cfg: TrainConfig
    acc: object
    run_dir: Path
    data_dir: Path
    say: Callable
    policy: TrainPolicy
    base_path: Path
    meta: dict
    model: object  # the PEFT model
    lora_cfg: object
    train_ex: list[Example]
    eval_ex: list[Example]
    pad_id: int
    trainable: int
    total: int
    log_with: Optional[str] = None
    t_start: float = field(default_factory=time.time)
    world: int = 1
    hardware: dict = field(default_factory=dict)
    budget: Optional[int] = None
    global_batch: int = 0
    horizon: int = 0
    stop_at: int = 0
    wrapper: object = None  # SupervisedLM around the model, as accelerate prepared it
    opt: object = None
    sched: object = None
    params: list = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    wait_group: object = None  # gloo group with a long timeout, for waiting on rank 0's checkpoint eval
    cpu_fsdp: bool = False  # FSDP2 applied by gemtune: accelerate does not shard CPU processes

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def metrics_f(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def peft_model(self):
        return self.acc.unwrap_model(self.wrapper).model

    @property
    def sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.cpu_fsdp or self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def train(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, *, stop_after: int | None = None,
          max_steps: int | None = None, resume: bool = False, on_checkpoint: CheckpointHook | None = None,
          console=None, progress: bool = True) -> TrainResult:
    """Train, checkpoint and save the adapter. `max_steps` is the LR schedule's horizon, as `--max-steps` on the
    command line and HF Trainer's max_steps: it replaces `cfg.max_steps` (without either, `cfg.epochs` over the
    data sets the horizon). `stop_after` stops at that step without moving the horizon (`--stop-after-steps`):
    resuming later finishes the same schedule."""
    if max_steps is not None:
        if max_steps < 1:
            raise UserError(f"max_steps {max_steps}: must be at least 1", field="max_steps")
        cfg = cfg.model_copy(update={"max_steps": max_steps})
    keep = getattr(on_checkpoint, "keep_tokenizer", None)
    r = setup(data_dir, run_dir, cfg, console, keep_tokenizer=keep if callable(keep) else None)
    plan_steps(r, stop_after=stop_after)
    prepare(r)
    step = resume_from_checkpoint(r) if resume else start_fresh(r)
    write_run_record(r)
    attach = getattr(on_checkpoint, "attach_training_model", None)
    if callable(attach) and not r.sharded:  # the eval reuses the weights in memory (a sharded model cannot)
        attach(r.peft_model, device=_model_device(r.peft_model), dtype=r.policy.dtype)
    result = train_loop(r, step, on_checkpoint, progress)
    save_final(r, result)
    r.acc.wait_for_everyone()
    if r.log_with:
        r.acc.end_training()
    result.seconds = time.time() - r.t_start
    return result


def make_accelerator(cfg: TrainConfig, run_dir: Path, log_with: Optional[str]):
    """accelerate's Accelerator on the configured device: `auto` lets accelerate choose (the GPU of this process
    when there is one), `cpu` forces the CPU, `cuda:N` pins a single-process run to GPU N."""
    from accelerate import Accelerator

    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {cfg.device}: no CUDA device on this host (use auto or cpu)", field="train.device")
        if ":" in cfg.device:
            torch.cuda.set_device(int(cfg.device.split(":")[1]))
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    handlers = []
    if os.environ.get("GEMTUNE_DIST_TIMEOUT_S"):  # the training group's collective timeout (NCCL/gloo)
        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=float(os.environ["GEMTUNE_DIST_TIMEOUT_S"]))))
    return Accelerator(cpu=cpu, log_with=log_with, project_dir=str(run_dir), kwargs_handlers=handlers)


def setup(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, console=None,
          keep_tokenizer: Optional[Callable] = None) -> Run:
    """Accelerator, seeds, the resolved policy, the dataset, the PEFT model (lean kernels on a CPU).
    `keep_tokenizer(tok, family, vocab_size=...)` is called once the examples are encoded, just before the
    tokenizer is freed (the checkpoint eval keeps its prompts and a decode table from it)."""
    t_start = time.time()
    log_with = None
    if cfg.report_to:
        mod = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}[cfg.report_to]
        try:
            __import__(mod)
        except ImportError:
            raise UserError(f"--report-to {cfg.report_to} needs the {mod} package installed", field="report_to") from None
        log_with = cfg.report_to
    acc = make_accelerator(cfg, Path(run_dir), log_with)
    say = (console.print if console is not None else print) if acc.is_main_process else (lambda *a, **k: None)
    policy = resolve_policy(cfg, acc.device)
    if (w := emulated_bf16_warning(policy)) is not None:
        say(f"[yellow]warning:[/yellow] {w}")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    base_path = pull(cfg.base)
    train_recs, eval_recs, meta = read_dataset_dir(Path(data_dir), base_path)
    meta["_dir"] = str(Path(data_dir).resolve())
    model, tok, lora_cfg = load_model_for_training(cfg, base_path, acc.device, policy)
    trainable, total = count_params(model)
    pct = 100 * trainable / total
    say(f"LoRA preset {cfg.preset}: r={lora_cfg.r} alpha={lora_cfg.lora_alpha} dropout={lora_cfg.lora_dropout} "
        f"targets={lora_cfg.target_modules} — trainable {trainable:,} of {total:,} ({pct:.3f}%); "
        f"{policy.device} {policy.dtype}, gradient checkpointing {'on' if policy.gradient_checkpointing else 'off'}")
    if cfg.preset == "default" and not (0.5 <= pct <= 1.5):
        say(f"[yellow]warning:[/yellow] {pct:.3f}% trainable is outside the 0.5–1.5% the default preset aims for")

    fam = family_of(model)
    train_ex, skipped = encode_records(train_recs, tok, fam, cfg.max_len)
    eval_ex, _ = encode_records(eval_recs, tok, fam, cfg.max_len)
    if skipped:
        say(f"[yellow]warning:[/yellow] {skipped} training example(s) skipped: answer longer than max_len={cfg.max_len}")
    if not train_ex:
        raise UserError(f"no training example fits max_len={cfg.max_len}", file=str(Path(data_dir) / "train.jsonl"))
    pad_id = tok.pad_token_id
    if keep_tokenizer is not None:  # the checkpoint eval takes its prompts and decode table now (evals/checkpoint.py)
        keep_tokenizer(tok, fam, vocab_size=model.get_output_embeddings().weight.shape[0])
    del tok  # the 262k-entry tokenizer is ~300 MB we no longer need: give it back before activations need room
    _release_memory()
    r = Run(cfg=cfg, acc=acc, run_dir=Path(run_dir), data_dir=Path(data_dir), say=say, policy=policy,
            base_path=base_path, meta=meta, model=model, lora_cfg=lora_cfg, train_ex=train_ex, eval_ex=eval_ex,
            pad_id=pad_id, trainable=trainable, total=total, log_with=log_with, t_start=t_start,
            cpu_fsdp=cpu_fsdp_requested(acc))
    lean = _install_lean(r)
    if lean is not None:
        say(f"lean training: {lean.describe()}")
    return r


def plan_steps(r: Run, *, stop_after: Optional[int] = None) -> None:
    """Global batch, the LR horizon and the step the loop stops at."""
    r.world = r.acc.num_processes
    r.hardware = hardware_record(r.acc.device, r.world)
    r.budget = micro_batch_budget(r.cfg, r.acc.device)
    r.global_batch = r.cfg.batch_size * r.cfg.grad_accum * r.world
    r.horizon = planned_steps(r.cfg, len(r.train_ex), r.global_batch)
    r.stop_at = min(stop_after, r.horizon) if stop_after else r.horizon


def prepare(r: Run) -> None:
    """Optimizer over the LoRA parameters (fp32), the LR schedule over the horizon, accelerate's wrapping."""
    from transformers import get_scheduler

    cfg = r.cfg
    wrapper = SupervisedLM(r.model, chunk=cfg.loss_chunk)
    # the scheduler stays unwrapped: accelerate's wrapper steps it once per process, which would make the
    # learning rate depend on the number of processes
    if r.sharded:  # FSDP/DeepSpeed replace the parameters: build the optimizer over the prepared model's
        wrapper = fully_shard_cpu(wrapper, r.world) if r.cpu_fsdp else r.acc.prepare(wrapper)
        r.params = [p for p in wrapper.parameters() if p.requires_grad]
        r.opt = r.acc.prepare(_adamw(r.params, cfg))
    else:
        r.params = [p for p in r.model.parameters() if p.requires_grad]
        wrapper, r.opt = r.acc.prepare(wrapper, _adamw(r.params, cfg))
    r.wrapper = wrapper
    r.sched = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup", r.opt,
                            num_warmup_steps=math.ceil(cfg.warmup_ratio * r.horizon), num_training_steps=r.horizon)
    if r.world > 1 and torch.distributed.is_initialized():
        r.wait_group = torch.distributed.new_group(backend="gloo", timeout=EVAL_WAIT)


def _adamw(params, cfg: TrainConfig):
    return torch.optim.AdamW(params, lr=cfg.lr or get_preset(cfg.preset).lr, weight_decay=cfg.weight_decay)


def start_fresh(r: Run) -> int:
    r.run_dir.mkdir(parents=True, exist_ok=True)
    if r.main and r.metrics_f.exists():
        r.metrics_f.unlink()
    return 0


def resume_from_checkpoint(r: Run) -> int:
    """Adapter weights, optimizer, scheduler, this process's RNG and the metrics history of the last complete
    checkpoint; returns its step."""
    ckpts = complete_checkpoints(r.run_dir)
    if not ckpts:
        raise UserError("--resume: no complete checkpoint found", file=str(r.run_dir))
    step, ck = ckpts[-1]
    state = load_trainer_state(ck / STATE_FILE)
    from gemtune.train.sharded import load_training_state

    load_training_state(r, ck, state)
    rngs = state["rng"]
    set_rng_state(rngs[r.acc.process_index] if r.acc.process_index < len(rngs) else rngs[0])
    r.history = [h for h in state.get("history", []) if h["step"] <= step]
    if r.main:
        r.metrics_f.write_text("".join(json.dumps(h) + "\n" for h in r.history))
    r.say(f"resumed from {ck.name} (step {step})")
    return step


def write_run_record(r: Run) -> None:
    if r.main:
        atomic_write_json(r.run_dir / "run.json", {
            "data": str(r.data_dir.resolve()), "config": r.cfg.model_dump(), "horizon": r.horizon,
            "stop_at": r.stop_at, "processes": r.world, "hardware": r.hardware, "resolved": r.policy.record(),
            "distributed": "fsdp2 (gemtune, cpu)" if r.cpu_fsdp else str(r.acc.distributed_type.value).lower()})
    if r.log_with:
        r.acc.init_trackers("gemtune", config=r.cfg.model_dump())


@dataclass
class _Meter:
    """Tokens and examples done since the loop started (this session), for throughput and ETA."""

    world: int
    t0: float = field(default_factory=time.time)
    tokens: int = 0
    examples: int = 0

    def rates(self) -> tuple[float, float]:
        dt = max(time.time() - self.t0, 1e-9)
        return self.examples * self.world / dt, self.tokens * self.world / dt


def train_loop(r: Run, step: int, on_checkpoint: CheckpointHook | None, progress: bool) -> TrainResult:
    cfg = r.cfg
    result = TrainResult(r.run_dir, r.run_dir / "adapter", step, trainable=r.trainable, total_params=r.total)
    best_eval, bad_evals = math.inf, 0
    meter = _Meter(r.world)
    bar = make_progress(r.main and progress, r.stop_at, step, log_every=cfg.log_every)
    r.model.train()
    while step < r.stop_at:
        loss, grad_norm = train_step(r, step, meter)
        step += 1
        rec = log_step(r, step, loss, grad_norm, meter, result, bar)
        _test_gate(step)
        stop_early = False
        if "eval_loss" in rec and cfg.early_stopping_patience:
            if rec["eval_loss"] < best_eval - 1e-6:
                best_eval, bad_evals = rec["eval_loss"], 0
            else:
                bad_evals += 1
                stop_early = bad_evals >= cfg.early_stopping_patience
        due = (cfg.save_every and step % cfg.save_every == 0) or (cfg.eval_every and step % cfg.eval_every == 0)
        if due or step == r.stop_at or stop_early:
            save_checkpoint(r, step, on_checkpoint)
        if stop_early:
            r.say(f"early stopping at step {step}: eval loss did not improve for {cfg.early_stopping_patience} "
                  "evaluations")
            result.stopped_early = True
            break
    if bar:
        bar.close()
    result.steps = step
    result.examples_per_s, result.tokens_per_s = meter.rates()  # the loop only: not the final eval
    return result


def _test_gate(step: int) -> None:
    """Tests only: with GEMTUNE_TEST_STEP_GATE=DIR, wait after logging step n until DIR/step-n exists, so a test
    can hold a run at a step for as long as it needs, whatever the machine's speed."""
    gate = os.environ.get("GEMTUNE_TEST_STEP_GATE")
    if gate:
        while not (Path(gate) / f"step-{step}").exists():
            time.sleep(0.01)


def _my_micro_batches(r: Run, idx: list[int]) -> list[list[Example]]:
    """This process's share of each micro-batch of the step, cut to the token budget."""
    cfg, rank, bs = r.cfg, r.acc.process_index, r.cfg.batch_size
    micro = [idx[m * bs * r.world:(m + 1) * bs * r.world] for m in range(cfg.grad_accum)]
    mine = [[r.train_ex[i] for i in mb[rank * bs:(rank + 1) * bs]] for mb in micro]
    if r.budget:
        split = split_packed if cfg.packing else split_by_tokens
        mine = [piece for mb in mine for piece in split(mb, r.budget)]
    return mine


def train_step(r: Run, step: int, meter: _Meter) -> tuple[float, Optional[float]]:
    """One optimizer step (0-based `step`): forward/backward over this process's micro-batches, clip, step.
    Returns the step's mean token loss over every process and the gradient norm before clipping."""
    cfg, acc = r.cfg, r.acc
    idx = example_indices(step, r.global_batch, len(r.train_ex), cfg.seed)
    mine = _my_micro_batches(r, idx)
    n_global = sum(r.train_ex[i].n_supervised for i in idx)
    loss_sum_local = 0.0
    for mb in mine:
        batch = pack(mb, r.pad_id, cfg.max_len) if cfg.packing else collate(mb, r.pad_id)
        sync = mb is mine[-1] or r.world == 1
        with contextlib.nullcontext() if sync else acc.no_sync(r.wrapper):
            loss_sum, _ = r.wrapper(batch["input_ids"], batch["labels"], batch["position_ids"])
            # DDP averages gradients over processes; scale so the result is sum(token losses) / global count
            acc.backward(loss_sum * r.world / n_global)
        loss_sum_local += float(loss_sum.detach())
        meter.tokens += sum(len(e.input_ids) for e in mb)
        meter.examples += len(mb)
    grad_norm = None
    if cfg.max_grad_norm:  # the norm before clipping, as TRL/Axolotl log it
        grad_norm = local_value(acc.clip_grad_norm_(r.params, cfg.max_grad_norm))
    r.opt.step()
    r.sched.step()
    r.opt.zero_grad(set_to_none=True)
    total = acc.reduce(torch.tensor(loss_sum_local, dtype=torch.float64, device=acc.device), "sum")
    return float(total) / n_global, grad_norm


def log_step(r: Run, step: int, loss: float, grad_norm: Optional[float], meter: _Meter, result: TrainResult,
             bar) -> dict:
    """The step's record: metrics.jsonl, the tracker, the progress bar or line; eval loss when due."""
    ex_s, tok_s = meter.rates()
    rec = {"step": step, "loss": round(loss, 6), "lr": r.sched.get_last_lr()[0], "tokens_per_s": round(tok_s, 1),
           "examples_per_s": round(ex_s, 3), "time": round(time.time() - r.t_start, 2)}
    if grad_norm is not None:
        rec["grad_norm"] = round(grad_norm, 6)
    result.losses.append(loss)
    if r.cfg.eval_loss_every and r.eval_ex and step % r.cfg.eval_loss_every == 0:
        rec["eval_loss"] = eval_loss(r.acc.unwrap_model(r.wrapper), r.eval_ex, r.pad_id, r.cfg.batch_size)
        result.eval_losses[step] = rec["eval_loss"]
        r.model.train()
    r.history.append(rec)
    if r.main:
        with open(r.metrics_f, "a") as f:
            f.write(json.dumps(rec) + "\n")
    if r.log_with:
        r.acc.log({k: v for k, v in rec.items() if k != "step"}, step=step)
    if bar:
        bar.update(step, loss=loss, examples_per_s=ex_s, tokens_per_s=tok_s, lr=rec["lr"],
                   eval_loss=rec.get("eval_loss"))
    return rec


def save_checkpoint(r: Run, step: int, on_checkpoint: CheckpointHook | None) -> None:
    """`checkpoint-{step}`: adapter, gemtune.json, optimizer/scheduler/RNG state (gathered from every process),
    written atomically; then the eval hook on rank 0 while the others wait for it."""
    from gemtune.train.sharded import write_checkpoint

    ck = write_checkpoint(r, step, extra={"hardware": r.hardware, "resolved": r.policy.record()})
    if on_checkpoint is not None:
        if r.main:
            summary = on_checkpoint(ck, step)
            if summary is not None:
                r.history[-1]["eval"] = summary if isinstance(summary, dict) else str(summary)
            r.model.train()
        _wait_for_rank0(r)
    r.acc.wait_for_everyone()


def _wait_for_rank0(r: Run) -> None:
    """Hold the other processes while rank 0 evaluates, on a gloo group whose timeout outlasts any eval (the
    training group's timeout, 10-30 min, would kill a long eval's run)."""
    if r.wait_group is not None:
        torch.distributed.barrier(group=r.wait_group)


def save_final(r: Run, result: TrainResult) -> None:
    """The adapter (with the last checkpoint's eval verdict), the loss plot, the final eval loss."""
    from gemtune.train.sharded import gather_adapter_state

    final_eval = eval_loss(r.acc.unwrap_model(r.wrapper), r.eval_ex, r.pad_id, r.cfg.batch_size) \
        if r.eval_ex and (r.main or r.sharded) else None  # a sharded forward needs every process
    adapter_state = gather_adapter_state(r) if r.sharded else None
    if r.main:
        side = sidecar(r.cfg, r.base_path, r.meta, r.lora_cfg, step=result.steps, trainable=r.trainable,
                       total=r.total, extra={"hardware": r.hardware, "resolved": r.policy.record(),
                                             "final_train_loss": result.losses[-1] if result.losses else None,
                                             "final_eval_loss": final_eval})
        ck = r.run_dir / f"checkpoint-{result.steps}"
        prev = read_sidecar(ck) if ck.is_dir() else {}  # carry the eval hook's verdict onto the final adapter
        side.update({k: prev[k] for k in ("eval", "shippable") if k in prev})
        save_adapter(r.peft_model, result.adapter_dir, side, state_dict=adapter_state)
        _plot_loss(r.run_dir)
    if final_eval is not None:
        result.eval_losses[result.steps] = final_eval


def _model_device(model) -> torch.device:
    """Where the model's inputs must be: the device of its input embeddings (accelerate, a device_map or FSDP
    put it there)."""
    from gemtune.train.loss import _causal_lm

    emb = _causal_lm(model).get_input_embeddings()
    return emb.weight.device


@torch.no_grad()
def eval_loss(wrapper, examples: list[Example], pad_id: int, batch_size: int) -> float:
    """Mean token loss on assistant tokens. Takes the unwrapped module: a DDP forward on one rank would wait
    forever for the others."""
    wrapper.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id)
        s, c = wrapper(b["input_ids"], b["labels"], b["position_ids"])
        total += float(s)
        n += c
    return total / max(n, 1)


def split_by_tokens(examples: list[Example], budget: int) -> list[list[Example]]:
    """Sort by length and cut into micro-batches whose padded size (rows x longest) stays within `budget` tokens.
    Sorting first also removes most padding; the step's loss is a sum over tokens, so order does not matter."""
    out, cur = [], []
    for e in sorted(examples, key=lambda e: len(e.input_ids)):
        if cur and (len(cur) + 1) * len(e.input_ids) > budget:
            out.append(cur)
            cur = []
        cur.append(e)
    if cur:
        out.append(cur)
    return out


def micro_batch_budget(cfg: TrainConfig, device: torch.device) -> Optional[int]:
    """Tokens per micro-batch: `micro_batch_tokens`, where `auto` is 1024 on a CPU (activation memory is the
    limit there and small GEMMs cost little) and no split on an accelerator (size the batch with `gemtune plan`)."""
    if cfg.micro_batch_tokens == "auto":
        return 1024 if device.type == "cpu" else None
    return cfg.micro_batch_tokens


def split_packed(examples: list[Example], budget: int) -> list[list[Example]]:
    """Cut a batch that will be packed into pieces of at most `budget` tokens (first-fit by decreasing length, so
    the pieces are few and full); an example longer than the budget is a piece of its own. A batch within budget
    stays one piece, in its order."""
    if sum(len(e.input_ids) for e in examples) <= budget:
        return [examples] if examples else []
    bins: list[list[Example]] = []
    used: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(e.input_ids)
        i = next((i for i, u in enumerate(used) if u + n <= budget), None)
        if i is None:
            bins.append([e])
            used.append(n)
        else:
            bins[i].append(e)
            used[i] += n
    return bins


def _install_lean(r: Run):
    """Memory-lean kernels and bf16 storage of the frozen base (see gemtune.train.lean), where they apply: an
    fp32, unquantised, unsharded run (the CPU default)."""
    from gemtune.train.lean import install

    cfg = r.cfg
    if not cfg.lean or cfg.quant or r.policy.dtype != "float32" or r.sharded:
        if cfg.frozen_storage == "bfloat16" and (cfg.quant or r.sharded):
            raise UserError("frozen_storage: bfloat16 needs an unquantised, unsharded base", field="frozen_storage")
        return None
    bf16 = cfg.frozen_storage in ("auto", "bfloat16")
    rep = install(r.model, bf16_storage=bf16)
    _release_memory()
    return rep


def _release_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _plot_loss(run_dir: Path) -> None:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")
