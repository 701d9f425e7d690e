"""Memory-lean LoRA training on a frozen base: bf16 storage for frozen weights, fp32 compute, small saved state.

Where a plain PEFT step spends memory on Gemma 3 270M (fp32, 8 routing examples, measured with
`saved_tensors_hooks`): 1.07 GB of fp32 weights, then ~1.3 MB of saved activations per token. A fifth of those are
LoRA dropout copies (each of q/k/v/o keeps its own dropped-out fp32 copy of the input plus an fp32 mask) and a
third is the MLP (gate, act(gate) and up, all fp32). This module replaces, during training only:

* frozen Linear/Embedding weights → bf16 **storage**; every matmul still runs in fp32 on an upcast copy that lives
  for one op (per vocabulary block for the 262k-row lm_head). Half the weight memory; the loss moves by the bf16
  rounding of the weights only (bench/train.py reports eval loss against an fp32 peer).
* PEFT `lora.Linear` forward → one autograd function that saves the input once (shared by q/k/v), a bool dropout
  mask and the rank-r projection, and computes the base matmul without saving anything for it.
* Gemma's `down(act(gate(x)) * up(x))` MLP → one function that saves gate and up only and recomputes the
  activation (elementwise) in backward.

Every replacement is checked on the live module against the original forward and backward before it is
installed; a module that does not match is left alone. Conversions stream the weights from the memory-mapped
checkpoint in blocks and drop each block's file pages from the process as soon as it is copied, so the fp32 file
never becomes resident as a whole.
"""

from __future__ import annotations

import ctypes
import threading
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

_UPCAST_BLOCK = 1 << 21  # elements per upcast block for very large weights (the 262k-row lm_head): 8 MB in fp32
_MADV_DONTNEED = 4
_PAGE = 4096


_scratch = threading.local()
_trim = {"every": 0, "calls": 0, "fn": None}


def _maybe_trim() -> None:
    """Give freed heap pages back every third of the model (forward and backward). A step frees and reallocates gigabytes
    of activations in mixed sizes; glibc keeps the holes resident, which lifts the peak by ~0.3 GB. Handing every
    allocation to mmap instead would cost a page fault per 4 KB — 40-70 % slower steps; a trim every half model
    costs a few ms (measured: no change in step time, peak -0.3 GB)."""
    t = _trim
    if t["every"] <= 0 or t["fn"] is None:
        return
    t["calls"] += 1
    if t["calls"] % t["every"] == 0:
        t["fn"](0)


