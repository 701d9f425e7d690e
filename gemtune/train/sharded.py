"""Checkpoint save/load that works for every way accelerate may have wrapped the model: one process, DDP
(every process holds the whole adapter), FSDP2 `fully_shard` (parameters are DTensor shards).

Sharded runs gather what they save: the LoRA parameters one by one (`DTensor.full_tensor()`, a collective every
process joins in the same order; the frozen base is never gathered) and the optimizer state through
`torch.distributed.checkpoint.state_dict` with `full_state_dict=True`, keyed by parameter name. Rank 0 writes the
same files an unsharded run writes (a PEFT adapter that loads unchanged anywhere), plus every process's RNG
state. Resume gives each process the full tensors and lets it keep its own shard.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gemtune.adapter import write_sidecar
from gemtune.train.checkpoints import STATE_FILE, STATE_FORMAT, plain, prune, rng_state, save_peft, sidecar
from gemtune.utils import atomic_dir


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # DTensor (FSDP2): all-gather the shards
    return (full() if callable(full) else t).detach().to("cpu").clone()


def gather_adapter_state(r) -> dict[str, torch.Tensor]:
    """The LoRA weights, whole, on every process, in the key format of `peft_model.state_dict()`."""
    return {name: _full(p) for name, p in r.peft_model.named_parameters() if p.requires_grad}


def _dcp_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_optimizer_state(r) -> dict:
    if not r.sharded:
        return r.opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(r.acc.unwrap_model(r.wrapper), _inner_optimizer(r.opt),
                                     options=_dcp_options(cpu_offload=True))


def _inner_optimizer(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch optimizer


def _gather_rngs(r) -> list[dict]:
    if r.world == 1:
        return [rng_state()]
    return r.acc.gather_for_metrics([rng_state()], use_gather_object=True)


def write_checkpoint(r, step: int, extra: dict) -> Path:
    """`checkpoint-{step}` written by rank 0 from state every process helped gather; returns its path."""
    rngs = _gather_rngs(r)
    adapter = gather_adapter_state(r) if r.sharded else None
    optim = gather_optimizer_state(r)
    ck = r.run_dir / f"checkpoint-{step}"
    if r.main:
        side = sidecar(r.cfg, r.base_path, r.meta, r.lora_cfg, step=step, trainable=r.trainable, total=r.total,
                       extra=extra)
        with atomic_dir(ck) as tmp:
            save_peft(r.peft_model, tmp, adapter)
            write_sidecar(tmp, side)
            torch.save({"format": STATE_FORMAT, "optimizer": optim, "optimizer_keys": "fqn" if r.sharded else "index",
                        "scheduler": r.sched.state_dict(), "rng": rngs, "step": step, "history": plain(r.history)},
                       tmp / STATE_FILE)
        prune(r.run_dir, r.cfg.save_total_limit)
    r.acc.wait_for_everyone()
    return ck


def load_training_state(r, ck: Path, state: dict) -> None:
    """Adapter weights and optimizer/scheduler state of checkpoint `ck` into this process's (maybe sharded)
    model and optimizer."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(ck / "adapter_model.safetensors"))
    if not r.sharded:
        set_peft_model_state_dict(r.peft_model, weights)
        r.opt.load_state_dict(state["optimizer"])
    else:
        _load_sharded(r, weights, state)
    r.sched.load_state_dict(state["scheduler"])


def _load_sharded(r, weights: dict, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from gemtune.errors import UserError

    if state.get("optimizer_keys") != "fqn":
        raise UserError("--resume: this checkpoint was written by an unsharded run; resume it without FSDP/DeepSpeed",
                        file=str(STATE_FILE))
    wanted = {name: p for name, p in r.peft_model.named_parameters() if p.requires_grad}
    by_saved = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                              ".lora_B.default.weight"): v
                for k, v in weights.items()}
    with torch.no_grad():
        for name, p in wanted.items():
            src = by_saved[name].to(dtype=p.dtype)
            if hasattr(p, "device_mesh") and hasattr(p, "placements"):  # DTensor: keep this process's shard
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(p.device), p.device_mesh, p.placements)
                p.copy_(src)
            else:
                p.copy_(src.to(p.device))
    set_optimizer_state_dict(r.acc.unwrap_model(r.wrapper), _inner_optimizer(r.opt),
                             optim_state_dict=state["optimizer"], options=_dcp_options())


# ---------------------------------------------------------------- FSDP2 on CPU processes

def cpu_fsdp_requested(acc) -> bool:
    """`accelerate launch --use_fsdp` (or a config with `distributed_type: FSDP`) on CPU processes: accelerate
    1.x turns FSDP on only for GPU-like process groups (its state sets DistributedType.FSDP for MULTI_GPU/XPU/...,
    never for MULTI_CPU), so over gloo it would silently train plain DDP. gemtune shards with FSDP2 itself then."""
    import os

    from accelerate.utils import DistributedType

    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and acc.distributed_type == DistributedType.MULTI_CPU and acc.num_processes > 1)


def fully_shard_cpu(wrapper, world: int):
    """FSDP2 `fully_shard` over a 1-D gloo mesh: one unit per decoder layer, the rest (embeddings, tied head,
    final norm) in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for m in list(wrapper.modules()):
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)
    return wrapper


def local_value(t) -> float:
    """A scalar that may be a DTensor (e.g. FSDP2's gradient norm), as a float on every process."""
    full = getattr(t, "full_tensor", None)
    return float(full() if callable(full) else t)
