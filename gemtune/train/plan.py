"""GPU memory plan: will this run fit, on which GPU, how many, and roughly how long.

The estimate adds up what a LoRA/QLoRA step keeps resident, each term taken from what the trainer does (its
constants are imported, not copied, and tests/train/test_plan_agrees.py fails when plan and trainer disagree):
- weights: params x bytes (bf16 = 2, NF4 ≈ 0.5 plus ~0.03 for double-quantised block scales);
- LoRA params + grads + AdamW states (fp32: PEFT keeps the adapter in fp32) — tiny but counted;
- activations: what autograd saves per token per decoder layer for the trainer's model (a frozen base in the run's
  dtype, fp32 LoRA with dropout, sdpa attention), `ACT_COEF` below: bytes per token per layer as a linear function
  of hidden, the attention widths of that layer (Gemma 4's full-attention layers have wider heads), intermediate,
  heads and the LoRA rank. The coefficients were measured with saved-tensor hooks on Gemma 4 decoder layers
  (the test re-measures them). sdpa keeps no seq x seq scores, so there is no quadratic term (Korthikanti et al.'s
  5·heads·seq assumes materialised attention). With gradient checkpointing (the trainer's default on a GPU) the
  step keeps each layer's input and one layer's activations at a time (the one being recomputed); on a CPU the
  trainer splits the batch into micro-batches of `micro_batch_tokens` (auto: 1024), which bound the tokens alive;
- loss: gemtune applies lm_head only at supervised positions (`--supervised-frac` of the tokens), one chunk of
  `loss_chunk` positions at a time (train.loss_chunk, 256 by default), through the fused linear + cross-entropy
  (gemtune.train.loss): per chunk the fp32 logits, their softmax in place, a copy in the compute dtype when that
  is not fp32, and with a final logit softcap two more fp32 buffers; plus the gathered hidden states and the
  input gradient kept for backward, for every supervised position;
- framework overhead: 1.0 GiB + 8 %. The GiB is the CUDA context with cuBLAS/cuDNN handles and workspaces (about
  0.5-0.8 GiB on an H100 with torch 2.x and lazy module loading) plus the NCCL/accelerate buffers; the 8 % is the
  caching allocator's reserved-over-allocated slack for a loop of fixed shapes. Not yet measured on a GPU here:
  bench/gpu_check.py records reserved + context next to the plan.

Throughput: FLOPs ≈ 6·N·tokens (forward + backward through the frozen base), at a stated MFU per GPU.

Recommendation: among the GPUs that fit with at least 10 % memory headroom (all that fit, if none has it), the one
with the lowest cost per trained token (price x count / throughput: what an epoch costs, whatever its size), at
indicative on-demand prices that `prices` (the CLI's `--price GPU=USD`) overrides; ties go to more headroom.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from gemtune.errors import UserError
from gemtune.train.config import TrainConfig

GIB = 1024 ** 3
LOSS_CHUNK = TrainConfig.model_fields["loss_chunk"].default  # the trainer's supervised positions per lm_head chunk

# name: (memory GiB, dense bf16 TFLOPs, assumed MFU for LoRA fine-tuning)
GPUS = {
    "L4-24GB": (24, 121, 0.35),
    "A10G-24GB": (24, 125, 0.35),
    "A100-40GB": (40, 312, 0.40),
    "A100-80GB": (80, 312, 0.40),
    "H100-80GB": (80, 989, 0.35),
    "H200-141GB": (141, 989, 0.35),
}

# indicative on-demand USD per GPU-hour (late-2026 list prices of the large clouds, rounded); `--price` overrides
PRICES_USD_H = {
    "L4-24GB": 0.80,
    "A10G-24GB": 1.00,
    "A100-40GB": 1.60,
    "A100-80GB": 2.00,
    "H100-80GB": 3.00,
    "H200-141GB": 3.80,
}
MIN_HEADROOM = 0.10


@dataclass
class Shape:
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int = 262_144
    global_head_dim: int = 0  # head width of the full-attention layers when wider (Gemma 4); 0 = head_dim
    full_layers: int = 0  # how many layers use global_head_dim
    softcap: bool = False  # a final logit softcap (two more fp32 logit buffers in the loss)


# Gemma-class shapes by size (Gemma 2/3/4 public configs, rounded). 9b and 27b carry the Gemma 4 layout that
# bench/gpu_check.py builds its 9B/27B-class models with: one full-attention layer in six (and the last), whose
# heads are twice as wide.
SIZES = {
    "270m": Shape(0.27e9, 18, 640, 4, 1, 256, 2048),
    "1b": Shape(1.0e9, 26, 1152, 4, 1, 256, 6912),
    "2b": Shape(2.6e9, 26, 2304, 8, 4, 256, 9216),
    "4b": Shape(4.3e9, 34, 2560, 8, 4, 256, 10240),
    "9b": Shape(9.2e9, 42, 3584, 16, 8, 256, 14336, global_head_dim=512, full_layers=7),
    "12b": Shape(12.2e9, 48, 3840, 16, 8, 256, 15360),
    "27b": Shape(27.2e9, 62, 5376, 32, 16, 128, 21504, global_head_dim=256, full_layers=11),
}

# Bytes autograd saves per token in one decoder layer of the trainer's model, per unit of each dimension, keyed by
# (compute dtype bytes, LoRA on the MLP as well). Measured with torch.autograd.graph.saved_tensors_hooks on Gemma 4
# decoder layers built as the trainer builds them (frozen base, PEFT LoRA in fp32 with dropout, sdpa), fitted over
# five shapes (residuals < 1 %); tests/train/test_plan_agrees.py re-measures them. "q"/"kv" are the attention
# widths (heads x head_dim, kv_heads x head_dim), "rank" counts 4 bytes per rank per adapted module (the fp32
# lora_A output). Most of the hidden-size term is fp32: PEFT upcasts each adapted module's input to the adapter's
# fp32 and the RMSNorms compute in fp32.
ACT_COEF = {
    (2, False): {"hidden": 40, "q": 16, "kv": 12, "intermediate": 6, "heads": 24},
    (4, False): {"hidden": 40, "q": 20, "kv": 16, "intermediate": 12, "heads": 26},
    (2, True): {"hidden": 56, "q": 16, "kv": 12, "intermediate": 14, "heads": 24},
    (4, True): {"hidden": 56, "q": 20, "kv": 16, "intermediate": 20, "heads": 26},
}


def layer_activation_bytes(shape: Shape, *, act_bytes: float, mlp: bool, rank: int, full: bool = False) -> float:
    """Bytes autograd keeps per token for one decoder layer (a full-attention one when `full`)."""
    c = ACT_COEF[(4 if act_bytes >= 4 else 2, bool(mlp))]
    hd = shape.global_head_dim if full and shape.global_head_dim else shape.head_dim
    modules = 7 if mlp else 4
    return (c["hidden"] * shape.hidden + c["q"] * shape.heads * hd + c["kv"] * shape.kv_heads * hd
            + c["intermediate"] * shape.intermediate + c["heads"] * shape.heads + 4 * rank * modules)


def activation_bytes(shape: Shape, tokens: int, *, act_bytes: float, mlp: bool, rank: int, grad_ckpt: bool) -> float:
    """Activations alive at the step's peak for `tokens` tokens in one forward/backward."""
    full = min(shape.full_layers, shape.layers)
    sliding = layer_activation_bytes(shape, act_bytes=act_bytes, mlp=mlp, rank=rank)
    wide = layer_activation_bytes(shape, act_bytes=act_bytes, mlp=mlp, rank=rank, full=True)
    if grad_ckpt:  # each layer's input kept, one layer's activations recomputed at a time
        return tokens * (shape.hidden * act_bytes * shape.layers + max(sliding, wide if full else sliding))
    return tokens * (sliding * (shape.layers - full) + wide * full)


