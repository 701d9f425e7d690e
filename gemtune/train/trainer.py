"""The training loop: accelerate underneath (so `accelerate launch` with DDP/FSDP/DeepSpeed configs works),
deterministic on CPU, exact resume, atomic checkpoints, early stopping, a hook after every checkpoint.

Data order is a pure function of (seed, step): step s consumes the global example indices [s*G, (s+1)*G) of an
endless sequence of seeded epoch permutations, G = batch_size * grad_accum * processes. Rank r takes its slice of
each micro-batch. Nothing about the order needs saving, and N processes see exactly the examples one process
would, so their per-step losses agree.

The learning-rate horizon is the planned run (`train.max_steps` in config, else `epochs` over the data); the
`--max-steps` flag stops early without changing it, so a run stopped at step 2 and resumed to step 4 ends with the
same weights as a straight 4-step run.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from gemtune.base.families import family_of, linear_leaf_names, matched_modules, target_modules
from gemtune.base.provision import pull
from gemtune.errors import UserError
from gemtune.train.collate import Example, collate, encode_records, pack
from gemtune.train.config import TrainConfig
from gemtune.train.loss import SupervisedLM
from gemtune.train.presets import get_preset
from gemtune.utils import atomic_dir, atomic_write_json, iter_jsonl, sha256_file

CheckpointHook = Callable[[Path, int], Optional[dict]]
STATE_FILE = "trainer_state.pt"
# trainer_state.pt holds tensors and plain containers only, so resume loads it with torch.load(weights_only=True):
# nothing in a checkpoint directory can run code. Files without this format were pickled by older releases.
STATE_FORMAT = "gemtune.trainer_state/2"
_STEP_DELAY = float(os.environ.get("GEMTUNE_TEST_STEP_DELAY", "0") or 0)


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


def load_model_for_training(cfg: TrainConfig, base_path: Path, device: torch.device | None = None):
    from peft import get_peft_model

    from gemtune.base.loader import load_base

    kw = {"device": quant_device(device)} if cfg.quant and device is not None else {}
    model, tok = load_base(base_path, dtype=cfg.dtype, quant=cfg.quant, **kw)
    if cfg.quant:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_cfg = build_lora_config(model, cfg)
    torch.manual_seed(cfg.seed)  # LoRA A init is identical across processes and runs
    model = get_peft_model(model, lora_cfg)
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


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    """Every RNG the loop draws from, as tensors and plain lists (what `weights_only=True` accepts)."""
    py_version, py_internal, py_gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": {"version": int(py_version), "internal": [int(x) for x in py_internal],
                       "gauss_next": None if py_gauss is None else float(py_gauss)},
            "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    py = s["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    n = s["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def _plain(obj):
    """JSON-shaped copy (an eval hook's summary may hold numpy scalars, which weights_only=True would refuse)."""
    def default(x):
        return x.item() if hasattr(x, "item") else str(x)

    return json.loads(json.dumps(obj, default=default))


def load_trainer_state(path: Path) -> dict:
    """trainer_state.pt, unpickled with `weights_only=True`: tensors and plain containers load, anything that
    would construct an arbitrary object (and so could run code) is refused with an error naming the file."""
    import pickle

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = found.group(1) if found else ""
        raise UserError("--resume: refused to unpickle it: it holds objects other than tensors and plain containers "
                        f"({'it names ' + what[:200] + ', ' if what else ''}refused by torch.load weights_only=True), "
                        "so it was written by an earlier gemtune "
                        "(which pickled numpy RNG state) or not by gemtune at all; nothing in it was run. Start the "
                        "run again without --resume, or finish it with the release that wrote it.",
                        file=str(path)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"--resume: unreadable checkpoint state ({type(e).__name__}: {str(e)[:300]}); truncated or "
                        "corrupted: delete this checkpoint directory to resume from the one before",
                        file=str(path)) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"--resume: not a {STATE_FORMAT} checkpoint state (written by an older gemtune release?); "
                        "start the run again without --resume", file=str(path))
    return state


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(run_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file() and (p / "adapter_model.safetensors").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def sidecar(cfg: TrainConfig, base_path: Path, meta: dict, lora_cfg, *, step: int, trainable: int, total: int,
            extra: dict | None = None) -> dict:
    marker = base_path / "gemtune-complete.json"
    base_sha = sha256_file(marker) if marker.is_file() else sha256_file(base_path / "config.json")
    return {
        "format": "gemtune.adapter/1",
        "base_model": cfg.base,
        "base_path": str(base_path),
        "base_revision_sha256": base_sha,
        "dataset": {"eval_lock_sha256": meta.get("eval_lock_sha256"), "tokenizer_sha256": meta.get("tokenizer_sha256"),
                    "dir": meta.get("_dir")},
        "lora": {"r": lora_cfg.r, "alpha": lora_cfg.lora_alpha, "dropout": lora_cfg.lora_dropout,
                 "target_modules": sorted(lora_cfg.target_modules) if isinstance(lora_cfg.target_modules, (set, list))
                 else lora_cfg.target_modules},
        "preset": cfg.preset,
        "config": cfg.model_dump(),
        "step": step,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": round(100 * trainable / max(total, 1), 4),
        **(extra or {}),
    }


def hardware_record(device: torch.device, processes: int) -> dict:
    """What the run trained on, for the model card: device kind and name, CPU model, cores, threads, processes."""
    import platform

    hw: dict = {"device": device.type}
    if device.type == "cuda" and torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw.update({"cpu": cpu, "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count(), "torch_threads": torch.get_num_threads(), "processes": processes,
               "torch": torch.__version__.split("+")[0]})
    return hw


def save_adapter(peft_model, out: Path, side: dict) -> None:
    """PEFT-format adapter + gemtune.json, written atomically."""
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / "gemtune.json", side)


