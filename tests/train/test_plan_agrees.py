"""`gemtune plan` and the trainer agree: every term of the memory plan comes from what the trainer does."""

import sys
from pathlib import Path

import pytest
import torch

from gemtune.train import plan as planmod
from gemtune.train.config import TrainConfig
from gemtune.train.plan import SIZES, Shape, config_plan, layer_activation_bytes, plan, plan_run, trainer_defaults
from gemtune.train.policy import resolve_policy


def test_plan_defaults_are_the_trainers():
    """The loss chunk, checkpointing, dtype and micro-batch budget the plan assumes are the trainer's own."""
    from gemtune.train.trainer import micro_batch_budget

    cfg = TrainConfig()
    assert plan(SIZES["9b"])["loss_chunk"] == cfg.loss_chunk == 256
    gpu = resolve_policy(cfg, "cuda", native_bf16=True)
    kw = trainer_defaults()
    assert kw["grad_ckpt"] is gpu.gradient_checkpointing is True
    assert kw["act_bytes"] == 2.0 and gpu.dtype == "bfloat16"
    assert kw["loss_chunk"] == cfg.loss_chunk
    assert kw["micro_batch_tokens"] == micro_batch_budget(cfg, torch.device("cuda")) is None
    cpu_kw, cpu = config_plan(cfg, device="cpu", native_bf16=False)
    assert (cpu_kw["grad_ckpt"], cpu_kw["act_bytes"], cpu["dtype"]) == (False, 4.0, "float32")
    assert cpu_kw["micro_batch_tokens"] == micro_batch_budget(cfg, torch.device("cpu")) == 1024
    # a config's own loss chunk, checkpointing and budget reach the plan
    odd = TrainConfig(loss_chunk=64, gradient_checkpointing=False, micro_batch_tokens=512, batch_size=3, max_len=300)
    kw, _ = config_plan(odd)
    assert (kw["loss_chunk"], kw["grad_ckpt"], kw["micro_batch_tokens"], kw["batch"], kw["seq_len"]) == \
        (64, False, 512, 3, 300)
    # the CLI without a config: the trainer's defaults, at the documented 2048 x 1
    _, p, used = plan_run(params="9b", settings={})
    assert (p["seq_len"], p["batch"], p["gradient_checkpointing"], p["loss_chunk"], p["act_bytes"]) == \
        (2048, 1, True, cfg.loss_chunk, 2.0)
    _, q, _ = plan_run(params="9b", settings={"method": "qlora"})
    assert q["breakdown"]["weights_gib"] < p["breakdown"]["weights_gib"] / 2.5  # qlora's own weight bytes


def test_loss_term_follows_the_trainers_chunk():
    """One chunk of logits is alive at a time: the logits term grows with the chunk, not with the supervised
    tokens beyond it."""
    s = SIZES["9b"]
    small = plan(s, seq_len=4096, loss_chunk=256)["breakdown"]["logits_gib"]
    big = plan(s, seq_len=4096, loss_chunk=1024)["breakdown"]["logits_gib"]
    per_logit = 4 + 2  # fp32 logits + their bf16 copy (no softcap)
    assert abs((big - small) * 2 ** 30 - 768 * s.vocab * per_logit) < 1e6


def _saved_bytes(shape: dict, layers: int, dtype, mlp: bool, seq: int = 32) -> int:
    """Bytes autograd saves in one forward of a Gemma 4 text model built as the trainer builds it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from gpu_check import gemma4_text_config
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from gemtune.train.trainer import build_lora_config

    cfg = gemma4_text_config({**shape, "layers": layers, "vocab": 512})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    tc = TrainConfig(preset="structured" if mlp else "default", lora={"r": 16})
    model = get_peft_model(model, build_lora_config(model, tc), autocast_adapter_dtype=True)
    model.train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen.setdefault(st._cdata, st.nbytes())
        return t

    ids = torch.randint(3, 500, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model.model.model(input_ids=ids, position_ids=torch.arange(seq)[None], use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("dtype,mlp", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
def test_activation_term_matches_what_autograd_saves(dtype, mlp):
    """Per decoder layer (an interior sliding layer and an interior full-attention one, Gemma 4 layout), the plan's
    bytes per token are within 10 % of what autograd saves for the trainer's LoRA model."""
    shape = dict(hidden=96, heads=4, kv_heads=2, head_dim=40, intermediate=352)
    s = Shape(0, 1, 96, 4, 2, 40, 352, 512, global_head_dim=80)
    act = 2.0 if dtype == torch.bfloat16 else 4.0
    seq = 32
    sliding = (_saved_bytes(shape, 3, dtype, mlp, seq) - _saved_bytes(shape, 2, dtype, mlp, seq)) / seq
    full = (_saved_bytes(shape, 7, dtype, mlp, seq) - _saved_bytes(shape, 6, dtype, mlp, seq)) / seq
    for measured, is_full in ((sliding, False), (full, True)):
        est = layer_activation_bytes(s, act_bytes=act, mlp=mlp, rank=16, full=is_full)
        assert abs(est - measured) / measured < 0.10, (dtype, mlp, is_full, est, measured)


def test_weights_plus_activations_match_a_measured_tiny_model():
    """weights + activations of the plan for a small 6-layer Gemma 4 (bf16, no checkpointing) against the bytes of
    its parameters plus what autograd saved in one forward: within 15 %."""
    shape = dict(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=512)
    seq = 64
    saved = _saved_bytes(shape, 6, torch.bfloat16, False, seq)
    s = Shape(0, 6, 128, 4, 2, 32, 512, 512, global_head_dim=64, full_layers=1)
    p = plan(s, seq_len=seq, batch=1, grad_ckpt=False, act_bytes=2.0)
    est = p["breakdown"]["activations_gib"] * 2 ** 30
    assert abs(est - saved) / saved < 0.15, (est, saved)


def test_plan_module_copies_no_trainer_number():
    """The chunk default is the trainer's config default, not a literal."""
    assert planmod.LOSS_CHUNK is TrainConfig.model_fields["loss_chunk"].default