def loss_bytes(shape: Shape, supervised: int, *, act_bytes: float, lm_head_bytes: float,
               loss_chunk: int | None) -> float:
    """The supervised-only loss (gemtune.train.loss): one chunk's logits at a time through the fused linear +
    cross-entropy, plus the gathered hidden states and their input gradient for every supervised position."""
    from gemtune.train.loss import VOCAB_BLOCK

    chunk = min(supervised, loss_chunk) if loss_chunk else supervised
    per_logit = 4 + (act_bytes if act_bytes < 4 else 0) + (8 if shape.softcap else 0)
    upcast = VOCAB_BLOCK * shape.hidden * act_bytes if lm_head_bytes < act_bytes else 0  # a bf16-stored lm_head
    return chunk * shape.vocab * per_logit + 2 * supervised * shape.hidden * act_bytes + upcast


def shape_from_params(text: str) -> Shape:
    t = text.lower().strip()
    if t in SIZES:
        return SIZES[t]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([mb])", t)
    if not m:
        raise UserError(f"--params {text!r}: expected a size like 9b, 27b or 270m", field="params")
    n = float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6)
    # nearest known shape, scaled
    name = min(SIZES, key=lambda k: abs(math.log(SIZES[k].params / n)))
    s = SIZES[name]
    return Shape(n, s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab,
                 s.global_head_dim, s.full_layers, s.softcap)


