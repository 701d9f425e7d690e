"""Per-family facts about Gemma models that training and serving must get right.

- which linear layers LoRA targets (language model only on multimodal checkpoints; Gemma 4 KV-shared layers have
  no k/v projections, so they are simply absent from the match),
- the end-of-turn token (must be inside the loss or the model never stops),
- tied embeddings (never put `embed_tokens`/`lm_head` in `modules_to_save`),
- the token a model emits to hand its tool calls over (Gemma 4's `<|tool_response>`, a stop token of real
  checkpoints; Gemma 3 has no tool tokens and ends a calling turn with its end-of-turn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gemtune.errors import UserError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str  # template family: "gemma3" or "gemma4"
    model_types: tuple[str, ...]
    start_of_turn: str
    end_of_turn: str
    multimodal: bool = False
    tied_embeddings: bool = True
    extra_stop_tokens: tuple[str, ...] = field(default=("<eos>",))
    tool_stop_tokens: tuple[str, ...] = ()


GEMMA3_TEXT = Family("gemma3", ("gemma3_text",), "<start_of_turn>", "<end_of_turn>")
GEMMA3_MM = Family("gemma3", ("gemma3",), "<start_of_turn>", "<end_of_turn>", multimodal=True)
GEMMA4_TEXT = Family("gemma4", ("gemma4_text",), "<|turn>", "<turn|>", tool_stop_tokens=("<|tool_response>",))
GEMMA4_MM = Family("gemma4", ("gemma4",), "<|turn>", "<turn|>", multimodal=True, tool_stop_tokens=("<|tool_response>",))

_BY_TYPE = {t: f for f in (GEMMA3_TEXT, GEMMA3_MM, GEMMA4_TEXT, GEMMA4_MM) for t in f.model_types}
SUPPORTED_MODEL_TYPES = sorted(set(_BY_TYPE) | {"gemma4_unified*"})


def family_for(model_type: str) -> Family:
    """Family facts for a `config.model_type`; `gemma4_unified*` variants are Gemma 4 multimodal checkpoints."""
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    if model_type.startswith("gemma4_unified"):
        return GEMMA4_MM
    raise UserError(
        f"model_type {model_type!r} is not a supported Gemma family; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}",
        field="model_type",
    )


def family_of(model_or_config) -> Family:
    config = getattr(model_or_config, "config", model_or_config)
    return family_for(config.model_type)


def describe(model: str) -> dict:
    """`gemtune base info`: where a base is (provisioned when needed) and its family facts: model type, chat
    template, end-of-turn token, multimodality, LoRA targets."""
    from transformers import AutoConfig

    from gemtune.base.provision import pull

    path = pull(model)
    cfg = AutoConfig.from_pretrained(str(path))
    fam = family_for(cfg.model_type)
    return {"path": str(path), "model_type": cfg.model_type, "template": fam.name, "end_of_turn": fam.end_of_turn,
            "multimodal": fam.multimodal, "lora_targets": target_modules(fam)}


def target_modules(family: Family, modules: tuple[str, ...] | list[str] = ATTENTION) -> list[str] | str:
    """LoRA `target_modules` for a family.

    Text-only checkpoints get a plain list of leaf names (what every PEFT consumer, vLLM included, expects).
    Multimodal checkpoints get a regex anchored on the language model, so the vision/audio towers — which reuse
    names like `q_proj` — are never adapted.
    """
    modules = list(modules)
    if not family.multimodal:
        return modules
    return r".*language_model.*\.(" + "|".join(re.escape(m) for m in modules) + r")"


def matched_modules(model, targets: list[str] | str) -> list[str]:
    """Names of the nn.Linear modules a `target_modules` spec would adapt in `model` (for checks and messages)."""
    import torch.nn as nn

    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) and type(mod).__name__ not in ("Linear4bit", "Linear8bitLt"):
            continue
        if isinstance(targets, str):
            if re.fullmatch(targets, name):
                out.append(name)
        elif name.split(".")[-1] in targets:
            out.append(name)
    return out


def linear_leaf_names(model) -> list[str]:
    import torch.nn as nn

    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)