def upcast(w: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """`w` in `dtype`. A low-precision w is copied into a per-thread scratch buffer reused across calls: every
    frozen matmul of a step upcasts its weight twice (forward and backward), and fresh allocations for those copies
    would be a gigabyte of page faults per step. The result is only valid until the next `upcast` of the same
    shape on this thread: use it at once, never return or save it."""
    if w.dtype == dtype:
        return w
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (tuple(w.shape[1:]), dtype, w.device)
    buf = bufs.get(key)
    if buf is None or buf.shape[0] < w.shape[0]:  # one buffer per trailing shape, grown to the most rows seen
        buf = bufs[key] = torch.empty(w.shape, dtype=dtype, device=w.device)
    out = buf[:w.shape[0]]
    out.copy_(w)
    return out


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) in x's dtype; a low-precision w is upcast, in row blocks when it is large."""
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    if w.numel() <= _UPCAST_BLOCK:
        return F.linear(x, upcast(w, x.dtype), None if b is None else b.to(x.dtype))
    rows = max(1, _UPCAST_BLOCK // w.shape[1])
    out = x.new_empty((*x.shape[:-1], w.shape[0]))
    for i in range(0, w.shape[0], rows):
        out[..., i:i + rows] = F.linear(x, upcast(w[i:i + rows], x.dtype))
    if b is not None:
        out += b.to(x.dtype)
    return out


def linear_t(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g @ w (the input gradient of a linear layer) with w upcast to g's dtype, in row blocks when large."""
    if w.dtype == g.dtype:
        return g @ w
    if w.numel() <= _UPCAST_BLOCK:
        return g @ upcast(w, g.dtype)
    rows = max(1, _UPCAST_BLOCK // w.shape[1])
    out = g.new_zeros((*g.shape[:-1], w.shape[1]))
    for i in range(0, w.shape[0], rows):
        out += g[..., i:i + rows] @ upcast(w[i:i + rows], g.dtype)
    return out


# ---------------------------------------------------------------- autograd functions

class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W: saves W (no copy), nothing else."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(w)
        return linear(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        (w,) = ctx.saved_tensors
        return (linear_t(gy, w) if ctx.needs_input_grad[0] else None), None, None


class _LoRALinear(torch.autograd.Function):
    """y = x W^T + b + scale * (drop(x) A^T) B^T with W frozen, A and B trained.

    Saves x (q/k/v share it), the dropout mask as bool, the rank-r projection; never an fp32 dropped-out copy."""

    @staticmethod
    def forward(ctx, x, w, b, a, bb, scale, p):
        x2 = x.reshape(-1, x.shape[-1])
        y = linear(x2, w, b)
        if p > 0:
            mask = torch.rand_like(x2) >= p
            xd = x2 * mask * (1.0 / (1.0 - p))
        else:
            mask, xd = None, x2
        h = xd @ a.t()
        y.addmm_(h, bb.t(), alpha=scale)
        ctx.save_for_backward(x2, mask, h, w, a, bb)
        ctx.scale, ctx.p, ctx.shape = scale, p, x.shape
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, mask, h, w, a, bb = ctx.saved_tensors
        gy = gy.reshape(-1, gy.shape[-1])
        scale, p = ctx.scale, ctx.p
        gh = (gy @ bb).mul_(scale)                              # [n, r]
        grad_b = (gy.t() @ h).mul_(scale) if ctx.needs_input_grad[4] else None
        grad_a = grad_x = None
        if ctx.needs_input_grad[3]:
            xd = x2 * mask * (1.0 / (1.0 - p)) if mask is not None else x2
            grad_a = gh.t() @ xd
        if ctx.needs_input_grad[0]:
            gl = gh @ a                                          # [n, in]
            if mask is not None:
                gl.mul_(mask).mul_(1.0 / (1.0 - p))
            grad_x = linear_t(gy, w).add_(gl).reshape(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


class _GatedMLP(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) with frozen weights: saves gate and up (in `save_dtype`: bf16 halves the MLP's
    share of the step's memory for a 2^-9 relative rounding of two gradient factors), recomputes act in backward."""

    @staticmethod
    def forward(ctx, x, wg, wu, wd, act, save_dtype):
        g = linear(x, wg)
        u = linear(x, wu)
        y = linear(act(g) * u, wd)
        ctx.save_for_backward(g.to(save_dtype), u.to(save_dtype), wg, wu, wd)
        ctx.act = act
        _maybe_trim()
        return y

    @staticmethod
    def backward(ctx, gy):
        g, u, wg, wu, wd = ctx.saved_tensors
        g, u = g.to(gy.dtype), u.to(gy.dtype)
        gp = linear_t(gy, wd)                                    # d(act(g) * u)
        with torch.enable_grad():
            g_ = g.requires_grad_(True)
            a = ctx.act(g_)
            (grad_g,) = torch.autograd.grad(a, g_, gp * u)
        grad_u = gp.mul_(a.detach())
        del a
        grad_x = linear_t(grad_g, wg).add_(linear_t(grad_u, wu))
        _maybe_trim()
        return grad_x, None, None, None, None, None


# ---------------------------------------------------------------- forwards installed on modules

def _frozen_linear_forward(self, x):
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, self.weight, self.bias)
    return linear(x, self.weight, self.bias)


def _embedding_forward(self, input_ids):
    out = F.embedding(input_ids, self.weight, self.padding_idx).float()
    scale = getattr(self, "embed_scale", None)
    return out * scale.float() if isinstance(scale, torch.Tensor) else out


def _mlp_forward(self, x):
    wg, wu, wd = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatedMLP.apply(x, wg, wu, wd, self.act_fn, getattr(self, "_gemtune_save_dtype", x.dtype))
    return linear(self.act_fn(linear(x, wg)) * linear(x, wu), wd)


def _lora_forward(self, x, *args, **kwargs):
    if (args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1
            or self.active_adapters[0] not in self.lora_A):
        return self._gemtune_orig_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    a, bb = self.lora_A[name].weight, self.lora_B[name].weight
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    return _LoRALinear.apply(x, base.weight, base.bias, a, bb, float(self.scaling[name]), float(p))


# ---------------------------------------------------------------- installing

@dataclass
class LeanReport:
    bf16_params: int = 0
    bytes_saved: int = 0
    lora_layers: int = 0
    mlps: int = 0
    frozen_linears: int = 0
    embeddings: int = 0
    refused: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.bytes_saved:
            parts.append(f"frozen weights stored bf16 ({self.bytes_saved / 2**30:.2f} GiB saved)")
        if self.lora_layers:
            parts.append(f"{self.lora_layers} lean LoRA layers")
        if self.mlps:
            parts.append(f"{self.mlps} lean MLPs")
        s = ", ".join(parts) or "off"
        if self.refused:
            s += f"; kept the stock path for {len(self.refused)} module(s) that did not match"
        return s


def _file_backed_ranges() -> list[tuple[int, int]]:
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/") and not parts[5].startswith("/dev/"):
                    lo, hi = (int(v, 16) for v in parts[0].split("-"))
                    out.append((lo, hi))
    except OSError:
        pass
    return out


def _drop_file_pages(t: torch.Tensor, ranges: list[tuple[int, int]], libc) -> None:
    """Drop the process's copies of a file-mapped tensor's pages (they stay in the page cache)."""
    if libc is None or not t.is_contiguous():
        return
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    if not any(a <= lo and hi <= b for a, b in ranges):
        return  # anonymous memory: DONTNEED would zero it
    start = (lo + _PAGE - 1) // _PAGE * _PAGE
    end = hi // _PAGE * _PAGE
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def _to_bf16_streaming(w: torch.Tensor, ranges, libc) -> torch.Tensor:
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    if w.dim() < 2:
        out.copy_(w)
        return out
    rows = max(1, _UPCAST_BLOCK // max(1, w.shape[1]))
    for i in range(0, w.shape[0], rows):
        out[i:i + rows].copy_(w[i:i + rows])
        _drop_file_pages(w[i:i + rows], ranges, libc)
    return out


def _store_bf16(modules: list[nn.Module], report: LeanReport) -> None:
    """Give each module's frozen fp32 `weight` bf16 storage; tied weights stay tied."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        libc = None
    ranges = _file_backed_ranges()
    converted: dict[int, nn.Parameter] = {}
    for m in modules:
        w = m.weight
        if id(w) not in converted:
            new = nn.Parameter(_to_bf16_streaming(w.detach(), ranges, libc), requires_grad=False)
            converted[id(w)] = new
            report.bf16_params += w.numel()
            report.bytes_saved += w.numel() * 2
        m.weight = converted[id(w)]
        b = getattr(m, "bias", None)
        if isinstance(b, torch.Tensor) and b.dtype == torch.float32:
            pass  # biases are tiny: kept fp32


def _lora_layers(model) -> list[nn.Module]:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if type(m) is LoraLinear and type(m.base_layer) is nn.Linear
            and not any(getattr(m, "use_dora", {}).values()) and not getattr(m, "lora_variant", {})]


def _gated_mlps(model) -> list[nn.Module]:
    out = []
    for m in model.modules():
        if all(type(getattr(m, k, None)) is nn.Linear for k in ("gate_proj", "up_proj", "down_proj")) \
                and isinstance(getattr(m, "act_fn", None), nn.Module) \
                and not any(getattr(m, k).weight.requires_grad or getattr(m, k).bias is not None
                            for k in ("gate_proj", "up_proj", "down_proj")):
            out.append(m)
    return out


def _check(module: nn.Module, new_forward, make_input, *, rtol=1e-4, atol=1e-5) -> bool:
    """Compare a candidate forward (and the input gradient it produces) with the module's own on a probe input."""
    was = module.training
    try:
        x = make_input()
        module.eval()
        with torch.enable_grad():
            x1 = x.clone().requires_grad_(True)
            y1 = module(x1)
            g = torch.randn_like(y1)
            (y1 * g).sum().backward()
            x2 = x.clone().requires_grad_(True)
            y2 = new_forward(module, x2)
            (y2 * g).sum().backward()
        ok = torch.allclose(y1, y2, rtol=rtol, atol=atol) and torch.allclose(x1.grad, x2.grad, rtol=rtol, atol=atol)
        for p in module.parameters():
            p.grad = None
        return ok
    finally:
        module.train(was)


def install(model: nn.Module, *, bf16_storage: bool = True, trim: bool = True) -> LeanReport:
    """Install the lean forwards on a PEFT-wrapped model about to be trained; returns what changed."""
    rep = LeanReport()
    gen = torch.Generator().manual_seed(0)
    rng = torch.get_rng_state()

    lora = _lora_layers(model)
    base_linears = {id(m.base_layer) for m in lora}
    mlps = _gated_mlps(model)
    mlp_linears = {id(getattr(m, k)) for m in mlps for k in ("gate_proj", "up_proj", "down_proj")}

    def probe(n_in):
        return lambda: torch.randn(3, 5, n_in, generator=gen)

    # 1. check the lean forwards against the stock ones on the fp32 weights, then switch
    for m in lora:
        m._gemtune_orig_forward = m.forward
        bw = [m.lora_B[k].weight for k in m.lora_B.keys()]
        saved = [w.detach().clone() for w in bw]
        with torch.no_grad():  # B starts at zero: probe with a non-zero one so the LoRA path is checked too
            for w in bw:
                w.copy_(torch.randn(w.shape, generator=gen) * 0.1)
        try:
            same = _check(m, _lora_forward, probe(m.base_layer.in_features))
        finally:
            with torch.no_grad():
                for w, s in zip(bw, saved):
                    w.copy_(s)
        if same:
            m.forward = types.MethodType(_lora_forward, m)
            rep.lora_layers += 1
        else:
            rep.refused.append(type(m).__name__)
    ok_mlps = []
    for m in mlps:
        if _check(m, _mlp_forward, probe(m.gate_proj.in_features)):
            m.forward = types.MethodType(_mlp_forward, m)
            ok_mlps.append(m)
            rep.mlps += 1
        else:
            rep.refused.append(type(m).__name__)
    torch.set_rng_state(rng)  # the probes must not shift the training run's random stream
    for m in ok_mlps:  # checked exactly with fp32 saves; train with bf16 ones
        m._gemtune_save_dtype = torch.bfloat16 if bf16_storage else torch.float32
    if ok_mlps and trim:
        try:
            _trim["fn"] = ctypes.CDLL("libc.so.6").malloc_trim
            _trim["every"] = max(1, len(ok_mlps) // 3)  # three trims per forward and per backward
        except (OSError, AttributeError):
            pass
    if not bf16_storage:
        return rep

    # 2. bf16 storage for every frozen fp32 Linear/Embedding weight whose forward we control
    frozen: list[nn.Module] = []
    lean_lora = [m for m in lora if isinstance(m.__dict__.get("forward"), types.MethodType)
                 and m.__dict__["forward"].__func__ is _lora_forward]
    lean_bases = {id(m.base_layer) for m in lean_lora}
    ok_mlp_linears = {id(getattr(m, k)) for m in ok_mlps for k in ("gate_proj", "up_proj", "down_proj")}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.requires_grad or w.dtype != torch.float32:
            continue
        if type(m) is nn.Linear:
            if id(m) in base_linears and id(m) not in lean_bases:
                continue  # a LoRA layer on the stock path: PEFT reads the base weight itself
            if id(m) in mlp_linears and id(m) not in ok_mlp_linears:
                continue
            if id(m) not in ok_mlp_linears:  # lean LoRA bases too: PEFT calls them with the adapter disabled
                m.forward = types.MethodType(_frozen_linear_forward, m)
                rep.frozen_linears += 1
            frozen.append(m)
        elif isinstance(m, nn.Embedding) and type(m).forward in (nn.Embedding.forward, _scaled_embedding_forward(m)):
            m.forward = types.MethodType(_embedding_forward, m)
            rep.embeddings += 1
            frozen.append(m)
    _store_bf16(frozen, rep)
    return rep


def _scaled_embedding_forward(m: nn.Module):
    """The forward of transformers' Gemma `*ScaledWordEmbedding` (weight lookup times embed_scale), if m is one."""
    name = type(m).__name__
    if name.endswith("ScaledWordEmbedding") and name.startswith("Gemma") and isinstance(getattr(m, "embed_scale", None), torch.Tensor):
        return type(m).forward
    return None