def _per_layer_head_dims(cfg, types: list) -> tuple[int, int] | None:
    """(sliding head dim, full-attention head dim) of a config whose head_dim differs per layer (newer transformers
    keep Gemma 4's wider global heads in `per_layer_config`, and reading `cfg.head_dim` then raises); None for a
    homogeneous config."""
    try:
        getattr(cfg, "head_dim", None)
        return None
    except Exception:  # AmbiguousGlobalPerLayerAttributeError
        pass
    layers = cfg.per_layer_config
    dims = [layers[i].head_dim for i in range(cfg.num_hidden_layers)]
    full = [d for d, t in zip(dims, types) if t == "full_attention"]
    sliding = [d for d, t in zip(dims, types) if t != "full_attention"] or dims
    return sliding[0], (full[0] if full else 0)


def shape_of(cfg, params: float) -> Shape:
    """The plan's Shape of a transformers text config with `params` parameters (Gemma 4's wider full-attention
    heads and a final logit softcap included)."""
    types = getattr(cfg, "layer_types", None) or []
    per_layer = _per_layer_head_dims(cfg, types)
    if per_layer is not None:  # a heterogeneous config (transformers' per_layer_config): head_dim is per layer
        hd, ghd = per_layer
    else:
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        ghd = getattr(cfg, "global_head_dim", None) or 0
    full = sum(t == "full_attention" for t in types) if ghd and ghd != hd else 0
    return Shape(params, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                 getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, hd, cfg.intermediate_size,
                 cfg.vocab_size, ghd if full else 0, full, bool(getattr(cfg, "final_logit_softcapping", None)))


def shape_from_config(path: str | Path) -> Shape:
    from transformers import AutoConfig

    from gemtune.base.provision import pull

    p = pull(str(path))
    cfg = AutoConfig.from_pretrained(str(p)).get_text_config()
    n = 0
    st = list(Path(p).glob("*.safetensors"))
    if st:
        from safetensors import safe_open

        for f in st:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    n += math.prod(sl.get_shape())
    else:
        n = 12 * cfg.num_hidden_layers * cfg.hidden_size ** 2 + cfg.vocab_size * cfg.hidden_size
    return shape_of(cfg, n)


def lora_params(s: Shape, rank: int, mlp: bool = False) -> int:
    q = s.heads * s.head_dim
    kv = s.kv_heads * s.head_dim
    per_layer = rank * ((s.hidden + q) + 2 * (s.hidden + kv) + (q + s.hidden))
    if mlp:
        per_layer += rank * (2 * (s.hidden + s.intermediate) + (s.intermediate + s.hidden))
    return per_layer * s.layers


