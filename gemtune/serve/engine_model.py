"""The engine's forward pass: Gemma 3 / Gemma 4 decoder layers over a flat batch of tokens and our own KV cache.

We reuse the Hugging Face modules' weights *and* their norms, MLPs, rotary tables and embedding (so numerics and
Gemma quirks — the embedding scale, q/k norms, `query_pre_attn_scalar`, Gemma 4's v-norm, per-layer inputs, KV
sharing, MoE blocks, final logit softcapping — stay exactly Hugging Face's), and replace only what generation needs
to be fast and batched:

- tokens of all running sequences travel as one flat [N, hidden] tensor, so every linear layer is one GEMM for the
  whole step (decode rows and prefill chunks together), with per-token LoRA deltas (`lora_batch`);
- attention runs over the preallocated `KVCache`: decode rows (one query each) in one batched matmul over a
  view of the cache, prefill chunks in one padded batched matmul;
- the LM head runs only on the last token of each row that needs a next token, in a way chosen from what the
  hardware computes natively (`head_path`, below).

Head paths (`ModelRunner.head_path`, reported in `Engine.stats()["compute"]`):
- "bf16-screen": an fp32 model on hardware with native bf16 (AVX512-BF16/AMX, or a GPU): greedy rows are screened
  with a bf16 GEMM and confirmed in fp32 (`engine_sampling.ScreenedHead`, exact);
- "fp16-screen": an fp32 model on a CPU where bf16 is only emulated (AVX2-only CPUs, or torch capped below AVX-512
  by `ATEN_CPU_CAPABILITY` / `ONEDNN_MAX_CPU_ISA`; an emulated bf16 GEMM ran 3-4x slower than fp32 there): greedy
  rows are screened with FBGEMM's fp16-weight GEMM (fp32 activations and FMAs, half the bytes; ~2x faster than the
  fp32 head there) and confirmed in fp32 (exact, as above). No bf16 tensor reaches a matmul;
- "fp32": the plain fp32 head, where neither screen runs (no FBGEMM, or `screen_head=False`);
- "bf16": a bf16 model (asked for explicitly): its own head, in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from gemtune.base import device as device_policy
from gemtune.errors import UserError
from gemtune.serve.kv_cache import KVCache, LayerKV, slot_positions, visibility
from gemtune.serve.lora_batch import LoRAContext, LoRAPack, MultiLoRALinear, wrap_linears
from gemtune.serve.threads import ThreadPolicy


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 math runs in hardware on `device` (a GPU with bf16, or a CPU with AVX512-BF16/AMX that torch
    may use); read through the module so tests can patch `gemtune.base.device.cpu_has_native_bf16`."""
    if device.type == "cuda":
        return device_policy.gpu_supports_bf16(device)
    if device.type == "cpu":
        return bool(device_policy.cpu_has_native_bf16())
    return False