# ---------------------------------------------------------------- main loop

def train(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, *, max_steps: int | None = None,
          resume: bool = False, on_checkpoint: CheckpointHook | None = None, console=None,
          progress: bool = True) -> TrainResult:
    from accelerate import Accelerator
    from transformers import get_scheduler

    t_start = time.time()
    run_dir = Path(run_dir)
    log_with = None
    if cfg.report_to:
        mod = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}[cfg.report_to]
        try:
            __import__(mod)
        except ImportError:
            raise UserError(f"--report-to {cfg.report_to} needs the {mod} package installed", field="report_to") from None
        log_with = cfg.report_to
    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=log_with, project_dir=str(run_dir))
    main = acc.is_main_process
    say = (console.print if console is not None else print) if main else (lambda *a, **k: None)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    base_path = pull(cfg.base)
    train_recs, eval_recs, meta = read_dataset_dir(Path(data_dir), base_path)
    meta["_dir"] = str(Path(data_dir).resolve())
    model, tok, lora_cfg = load_model_for_training(cfg, base_path, acc.device)
    fam = family_of(model)
    trainable, total = count_params(model)
    pct = 100 * trainable / total
    say(f"LoRA preset {cfg.preset}: r={lora_cfg.r} alpha={lora_cfg.lora_alpha} dropout={lora_cfg.lora_dropout} "
        f"targets={lora_cfg.target_modules} — trainable {trainable:,} of {total:,} ({pct:.3f}%)")
    if cfg.preset == "default" and not (0.5 <= pct <= 1.5):
        say(f"[yellow]warning:[/yellow] {pct:.3f}% trainable is outside the 0.5–1.5% the default preset aims for")

    train_ex, skipped = encode_records(train_recs, tok, fam, cfg.max_len)
    eval_ex, _ = encode_records(eval_recs, tok, fam, cfg.max_len)
    if skipped:
        say(f"[yellow]warning:[/yellow] {skipped} training example(s) skipped: answer longer than max_len={cfg.max_len}")
    if not train_ex:
        raise UserError(f"no training example fits max_len={cfg.max_len}", file=str(Path(data_dir) / "train.jsonl"))
    pad_id = tok.pad_token_id
    del tok  # the 262k-entry tokenizer is ~300 MB we no longer need: give it back before activations need room
    _release_memory()
    lean = _install_lean(model, cfg, acc)
    if lean is not None:
        say(f"lean training: {lean.describe()}")

    world = acc.num_processes
    hardware = hardware_record(acc.device, world)
    budget = micro_batch_budget(cfg, acc.device)
    G = cfg.batch_size * cfg.grad_accum * world
    horizon = planned_steps(cfg, len(train_ex), G)
    stop_at = min(max_steps, horizon) if max_steps else horizon
    if max_steps and max_steps > horizon:
        horizon = stop_at = max_steps

    wrapper = SupervisedLM(model, chunk=cfg.loss_chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr or get_preset(cfg.preset).lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup", opt,
                          num_warmup_steps=math.ceil(cfg.warmup_ratio * horizon), num_training_steps=horizon)
    # the scheduler stays unwrapped: accelerate's wrapper steps it once per process, which would make the
    # learning rate depend on the number of processes
    wrapper, opt = acc.prepare(wrapper, opt)
    peft_model = acc.unwrap_model(wrapper).model

    step = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_f = run_dir / "metrics.jsonl"
    history: list[dict] = []
    if resume:
        ckpts = complete_checkpoints(run_dir)
        if not ckpts:
            raise UserError("--resume: no complete checkpoint found", file=str(run_dir))
        step, ck = ckpts[-1]
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft_model, load_file(str(ck / "adapter_model.safetensors")))
        state = load_trainer_state(ck / STATE_FILE)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng = state["rng"][acc.process_index] if acc.process_index < len(state["rng"]) else state["rng"][0]
        _set_rng_state(rng)
        history = [h for h in state.get("history", []) if h["step"] <= step]
        if main:
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        say(f"resumed from {ck.name} (step {step})")
    elif main and metrics_f.exists():
        metrics_f.unlink()

    if main:
        atomic_write_json(run_dir / "run.json", {"data": str(Path(data_dir).resolve()), "config": cfg.model_dump(),
                                                 "horizon": horizon, "processes": world,
                                                 "hardware": hardware})
    if log_with:
        acc.init_trackers("gemtune", config=cfg.model_dump())

    result = TrainResult(run_dir, run_dir / "adapter", step, trainable=trainable, total_params=total)
    best_eval, bad_evals = math.inf, 0
    tokens_done, examples_done, t_loop = 0, 0, time.time()
    pbar = _progress(main and progress, stop_at, step)

    def do_checkpoint(s: int) -> None:
        rng_all = acc.gather_for_metrics([_rng_state()], use_gather_object=True) if world > 1 else [_rng_state()]
        if main:
            side = sidecar(cfg, base_path, meta, lora_cfg, step=s, trainable=trainable, total=total,
                           extra={"hardware": hardware})
            ck = run_dir / f"checkpoint-{s}"
            with atomic_dir(ck) as tmp:
                peft_model.save_pretrained(tmp, safe_serialization=True)
                atomic_write_json(tmp / "gemtune.json", side)
                torch.save({"format": STATE_FORMAT, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "rng": rng_all, "step": s, "history": _plain(history)}, tmp / STATE_FILE)
            _prune(run_dir, cfg.save_total_limit)
            if on_checkpoint is not None:
                summary = on_checkpoint(ck, s)
                if summary is not None:
                    history[-1]["eval"] = summary if isinstance(summary, dict) else str(summary)
        acc.wait_for_everyone()

    model.train()
    while step < stop_at:
        idx = example_indices(step, G, len(train_ex), cfg.seed)
        micro = [idx[m * cfg.batch_size * world:(m + 1) * cfg.batch_size * world] for m in range(cfg.grad_accum)]
        mine = [[train_ex[i] for i in mb[acc.process_index * cfg.batch_size:(acc.process_index + 1) * cfg.batch_size]]
                for mb in micro]
        n_global = sum(train_ex[i].n_supervised for i in idx)
        loss_sum_local = 0.0
        if budget:
            split = split_packed if cfg.packing else split_by_tokens
            mine = [piece for mb in mine for piece in split(mb, budget)]
        for mb in mine:
            batch = pack(mb, pad_id, cfg.max_len) if cfg.packing else collate(mb, pad_id)
            with acc.no_sync(wrapper) if mb is not mine[-1] and world > 1 else _null():
                loss_sum, _ = wrapper(batch["input_ids"], batch["labels"], batch["position_ids"])
                # DDP averages gradients over processes; scale so the result is sum(token losses) / global count
                acc.backward(loss_sum * world / n_global)
            loss_sum_local += float(loss_sum.detach())
            tokens_done += sum(len(e.input_ids) for e in mb)
            examples_done += len(mb)
        grad_norm = None
        if cfg.max_grad_norm:  # the norm before clipping, as TRL/Axolotl log it
            grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if _STEP_DELAY:  # tests only: widen the window in which a SIGKILL lands mid-run
            time.sleep(_STEP_DELAY)
        loss = float(acc.reduce(torch.tensor(loss_sum_local), "sum")) / n_global
        elapsed = max(time.time() - t_loop, 1e-9)
        tok_s = tokens_done * world / elapsed
        rec = {"step": step, "loss": round(loss, 6), "lr": sched.get_last_lr()[0], "tokens_per_s": round(tok_s, 1),
               "examples_per_s": round(examples_done * world / elapsed, 3), "time": round(time.time() - t_start, 2)}
        if grad_norm is not None:
            rec["grad_norm"] = round(grad_norm, 6)
        result.losses.append(loss)
        if cfg.eval_loss_every and eval_ex and step % cfg.eval_loss_every == 0:
            rec["eval_loss"] = eval_loss(acc.unwrap_model(wrapper), eval_ex, pad_id, cfg.batch_size)
            result.eval_losses[step] = rec["eval_loss"]
            model.train()
        history.append(rec)
        if main:
            with open(metrics_f, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if log_with:
            acc.log({k: v for k, v in rec.items() if k != "step"}, step=step)
        if pbar:
            pbar.update(step, loss, tok_s, rec.get("eval_loss"))
        stop_early = False
        if "eval_loss" in rec and cfg.early_stopping_patience:
            if rec["eval_loss"] < best_eval - 1e-6:
                best_eval, bad_evals = rec["eval_loss"], 0
            else:
                bad_evals += 1
                stop_early = bad_evals >= cfg.early_stopping_patience
        checkpoint_now = (cfg.save_every and step % cfg.save_every == 0) or step == stop_at or stop_early
        if cfg.eval_every and step % cfg.eval_every == 0:
            checkpoint_now = True
        if checkpoint_now:
            do_checkpoint(step)
        if stop_early:
            say(f"early stopping at step {step}: eval loss did not improve for {cfg.early_stopping_patience} evaluations")
            result.stopped_early = True
            break
    if pbar:
        pbar.close()
    loop_s = max(time.time() - t_loop, 1e-9)  # the training loop only: not the final eval below

    result.steps = step
    if main:
        final_eval = eval_loss(acc.unwrap_model(wrapper), eval_ex, pad_id, cfg.batch_size) if eval_ex else None
        side = sidecar(cfg, base_path, meta, lora_cfg, step=step, trainable=trainable, total=total,
                       extra={"hardware": hardware,
                              "final_train_loss": result.losses[-1] if result.losses else None,
                              "final_eval_loss": final_eval})
        ck = run_dir / f"checkpoint-{step}"
        if (ck / "gemtune.json").is_file():  # carry the eval hook's verdict onto the final adapter
            prev = json.loads((ck / "gemtune.json").read_text())
            for k in ("eval", "shippable"):
                if k in prev:
                    side[k] = prev[k]
        save_adapter(peft_model, result.adapter_dir, side)
        _plot_loss(run_dir)
    else:
        final_eval = None
    acc.wait_for_everyone()
    if log_with:
        acc.end_training()
    result.seconds = time.time() - t_start
    result.examples_per_s = examples_done * world / loop_s
    result.tokens_per_s = tokens_done * world / loop_s
    if final_eval is not None:
        result.eval_losses[step] = final_eval
    return result


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


def _install_lean(model, cfg: TrainConfig, acc):
    """Memory-lean kernels and bf16 storage of the frozen base (see gemtune.train.lean), where they apply."""
    from accelerate.utils import DistributedType

    from gemtune.train.lean import install

    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if not cfg.lean or cfg.quant or cfg.dtype != "float32" or sharded:
        if cfg.frozen_storage == "bfloat16" and (cfg.quant or sharded):
            raise UserError("frozen_storage: bfloat16 needs an unquantised, unsharded base", field="frozen_storage")
        return None
    bf16 = cfg.frozen_storage in ("auto", "bfloat16")
    rep = install(model, bf16_storage=bf16)
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


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _prune(run_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    ckpts = complete_checkpoints(run_dir)
    best = None
    if (run_dir / "best.json").is_file():
        best = json.loads((run_dir / "best.json").read_text()).get("checkpoint")
    for s, p in ckpts[:-limit]:
        if p.name != best:
            shutil.rmtree(p, ignore_errors=True)


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


class _progress:
    """rich progress bar with loss, tokens/s and ETA; a no-op when disabled."""

    def __new__(cls, enabled: bool, total: int, start: int):
        if not enabled:
            return None
        return super().__new__(cls)

    def __init__(self, enabled: bool, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                          TimeRemainingColumn(), transient=False)
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, step, loss, tok_s, eval_loss):
        info = f"loss {loss:.4f}  {tok_s:,.0f} tok/s" + (f"  eval {eval_loss:.4f}" if eval_loss is not None else "")
        self.p.update(self.task, completed=step, info=info)

    def close(self):
        self.p.stop()