def plan(shape: Shape, *, method: str = "lora", seq_len: int = 2048, batch: int = 1, rank: int = 16,
         grad_ckpt: bool = True, supervised_frac: float = 1.0, weight_bytes: float | None = None,
         mlp: bool = False, train_tokens: float | None = None, overhead_gib: float = 1.0,
         act_bytes: float = 2.0, loss_chunk: int | None = LOSS_CHUNK, micro_batch_tokens: int | None = None,
         prices: dict[str, float] | None = None) -> dict:
    """The memory plan of one run (see the module docstring). `loss_chunk` is the trainer's (train.loss_chunk);
    `micro_batch_tokens` the trainer's micro-batch budget (None: the whole batch at once, as on a GPU)."""
    if method not in ("lora", "qlora"):
        raise UserError(f"--method {method!r}: expected lora or qlora", field="method")
    unknown = sorted(set(prices or {}) - set(GPUS))
    if unknown:
        raise UserError(f"--price {unknown[0]}: unknown GPU; known: {', '.join(GPUS)}", field="price")
    price_of = {**PRICES_USD_H, **(prices or {})}
    wb = weight_bytes if weight_bytes is not None else (0.5 + 0.03 if method == "qlora" else 2.0)
    weights = shape.params * wb
    if method == "qlora":
        weights += shape.vocab * shape.hidden * (2 - wb)  # embeddings stay bf16 under bitsandbytes
    lp = lora_params(shape, rank, mlp)
    lora_state = lp * (4 + 4 + 8)  # fp32 weights + grads + 2 Adam moments
    tokens = seq_len * batch
    if micro_batch_tokens:  # the trainer runs the batch in pieces of at most this many tokens (a longer row alone)
        tokens = min(tokens, max(micro_batch_tokens, seq_len))
    activations = activation_bytes(shape, tokens, act_bytes=act_bytes, mlp=mlp, rank=rank, grad_ckpt=grad_ckpt)
    sup = max(1, int(tokens * supervised_frac))
    lm_head_bytes = 2.0 if method == "qlora" else wb  # bitsandbytes leaves lm_head in bf16
    logits = loss_bytes(shape, sup, act_bytes=act_bytes, lm_head_bytes=lm_head_bytes, loss_chunk=loss_chunk)
    subtotal = weights + lora_state + activations + logits
    overhead = overhead_gib * GIB + 0.08 * subtotal
    total = subtotal + overhead
    breakdown = {
        "weights_gib": weights / GIB,
        "lora_params_optimizer_gib": lora_state / GIB,
        "activations_gib": activations / GIB,
        "logits_gib": logits / GIB,
        "overhead_gib": overhead / GIB,
    }
    fits = []
    for name, (mem, tflops, mfu) in GPUS.items():
        usable = mem * 0.95
        count, per_gpu = None, None
        for n in (1, 2, 4, 8):
            # weights shard across GPUs (FSDP); activations/logits per GPU for its micro-batch
            per_gpu = (weights + lora_state) / n + activations + logits + overhead
            if per_gpu / GIB <= usable:
                count = n
                break
        row = {"gpu": name, "count": count, "memory_gib": mem}
        if count is not None:
            row["per_gpu_gib"] = round(per_gpu / GIB, 3)
            row["headroom"] = round(1 - per_gpu / GIB / mem, 3)
            row["usd_per_hour"] = round(price_of[name] * count, 2)
            hours_per_1b = 6 * shape.params * 1e9 / (tflops * 1e12 * mfu * count) / 3600
            row["usd_per_1b_tokens"] = round(hours_per_1b * price_of[name] * count, 2)
        if train_tokens:
            flops = 6 * shape.params * train_tokens
            hours = flops / (tflops * 1e12 * mfu * (count or 1)) / 3600
            row["hours_per_epoch"] = round(hours, 3)
            row["mfu"] = mfu
            if count is not None:
                row["usd_per_epoch"] = round(hours * price_of[name] * count, 2)
        fits.append(row)
    fitting = [f for f in fits if f["count"] is not None]
    return {
        "params": shape.params,
        "method": method,
        "seq_len": seq_len,
        "batch": batch,
        "rank": rank,
        "gradient_checkpointing": grad_ckpt,
        "loss_chunk": loss_chunk,
        "micro_batch_tokens": micro_batch_tokens,
        "act_bytes": act_bytes,
        "lora_params": lp,
        "total_gib": round(total / GIB, 3),
        "breakdown": {k: round(v, 3) for k, v in breakdown.items()},
        "fits": fitting,
        "does_not_fit": [f["gpu"] for f in fits if f["count"] is None],
        "recommended": recommend(fitting, by_epoch=bool(train_tokens)),
        "prices_usd_per_gpu_hour": {k: price_of[k] for k in GPUS},
        "shape": asdict(shape),
    }


def recommend(fits: list[dict], *, by_epoch: bool) -> dict | None:
    """The fitting GPU with the lowest cost per trained token among those with ≥ 10 % memory headroom (so the run
    survives a longer batch or a fragmented allocator); ties go to more headroom, then fewer GPUs."""
    if not fits:
        return None
    roomy = [f for f in fits if f["headroom"] >= MIN_HEADROOM]
    pool = roomy or fits
    best = min(pool, key=lambda f: (f["usd_per_1b_tokens"], -f["headroom"], f["count"]))
    why = (f"cheapest per epoch (${best['usd_per_epoch']:.2f}, {best['hours_per_epoch']:.2f} h)" if by_epoch
           else f"cheapest per trained token (${best['usd_per_1b_tokens']:.2f} per 1B tokens)")
    why += f" with {100 * best['headroom']:.0f}% memory headroom"
    if not roomy:
        why += f"; no GPU fits with {100 * MIN_HEADROOM:.0f}% headroom, so this one is tight"
    return {"gpu": best["gpu"], "count": best["count"], "usd_per_1b_tokens": best["usd_per_1b_tokens"], "why": why}


