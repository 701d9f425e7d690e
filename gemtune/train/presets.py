"""LoRA presets by task kind. Each carries the reason it exists, printed by `gemtune train --preset NAME`.

Ranks stay in vLLM's supported set {8, 16, 32, 64, 128, 256} so every adapter loads unchanged there.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemtune.base.families import ATTENTION, MLP
from gemtune.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    r: int
    alpha: int
    dropout: float
    modules: tuple[str, ...]
    lr: float
    why: str


PRESETS = {
    p.name: p
    for p in (
        Preset("default", 16, 32, 0.05, ATTENTION, 2e-4,
               "r16/alpha32 on q/k/v/o: 0.5-1.5% trainable on Gemma, the playbook's starting point for most tasks."),
        Preset("routing", 8, 16, 0.05, ATTENTION, 3e-4,
               "Classification/routing only re-maps inputs to a small label set: low rank on attention is enough "
               "and generalises better on a few thousand examples."),
        Preset("style", 8, 16, 0.05, ATTENTION, 2e-4,
               "Tone and style are low-dimensional changes; low rank on attention avoids overwriting knowledge."),
        Preset("structured", 32, 64, 0.05, ATTENTION + MLP, 1e-4,
               "Structured output (JSON, forms) needs new token-level habits: r32 on attention and MLP."),
        Preset("code", 64, 128, 0.05, ATTENTION + MLP, 1e-4,
               "Code changes the most behaviour: r64 on attention and MLP, lower learning rate."),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}", field="preset")
    return PRESETS[name]
