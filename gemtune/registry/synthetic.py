"""Random (untrained) LoRA adapters in real PEFT format, for tests and benchmarks.

Serving tests need several adapters whose greedy outputs differ visibly, and benchmarks need N same-shaped
adapters on the real base; training them would cost minutes each. PEFT with `init_lora_weights=False` gives
non-zero A and B, so every seed changes what the model says, and the files are exactly what `gemtune train` and
PEFT write (adapter_config.json + adapter_model.safetensors), so they exercise the same loading paths.
"""

from __future__ import annotations

from pathlib import Path

from gemtune.adapter import write_sidecar

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_random_adapters(base, outs: list[str | Path], *, r: int = 8, alpha: int | None = None,
                         targets=ATTENTION, seeds: list[int] | None = None, scale: float = 1.0,
                         sidecar: dict | None = None) -> list[Path]:
    """Write one random adapter per output dir for the base at `base` (a dir); returns the dirs.

    `scale` multiplies B: larger values move greedy outputs further from the base's.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), lora_dropout=0.0,
                     bias="none", init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    seeds = seeds if seeds is not None else list(range(len(outs)))
    written = []
    for out, seed in zip(outs, seeds):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[1] ** 0.5)
        out = Path(out)
        pm.save_pretrained(str(out), safe_serialization=True)
        if sidecar is not None:
            write_sidecar(out, sidecar)
        written.append(out)
    return written


def make_random_adapter(base, out: str | Path, *, seed: int = 0, **kw) -> Path:
    return make_random_adapters(base, [out], seeds=[seed], **kw)[0]
