"""GPU memory plan: will this run fit, on which GPU, how many, and roughly how long.

The estimate adds up what a LoRA/QLoRA step keeps resident:
- weights: params x bytes (bf16 = 2, NF4 ≈ 0.5 plus ~0.03 for double-quantised block scales);
- LoRA params + grads + AdamW states (fp32 master copy, 2 moments) — tiny but counted;
- activations: per layer per token ≈ hidden x (34 + 5·heads·seq/hidden) bytes in bf16 without checkpointing
  (Korthikanti et al. 2022), divided by ~√layers-ish with checkpointing (we keep one layer's worth + inputs);
- logits: vocab x supervised tokens x 4 bytes (fp32 for the loss), times 2 for the gradient — gemtune computes
  them only at supervised positions (`--supervised-frac` of the tokens) and one loss chunk at a time;
- framework overhead: CUDA context + allocator fragmentation, 1.0 GiB + 8 %.

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

GIB = 1024 ** 3

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


# Gemma-class shapes by size (Gemma 2/3/4 public configs, rounded).
SIZES = {
    "270m": Shape(0.27e9, 18, 640, 4, 1, 256, 2048),
    "1b": Shape(1.0e9, 26, 1152, 4, 1, 256, 6912),
    "2b": Shape(2.6e9, 26, 2304, 8, 4, 256, 9216),
    "4b": Shape(4.3e9, 34, 2560, 8, 4, 256, 10240),
    "9b": Shape(9.2e9, 42, 3584, 16, 8, 256, 14336),
    "12b": Shape(12.2e9, 48, 3840, 16, 8, 256, 15360),
    "27b": Shape(27.2e9, 62, 5376, 32, 16, 128, 21504),
}


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
    return Shape(n, s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab)


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
    return Shape(n, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                 getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
                 cfg.intermediate_size, cfg.vocab_size)


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
         act_bytes: float = 2.0, loss_chunk: int | None = 1024, prices: dict[str, float] | None = None) -> dict:
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
    per_layer_token = shape.hidden * 34 + 5 * shape.heads * seq_len  # bytes/token/layer at 2-byte activations
    per_layer_token *= act_bytes / 2
    if grad_ckpt:
        activations = tokens * shape.hidden * act_bytes * shape.layers + tokens * per_layer_token
    else:
        activations = tokens * per_layer_token * shape.layers
    sup = max(1, int(tokens * supervised_frac))
    if loss_chunk:  # gemtune's loss keeps one chunk of logits (and its gradient) alive at a time
        sup = min(sup, loss_chunk)
    logits = sup * shape.vocab * 4 * 2
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
    """The same model, for an fp32 CPU run (what the RSS check in tests measures): fp32 activations, no
    checkpointing, no CUDA context; the process baseline (Python, torch, tokenizer) is the overhead. Frozen
    weights take 2 bytes: the default lean training path stores them in bf16 (`frozen_storage: auto`); pass 4.0
    for `lean: false` or `frozen_storage: float32`."""
    return plan(shape_from_config(path), method="lora", seq_len=seq_len, batch=batch, rank=rank, grad_ckpt=False,
                supervised_frac=supervised_frac, weight_bytes=frozen_bytes, overhead_gib=0.6, act_bytes=4.0)


def to_json(p: dict) -> str:
    return json.dumps(p, indent=2)


def config_plan(cfg, *, device: str = "cuda", native_bf16: bool = True) -> tuple[dict, dict]:
    """(plan() keyword arguments, the resolved policy) for the run `cfg` (a TrainConfig) would start on
    `device`: the trainer's own defaults there (`gemtune.train.policy.resolve_policy`), so plan and run agree."""
    from gemtune.base.families import MLP
    from gemtune.train.policy import plan_assumptions, resolve_policy
    from gemtune.train.presets import get_preset

    preset = get_preset(cfg.preset)
    modules = tuple(cfg.lora.target_modules) if cfg.lora.target_modules else preset.modules
    policy = resolve_policy(cfg, device, native_bf16=native_bf16)
    kw = plan_assumptions(policy, rank=cfg.lora.r or preset.r, mlp=any(m in MLP for m in modules))
    return kw, policy.record()



# what `gemtune plan` assumes for a setting neither a flag nor --config gives
PLAN_DEFAULTS = {"method": "lora", "seq_len": 2048, "batch": 1, "rank": 16, "mlp": False, "grad_ckpt": True}


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
    kw = {**PLAN_DEFAULTS, **assumed, **given}
    if "method" in given and given["method"] != assumed.get("method", given["method"]):
        kw["weight_bytes"] = None  # a method flag over a config: that method's own weight bytes
    shape = shape_from_params(params) if params else shape_from_config(model)
    p = plan(shape, supervised_frac=supervised_frac, train_tokens=train_tokens, prices=prices, **kw)
    if resolved is not None:
        p["config"] = {"path": str(config), "resolved": resolved, "assumed": assumed}
    return shape, p, kw
