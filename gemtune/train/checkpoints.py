"""Checkpoint directories of a run: the adapter, `gemtune.json`, and `trainer_state.pt` (optimizer, scheduler,
every process's RNG state, the metrics history), written atomically so a killed run leaves only whole
checkpoints; and reading them back for an exact resume."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from gemtune.adapter import ADAPTER_WEIGHTS, write_sidecar
from gemtune.errors import UserError
from gemtune.train.config import TrainConfig
from gemtune.utils import atomic_dir, sha256_file

STATE_FILE = "trainer_state.pt"
# trainer_state.pt holds tensors and plain containers only, so resume loads it with torch.load(weights_only=True):
# nothing in a checkpoint directory can run code. Files without this format were pickled by older releases.
STATE_FORMAT = "gemtune.trainer_state/2"


def rng_state() -> dict:
    """Every RNG the loop draws from, as tensors and plain lists (what `weights_only=True` accepts)."""
    py_version, py_internal, py_gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": {"version": int(py_version), "internal": [int(x) for x in py_internal],
                       "gauss_next": None if py_gauss is None else float(py_gauss)},
            "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            # the GPU's generator draws LoRA dropout on a GPU run; this process's device only
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    py = s["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    n = s["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def plain(obj):
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
        if m and (p / STATE_FILE).is_file() and (p / ADAPTER_WEIGHTS).is_file():
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


def save_peft(peft_model, out: Path, state_dict: dict | None = None) -> None:
    """PEFT's own save (adapter_config.json + adapter_model.safetensors); a gathered state dict when sharded."""
    if state_dict is None:
        peft_model.save_pretrained(out, safe_serialization=True)
        return
    from peft import get_peft_model_state_dict

    full = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    peft_model.save_pretrained(out, safe_serialization=True, state_dict=full)


def save_adapter(peft_model, out: Path, side: dict, state_dict: dict | None = None) -> None:
    """PEFT-format adapter + gemtune.json, written atomically (`state_dict`: the gathered weights of a sharded
    run)."""
    with atomic_dir(out) as tmp:
        save_peft(peft_model, tmp, state_dict)
        write_sidecar(tmp, side)


def prune(run_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    ckpts = complete_checkpoints(run_dir)
    best = None
    if (run_dir / "best.json").is_file():
        best = json.loads((run_dir / "best.json").read_text()).get("checkpoint")
    for s, p in ckpts[:-limit]:
        if p.name != best:
            shutil.rmtree(p, ignore_errors=True)
