"""LoRA targets per family: language model only on multimodal, KV-shared layers have no k/v."""

import pytest

from gemtune.base.families import family_for, matched_modules, target_modules
from gemtune.base.tiny import tiny_model
from gemtune.errors import UserError


def test_gemma3_targets_all_attention_projections():
    m = tiny_model("gemma3", layers=4)
    fam = family_for(m.config.model_type)
    assert fam.name == "gemma3" and fam.end_of_turn == "<end_of_turn>" and not fam.multimodal
    names = matched_modules(m, target_modules(fam))
    assert len(names) == 4 * 4
    assert all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in names)
    assert m.config.tie_word_embeddings


def test_gemma4_text_kv_shared_layers_have_no_kv():
    m = tiny_model("gemma4", layers=4, kv_shared=True)
    fam = family_for(m.config.model_type)
    assert fam.name == "gemma4" and fam.end_of_turn == "<turn|>"
    names = matched_modules(m, target_modules(fam))
    # layers 0,1 own k/v; layers 2,3 reuse them (KV-shared): q/o only
    assert sorted(n for n in names if ".k_proj" in n) == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert len(names) == 2 * 4 + 2 * 2


def test_gemma4_multimodal_targets_language_model_only():
    m = tiny_model("gemma4", multimodal=True, layers=4)
    fam = family_for(m.config.model_type)
    assert fam.multimodal
    spec = target_modules(fam)
    names = matched_modules(m, spec)
    assert names and all(".language_model." in n for n in names)
    vision_q = [n for n, _ in m.named_modules() if "vision" in n and n.endswith("q_proj")]
    assert vision_q, "tiny multimodal model should have a vision tower with q_proj"
    assert not set(vision_q) & set(names)
    # PEFT applies the regex the same way
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=spec))
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in pm.named_modules() if n.endswith("lora_A")}
    assert lora and all("language_model" in n for n in lora)


def test_unified_and_unknown_types():
    assert family_for("gemma4_unified_text").name == "gemma4"
    with pytest.raises(UserError, match="llama"):
        family_for("llama")
