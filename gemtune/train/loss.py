"""Loss from hidden states at supervised positions only.

Gemma's lm_head maps to a 262,144-token vocabulary: on a routing example with a 60-token prompt and a 5-token
answer, computing logits for every position spends most of the step on logits nobody uses. We run the transformer
body, gather the hidden states whose next token is supervised, and only then apply lm_head — in chunks, with the
input gradient computed in the forward pass (fused linear + cross-entropy) so at most one chunk of logits is
alive at a time and none is kept for backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gemtune.train.collate import IGNORE
from gemtune.train.lean import linear, upcast


def _causal_lm(model):
    """The transformers *ForCausalLM / *ForConditionalGeneration under PEFT wrappers."""
    m = model
    for attr in ("base_model", "model"):
        if type(m).__name__.startswith("Peft") and hasattr(m, attr):
            m = getattr(m, attr)
    if type(m).__name__ == "LoraModel":
        m = m.model
    return m


class _FusedLinearCE(torch.autograd.Function):
    """Cross-entropy of `h @ W.T` whose input gradient is computed in the forward pass.

    The logits of a chunk live only inside forward; backward is a scale of the saved [n, hidden] gradient. The
    input gradient `(softmax - onehot) @ W` is accumulated over vocabulary blocks: one GEMM with K = 262,144 makes
    the BLAS pack (and keep) a copy of the whole 671 MB lm_head, block-wise GEMMs only pack a block.
    Only for a frozen W (LoRA never trains the tied embeddings); W may be stored in bf16 (see `lean`), the math
    runs in h's dtype.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, vblock):
        with torch.no_grad():
            logits = linear(h, weight).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            # log-sum-exp and softmax in place: no second [n, vocab] buffer at the step's memory peak
            picked = logits.gather(1, targets[:, None]).squeeze(1)
            top = logits.amax(dim=-1)
            g = logits.sub_(top[:, None]).exp_()
            total = g.sum(dim=-1)
            loss = (top + total.log() - picked).sum()
            g.div_(total[:, None])  # softmax
            g[torch.arange(len(targets), device=g.device), targets] -= 1.0
            if softcap:
                g.mul_(1.0 - capped * capped)
            g = g.to(h.dtype)
            grad_h = torch.zeros_like(h)
            for i in range(0, weight.shape[0], vblock):  # a bf16-stored weight is upcast one block at a time
                grad_h.addmm_(g[:, i:i + vblock], upcast(weight[i:i + vblock], h.dtype))
        ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out, None, None, None, None


VOCAB_BLOCK = 4096  # rows of lm_head per GEMM: a bf16-stored block upcasts into ~10 MB that stays in cache


def _chunk_ce(h: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if not weight.requires_grad:
        return _FusedLinearCE.apply(h, weight, t, softcap, VOCAB_BLOCK)
    logits = F.linear(h, weight).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, t, reduction="sum")


class SupervisedLM(nn.Module):
    """Wraps a (PEFT) causal LM so forward returns (sum of token losses, supervised token count).

    Being an nn.Module that accelerate can `prepare`, DDP/FSDP/DeepSpeed see a normal forward.
    """

    def __init__(self, model, chunk: int = 1024):
        super().__init__()
        self.model = model
        self.chunk = chunk
        lm = _causal_lm(model)
        self._softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)

    def forward(self, input_ids, labels, position_ids=None):
        lm = _causal_lm(self.model)
        # batches are built on the CPU; accelerate moves the model, not its inputs
        device = lm.get_input_embeddings().weight.device
        input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if position_ids is not None:
            position_ids = position_ids.to(device, non_blocking=True)
        out = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state
        targets = labels[:, 1:]
        sel = targets != IGNORE
        h = hidden[:, :-1][sel]
        t = targets[sel]
        n = t.numel()
        if n == 0:
            return hidden.sum() * 0.0, n
        weight = lm.get_output_embeddings().weight
        if n <= self.chunk:
            return _chunk_ce(h, t, weight, self._softcap), n
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, n, self.chunk):
            if weight.requires_grad:  # plain autograd path: recompute the chunk's logits in backward
                total = total + checkpoint(_chunk_ce, h[i:i + self.chunk], t[i:i + self.chunk], weight,
                                           self._softcap, use_reentrant=False)
            else:  # fused path keeps no logits at all
                total = total + _chunk_ce(h[i:i + self.chunk], t[i:i + self.chunk], weight, self._softcap)
        return total, n


def reference_loss(model, batch) -> torch.Tensor:
    """Mean token loss the standard way (full logits, HF shift) — used by tests to check SupervisedLM."""
    lm = _causal_lm(model)
    logits = lm(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE)
