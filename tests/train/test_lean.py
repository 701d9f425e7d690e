"""The memory-lean training path (gemtune.train.lean) against stock PEFT/transformers autograd."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from gemtune.base.families import GEMMA3_TEXT, GEMMA4_TEXT, family_of, target_modules
from gemtune.base.tiny import tiny_model, tiny_tokenizer
from gemtune.train.collate import IGNORE, Example, collate, encode_record, pack
from gemtune.train.lean import _LoRALinear, install
from gemtune.train.loss import SupervisedLM

RECS = [
    {"messages": [{"role": "user", "content": "route: card never arrived"}, {"role": "assistant", "content": "card_arrival"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a longer answer here"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
]


def _peft(family, dropout=0.0, mlp=False, seed=3):
    model = tiny_model(family, seed=seed)
    modules = ("q_proj", "k_proj", "v_proj", "o_proj") + (("gate_proj",) if mlp else ())
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=target_modules(family_of(model), modules),
                     task_type="CAUSAL_LM")
    torch.manual_seed(0)
    m = get_peft_model(model, cfg)
    with torch.no_grad():  # B starts at zero; make the LoRA path matter
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    return m


def _batch(family):
    tok = tiny_tokenizer(family)
    fam = GEMMA3_TEXT if family == "gemma3" else GEMMA4_TEXT
    return collate([encode_record(r, tok, fam, 512) for r in RECS], tok.pad_token_id)


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    s, n = SupervisedLM(model)(batch["input_ids"], batch["labels"], batch["position_ids"])
    (s / n).backward()
    return float(s / n), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_lean_kernels_equal_stock_autograd_in_fp32(family):
    stock = _peft(family)
    lean = copy.deepcopy(stock)
    rep = install(lean, bf16_storage=False)
    assert rep.lora_layers == sum(1 for n, _ in lean.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
    assert rep.mlps > 0 and not rep.refused
    b = _batch(family)
    l1, g1 = _loss_and_grads(stock, b)
    l2, g2 = _loss_and_grads(lean, b)
    assert abs(l1 - l2) < 1e-5
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_bf16_storage_is_fp32_math_on_bf16_rounded_weights(family):
    stock = _peft(family)
    lean = copy.deepcopy(stock)
    rep = install(lean, bf16_storage=True)
    lm = lean.base_model.model
    emb = lm.get_input_embeddings()
    assert emb.weight.dtype == torch.bfloat16
    assert lm.get_output_embeddings().weight is emb.weight  # still tied
    assert rep.bytes_saved > 0
    for n, p in lean.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n  # LoRA weights train in fp32
    # the reference: stock autograd on weights rounded to bf16 and back
    with torch.no_grad():
        for n, p in stock.named_parameters():
            if not p.requires_grad and p.dim() == 2:
                p.copy_(p.to(torch.bfloat16).float())
    b = _batch(family)
    l1, g1 = _loss_and_grads(stock, b)
    l2, g2 = _loss_and_grads(lean, b)
    assert abs(l1 - l2) < 1e-4
    for k in g1:  # the MLP saves gate/up in bf16: gradients agree to bf16 rounding, not bit for bit
        rel = (g1[k] - g2[k]).norm() / g1[k].norm()
        assert rel < 2e-2, (k, float(rel))


def test_lora_dropout_matches_the_reference_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, requires_grad=True)
    w = torch.randn(10, 12).to(torch.bfloat16)
    a = torch.randn(4, 12, requires_grad=True)
    bb = torch.randn(10, 4, requires_grad=True)
    torch.manual_seed(5)
    y = _LoRALinear.apply(x, w, None, a, bb, 2.0, 0.25)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    torch.manual_seed(5)
    mask = torch.rand_like(x.detach().reshape(-1, 12)) >= 0.25
    assert 0 < int((~mask).sum()) < mask.numel()  # some dropped, some kept
    x2, a2, b2 = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_(), bb.detach().clone().requires_grad_()
    xd = x2.reshape(-1, 12) * mask / 0.75
    ref = (x2.reshape(-1, 12) @ w.float().t() + 2.0 * (xd @ a2.t()) @ b2.t()).reshape(2, 7, 10)
    (ref * gy).sum().backward()
    assert torch.allclose(y, ref, atol=1e-5)
    for g, r in ((x.grad, x2.grad), (a.grad, a2.grad), (bb.grad, b2.grad)):
        assert torch.allclose(g, r, atol=1e-4)


def test_mismatching_module_keeps_the_stock_path(monkeypatch):
    import gemtune.train.lean as lean_mod

    model = _peft("gemma3")
    monkeypatch.setattr(lean_mod, "_mlp_forward", lambda self, x: self.down_proj(self.up_proj(x)))  # wrong on purpose
    rep = install(model, bf16_storage=True)
    assert rep.mlps == 0 and len(rep.refused) > 0
    mlp = model.base_model.model.model.layers[0].mlp
    assert mlp.gate_proj.weight.dtype == torch.float32  # refused modules keep their fp32 weights
    assert "forward" not in mlp.__dict__


def test_install_does_not_move_the_rng_stream():
    model = _peft("gemma3")
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    install(model)
    assert torch.equal(torch.rand(3), expected)


def test_pack_balances_rows_and_keeps_every_token():
    exs = [Example(str(i), list(range(3, 3 + n)), [IGNORE] * (n - 1) + [5]) for i, n in
           enumerate([90, 80, 60, 50, 40, 30, 20, 10])]
    b = pack(exs, 0, max_len=256)
    assert b["input_ids"].shape == (2, 190)  # 380 tokens over two rows of 190, not 256 + 124
    assert int((b["labels"] != IGNORE).sum()) == 8
    real = sum(len(e.input_ids) for e in exs)
    assert int((b["input_ids"] != 0).sum()) == real
    # positions restart at every example start: one 0 per example plus one per padded tail
    assert int((b["position_ids"] == 0).sum()) >= 8
    one = pack(exs[:1], 0, max_len=90)
    assert one["input_ids"].shape == (1, 90)
    assert pack(exs, 0, max_len=100)["input_ids"].shape[0] >= 4  # nothing exceeds max_len