def cpu_plan(path: str | Path, *, seq_len: int, batch: int, rank: int, supervised_frac: float,
             frozen_bytes: float = 2.0) -> dict:
    """The same model, for the CPU run the trainer starts by default (what the RSS check in tests measures): its
    CPU policy (fp32, no checkpointing), its CPU micro-batch budget and loss chunk, no CUDA context; the process
    baseline (Python, torch, tokenizer) is the overhead. Frozen weights take 2 bytes: the default lean training
    path stores them in bf16 (`frozen_storage: auto`); pass 4.0 for `lean: false` or `frozen_storage: float32`."""
    kw, _ = config_plan(TrainConfig(), device="cpu", native_bf16=False)
    return plan(shape_from_config(path), method="lora", seq_len=seq_len, batch=batch, rank=rank,
                grad_ckpt=kw["grad_ckpt"], supervised_frac=supervised_frac, weight_bytes=frozen_bytes,
                overhead_gib=0.6, act_bytes=kw["act_bytes"], loss_chunk=kw["loss_chunk"],
                micro_batch_tokens=kw["micro_batch_tokens"])


def to_json(p: dict) -> str:
    return json.dumps(p, indent=2)


def config_plan(cfg, *, device: str = "cuda", native_bf16: bool = True) -> tuple[dict, dict]:
    """(plan() keyword arguments, the resolved policy) for the run `cfg` (a TrainConfig) would start on
    `device`: the trainer's own defaults there (`gemtune.train.policy.resolve_policy`, its loss chunk and its
    micro-batch budget `gemtune.train.trainer.micro_batch_budget`), so plan and run agree."""
    import torch

    from gemtune.base.families import MLP
    from gemtune.train.policy import plan_assumptions, resolve_policy
    from gemtune.train.presets import get_preset
    from gemtune.train.trainer import micro_batch_budget

    preset = get_preset(cfg.preset)
    modules = tuple(cfg.lora.target_modules) if cfg.lora.target_modules else preset.modules
    policy = resolve_policy(cfg, device, native_bf16=native_bf16)
    kw = plan_assumptions(policy, rank=cfg.lora.r or preset.r, mlp=any(m in MLP for m in modules))
    kw["loss_chunk"] = cfg.loss_chunk
    kw["micro_batch_tokens"] = micro_batch_budget(cfg, torch.device(policy.device))
    return kw, policy.record()


# What `gemtune plan` sizes when neither a flag nor --config says: one 2048-token sequence per GPU (the playbook's
# figure, and the CLI's documented --seq-len/--batch defaults). Every other assumption is the trainer's default run
# on a bf16 GPU (`trainer_defaults`): its method, preset rank and targets, dtype, checkpointing and loss chunk.
PLAN_DEFAULTS = {"seq_len": 2048, "batch": 1}


def trainer_defaults(device: str = "cuda") -> dict:
    """plan() keyword arguments for the run a default TrainConfig starts on `device` (a bf16 GPU for "cuda")."""
    return config_plan(TrainConfig(), device=device, native_bf16=device != "cpu")[0]


def plan_run(*, model: str | None = None, params: str | None = None, config: str | Path | None = None,
             settings: dict | None = None, supervised_frac: float = 1.0, train_tokens: float | None = None,
             prices: dict[str, float] | None = None) -> tuple[Shape, dict, dict]:
    """`gemtune plan`: (shape, plan, the settings planned with) for exactly one of `model` (a base name, dir or
    hub id), `params` (a size such as 9b) or `config` (a gemtune.yaml: its base, and the run it would start on a
    GPU). `settings` (method, seq_len, batch, rank, mlp, grad_ckpt; None = not given) override what the config
    implies, which overrides PLAN_DEFAULTS; a method other than the config's plans with that method's own weight
    bytes. With a config, the plan records it under "config" (path, resolved policy, assumptions)."""
    assumed, resolved = {}, None
    if config is not None:
        from gemtune.train.config import load_train_config

        cfg = load_train_config(config)
        assumed, resolved = config_plan(cfg)
        model = model if (model or params) else cfg.base
    if bool(model) == bool(params):
        raise UserError("give exactly one of --model or --params (or --config)", field="model")
    given = {k: v for k, v in (settings or {}).items() if v is not None}
    implied = {**trainer_defaults(), **PLAN_DEFAULTS, **assumed}
    kw = {**implied, **given}
    if "method" in given and given["method"] != implied["method"]:
        kw["weight_bytes"] = None  # a method flag over the config or the defaults: that method's own weight bytes
    shape = shape_from_params(params) if params else shape_from_config(model)
    p = plan(shape, supervised_frac=supervised_frac, train_tokens=train_tokens, prices=prices, **kw)
    if resolved is not None:
        p["config"] = {"path": str(config), "resolved": resolved, "assumed": assumed}
    return shape, p, kw