def text_parts(model) -> tuple[nn.Module, nn.Module, object, str]:
    """(text decoder, lm_head, text config, module-name prefix) for text-only and multimodal Gemma models."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner.language_model, model.lm_head, model.config.get_text_config(), "model.language_model"
    if inner is not None and hasattr(inner, "layers"):
        return inner, model.lm_head, model.config.get_text_config(), "model"
    raise UserError(f"unsupported model class {type(model).__name__}: expected a Gemma causal LM", field="model")


@dataclass
class Step:
    """One forward's worth of work, built by the scheduler.

    Tokens are ordered: the D decode rows' single tokens first (row i <-> token i), then each prefill chunk in turn.
    """

    ids: torch.Tensor  # [N] token ids
    pos: torch.Tensor  # [N] positions
    rows: torch.Tensor  # [N] cache row of each token
    n_decode: int  # D
    decode_len: torch.Tensor  # [D] row lengths after this step
    pre_rows: torch.Tensor  # [P] cache rows of the prefill chunks
    pre_start: torch.Tensor  # [P] first position of each chunk
    pre_len: torch.Tensor  # [P] chunk lengths
    logit_idx: torch.Tensor  # [M] flat token indices whose next token we need
    adapter_keys: list[str | None]  # [N] adapter key per token
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src row, dst row, n): shared prompt prefix


class ModelRunner:
    """Owns the base model (wrapped in place), the KV cache and the per-step attention bookkeeping."""

    def __init__(self, model, *, max_batch: int, max_model_len: int, prefill_chunk: int = 256,
                 screen_head: bool = True, prepack: bool = True):
        self.model = model.requires_grad_(False)
        self.text, self.lm_head, self.config, prefix = text_parts(model)
        self.family = self.config.model_type
        if getattr(self.config, "use_bidirectional_attention", None) == "all":
            raise UserError("bidirectional (encoder-style) Gemma checkpoints cannot generate", field="model")
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.prefill_chunk = min(prefill_chunk, max_model_len)
        self.threads = ThreadPolicy(self.device)
        self.lora = LoRAContext(self.threads)
        self.linears: dict[str, MultiLoRALinear] = wrap_linears(self.text.layers, f"{prefix}.layers", self.lora)
        self.prepacked = prepack and self.device.type == "cpu" and all([m.prepack() for m in self.linears.values()])
        self.is_gemma4 = self.family.startswith("gemma4")
        self.layer_types: list[str] = list(self.config.layer_types)
        self.specs = self._layer_specs()
        self.cache = KVCache(self.specs, max_batch, self.dtype)
        self.rope = self._rope_tables()
        self.has_ple = bool(getattr(self.config, "hidden_size_per_layer_input", 0)) and self.is_gemma4
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.native_bf16 = native_bf16(self.device)
        self.screened_head = self.head_packed = None
        self.head_path = self._head_path(screen_head)
        if self.head_path == "bf16" and self.prepacked:  # a bf16 model's head: same numbers, blocked layout
            self.head_packed = torch.ops.mkldnn._reorder_linear_weight(self.lm_head.weight.detach(), None)
        if self.head_path.endswith("-screen"):
            from gemtune.serve.engine_sampling import ScreenedHead

            try:
                self.screened_head = ScreenedHead(self.lm_head.weight, self.softcap, threads=self.threads,
                                                  kind=self.head_path.removesuffix("-screen"))
            except ValueError:  # weights the screen cannot hold exactly (beyond fp16's range): the plain head
                self.head_path = "fp32"

    def _head_path(self, screen_head: bool) -> str:
        """The LM head's path for this model's dtype on this hardware (see the module docstring)."""
        if self.dtype == torch.bfloat16:
            return "bf16"
        if self.dtype == torch.float32 and screen_head and self.native_bf16:
            return "bf16-screen"
        if self.dtype == torch.float32 and screen_head and self.device.type == "cpu":
            from gemtune.serve.engine_sampling import fp16_screen_available

            if fp16_screen_available():
                return "fp16-screen"
        return "fp32" if self.dtype == torch.float32 else str(self.dtype).removeprefix("torch.")

    def compute(self) -> dict:
        """What the engine computes with, and why: dtype, head path and the CPU's capabilities."""
        d = {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "lm_head": self.head_path,
             "native_bf16": self.native_bf16, "prepacked_linears": bool(self.prepacked)}
        if self.device.type == "cpu":
            d.update(cpu=device_policy.cpu_name(), cpu_capability=device_policy.cpu_capability())
        return d

    # ------------------------------------------------------------------------------------------------ set-up
    def _layer_specs(self) -> list[LayerKV]:
        specs: list[LayerKV] = []
        sources = self._kv_sources()
        for i, layer in enumerate(self.text.layers):
            attn = layer.self_attn
            src = sources[i]
            src_attn = self.text.layers[src].self_attn
            kv_heads = src_attn.k_proj.out_features // src_attn.head_dim
            window = attn.sliding_window if getattr(attn, "is_sliding", False) else None
            size = self.max_model_len if window is None else min(self.max_model_len, window + self.prefill_chunk)
            specs.append(LayerKV(kv_heads=kv_heads, head_dim=attn.head_dim, size=size, window=window, source=src))
        return specs

    def _kv_sources(self) -> list[int]:
        """Gemma 4 KV sharing: a 'reuse' layer reads the keys of the last non-shared layer of its type."""
        n = len(self.text.layers)
        if not self.is_gemma4 or not getattr(self.config, "num_kv_shared_layers", 0):
            return list(range(n))
        modes = self.config.kv_sharing_modes
        if all(m == "reuse" for m in modes):
            raise UserError("a model whose every layer reuses another's KV cannot generate", field="num_kv_shared_layers")
        producers = {self.layer_types[i]: i for i, m in enumerate(modes) if m == "store"}
        return [producers[self.layer_types[i]] if m == "reuse" else i for i, m in enumerate(modes)]

    @torch.inference_mode()
    def _rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for every position, computed by the model's own rotary module (identical numbers)."""
        pos = torch.arange(self.max_model_len, device=self.device)[None]
        dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
        out = {}
        for lt in sorted(set(self.layer_types)):
            cos, sin = self.text.rotary_emb(dummy, pos, lt)
            out[lt] = (cos[0], sin[0])
        return out

    # ------------------------------------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, step: Step, pack: LoRAPack) -> torch.Tensor:
        """Run all layers over the step's tokens, writing their K/V; return final hidden states at `logit_idx`."""
        self.lora.set(pack, step.adapter_keys, self.dtype)
        try:
            ctx = self._attention_context(step)
            h = self.text.embed_tokens(step.ids)
            ple = self._per_layer_inputs(step.ids, h) if self.has_ple else None
            for i, layer in enumerate(self.text.layers):
                h = self._layer(i, layer, h, ctx, None if ple is None else ple[:, i, :])
            return self.text.norm(h[step.logit_idx])
        finally:
            self.lora.clear()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.threads.wide():
            if self.head_packed is not None:
                logits = torch.ops.mkldnn._linear_pointwise(hidden, self.head_packed, None, "none", [], "")
            else:
                logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _per_layer_inputs(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        ple = self.text.get_per_layer_inputs(ids[None], h[None])
        return self.text.project_per_layer_inputs(h[None], ple)[0]

    def _attention_context(self, step: Step) -> dict:
        """Per step: rope cos/sin per layer type, and per cache kind the write slots and attention masks."""
        ctx: dict = {"rope": {}, "kinds": {}, "step": step}
        for lt, (cos, sin) in self.rope.items():
            ctx["rope"][lt] = (cos[step.pos][:, None, :], sin[step.pos][:, None, :])
        D, P = step.n_decode, len(step.pre_rows)
        pre_idx = pre_valid = None
        if P:
            tmax = int(step.pre_len.max())
            t = torch.arange(tmax)
            pre_valid = t[None, :] < step.pre_len[:, None]  # [P, T]
            offsets = D + torch.cumsum(step.pre_len, 0) - step.pre_len
            pre_idx = torch.where(pre_valid, offsets[:, None] + t[None, :], 0)  # flat token index, 0 for padding
            ctx["pre_idx"], ctx["pre_valid"], ctx["pre_flat"] = pre_idx, pre_valid, pre_idx[pre_valid]
        neg = torch.finfo(self.dtype).min
        for spec in self.specs:
            if spec.kind in ctx["kinds"]:
                continue
            size, window = spec.kind
            kind = {"slots": torch.remainder(step.pos, size)}
            if D:
                span = int(min(step.decode_len.max(), size))
                kpos = slot_positions(step.decode_len, size, span)  # [D, span]
                ok = visibility((step.decode_len - 1)[:, None], kpos, window)
                kind["dec_span"] = span
                kind["dec_bias"] = torch.zeros(ok.shape, dtype=self.dtype).masked_fill_(~ok, neg)[:, None, None, :]
            if P:
                end = step.pre_start + step.pre_len
                span = int(min(end.max(), size))
                kpos = slot_positions(end, size, span)  # [P, span]
                qpos = step.pre_start[:, None] + torch.arange(pre_idx.shape[1])[None, :]  # [P, T]
                ok = visibility(qpos[:, :, None], kpos[:, None, :], window)  # [P, T, span]
                ok |= ~pre_valid[:, :, None] & (torch.arange(span) == 0)  # padding queries see one key: no NaN
                kind["pre_span"] = span
                kind["pre_bias"] = torch.zeros(ok.shape, dtype=self.dtype).masked_fill_(~ok, neg)
            ctx["kinds"][spec.kind] = kind
        return ctx

    def _attend(self, i: int, q: torch.Tensor, scaling: float, ctx: dict) -> torch.Tensor:
        """q: [N, heads, head_dim] for the step's tokens -> [N, heads * head_dim], over layer i's cache."""
        step: Step = ctx["step"]
        spec = self.specs[i]
        kind = ctx["kinds"][spec.kind]
        kc, vc = self.cache.k[i], self.cache.v[i]
        N, H, Dh = q.shape
        KVH = spec.kv_heads
        G = H // KVH
        out = q.new_empty(N, H * Dh)
        D = step.n_decode
        if D:  # strided reads of the cache rows: memory-bound, faster on every thread
            span = kind["dec_span"]
            k, v = kc[:D, :, :span], vc[:D, :, :span]
            with self.threads.wide():
                s = torch.matmul(q[:D].view(D, KVH, G, Dh), k.transpose(-1, -2))
            s = s.mul_(scaling).add_(kind["dec_bias"])
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            with self.threads.wide():
                out[:D] = torch.matmul(p, v).reshape(D, H * Dh)
        if len(step.pre_rows):
            with self.threads.wide():
                self._attend_prefill(q, kc, vc, kind, ctx, scaling, out)
        return out

    def _attend_prefill(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, kind: dict, ctx: dict,
                        scaling: float, out: torch.Tensor) -> None:
        """Prefill chunks: one padded batched matmul over [P chunks, kv heads, group x chunk length, span]."""
        step: Step = ctx["step"]
        H, Dh = q.shape[1], q.shape[2]
        KVH = kc.shape[1]
        G = H // KVH
        span = kind["pre_span"]
        P, T = ctx["pre_idx"].shape
        qp = q[ctx["pre_idx"]].view(P, T, KVH, G, Dh).permute(0, 2, 3, 1, 4).reshape(P, KVH, G * T, Dh)
        k, v = kc[step.pre_rows, :, :span], vc[step.pre_rows, :, :span]
        s = torch.matmul(qp, k.transpose(-1, -2)) * scaling  # [P, KVH, G*T, span]
        bias = kind["pre_bias"][:, None, None].expand(P, 1, G, T, span).reshape(P, 1, G * T, span)
        p = torch.softmax(s + bias, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(p, v).view(P, KVH, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(P, T, H * Dh)
        out[ctx["pre_flat"]] = o[ctx["pre_valid"]]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x) * sin

    def _layer(self, i: int, layer, h: torch.Tensor, ctx: dict, per_layer_input) -> torch.Tensor:
        attn = layer.self_attn
        N, Dh = h.shape[0], attn.head_dim
        cos, sin = ctx["rope"][self.layer_types[i]]
        residual = h
        x = layer.input_layernorm(h)
        q = attn.q_norm(attn.q_proj(x).view(N, -1, Dh))
        q = self._rope(q, cos, sin)
        if self.specs[i].source == i:
            k = attn.k_proj(x).view(N, -1, Dh)
            if self.is_gemma4:
                v = attn.v_proj(x).view(N, -1, Dh) if attn.v_proj is not None else k
                v = attn.v_norm(v)
            else:
                v = attn.v_proj(x).view(N, -1, Dh)
            k = self._rope(attn.k_norm(k), cos, sin)
            slots = ctx["kinds"][self.specs[i].kind]["slots"]
            self.cache.write(i, ctx["step"].rows, slots, k, v)
            for src, dst, n in ctx["step"].copies:
                self.cache.copy_prefix(i, src, dst, n)
        o = attn.o_proj(self._attend(i, q, attn.scaling, ctx))
        h = residual + layer.post_attention_layernorm(o)
        residual = h
        x = layer.mlp(layer.pre_feedforward_layernorm(h))
        if getattr(layer, "enable_moe_block", False):
            x1 = layer.post_feedforward_layernorm_1(x)
            _, top_w, top_i = layer.router(residual)
            x2 = layer.experts(layer.pre_feedforward_layernorm_2(residual), top_i, top_w)
            x = x1 + layer.post_feedforward_layernorm_2(x2)
        h = residual + layer.post_feedforward_layernorm(x)
        if per_layer_input is not None and getattr(layer, "hidden_size_per_layer_input", 0):
            residual = h
            x = layer.act_fn(layer.per_layer_input_gate(h)) * per_layer_input
            h = residual + layer.post_per_layer_input_norm(layer.per_layer_projection(x))
        if self.is_gemma4:
            h = h * layer.layer_scalar
        return h
