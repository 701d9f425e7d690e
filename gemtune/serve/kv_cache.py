"""A preallocated KV cache: one row per running sequence, one ring per sliding-window layer.

Layout per attention layer: K and V of shape [max_batch, kv_heads, size, head_dim]. Rows are the batch slots of
the running sequences; the scheduler keeps them compact (rows 0..B-1) so that a decode step attends over a plain
view `k[:B, :, :L]` with no gather. Full-attention layers store position p at index p (size = max_model_len).
Sliding-window layers (window W) store position p at index p % R with R = W + chunk, where `chunk` is the largest
prefill chunk: writing a whole chunk before attending can then never overwrite a key that a query of the same chunk
still needs (a query at p needs p-W+1..p; the chunk overwrites at most positions < p-W). Gemma 4 KV-shared layers
alias the tensors of the layer that produces their keys, so they cost no memory and see exactly the same keys.

Which position an index holds is pure arithmetic on the sequence length, so masks are built from lengths alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerKV:
    kv_heads: int
    head_dim: int
    size: int  # slots per row: max_model_len, or window + chunk for sliding layers
    window: int | None  # sliding window (keys with position > q - window are visible), None for full attention
    source: int  # layer whose tensors hold this layer's keys (itself unless KV-shared)

    @property
    def kind(self) -> tuple[int, int | None]:
        """Layers with equal (size, window) share masks and write slots within a step."""
        return self.size, self.window


class KVCache:
    def __init__(self, layers: list[LayerKV], max_batch: int, dtype: torch.dtype):
        self.layers = layers
        self.max_batch = max_batch
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i, spec in enumerate(layers):
            if spec.source != i:
                self.k.append(self.k[spec.source])
                self.v.append(self.v[spec.source])
                continue
            shape = (max_batch, spec.kv_heads, spec.size, spec.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype))
            self.v.append(torch.zeros(shape, dtype=dtype))

    def owners(self) -> list[int]:
        """Layers that own storage (KV-shared layers alias another's)."""
        return [i for i, s in enumerate(self.layers) if s.source == i]

    def nbytes(self) -> int:
        return sum(self.k[i].numel() * self.k[i].element_size() * 2 for i in self.owners())

    def write(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store per-token keys/values ([N, kv_heads, head_dim]) at (row, slot)."""
        self.k[layer][rows, :, slots] = k
        self.v[layer][rows, :, slots] = v

    def copy_prefix(self, layer: int, src: int, dst: int, n: int) -> None:
        """Give row dst the keys of positions [0, n) from row src. A sliding layer only needs the last `window` of
        them (later queries never look further back), which the source still holds even if its ring wrapped."""
        spec = self.layers[layer]
        if spec.window is None:
            self.k[layer][dst, :, :n] = self.k[layer][src, :, :n]
            self.v[layer][dst, :, :n] = self.v[layer][src, :, :n]
            return
        lo = max(0, n - spec.window)
        if n <= spec.size:  # no wrap: one contiguous run of slots
            self.k[layer][dst, :, lo:n] = self.k[layer][src, :, lo:n]
            self.v[layer][dst, :, lo:n] = self.v[layer][src, :, lo:n]
            return
        idx = torch.remainder(torch.arange(lo, n), spec.size)
        self.k[layer][dst, :, idx] = self.k[layer][src, :, idx]
        self.v[layer][dst, :, idx] = self.v[layer][src, :, idx]

    def can_lend(self, src_length: int, n: int) -> bool:
        """Whether a row of `src_length` positions still holds what `copy_prefix(.., n)` reads in every layer."""
        return all(src_length <= s.size + max(0, n - s.window) for s in self.layers if s.window is not None)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions' worth of a row into another row (compaction after a finish)."""
        if src == dst or length <= 0:
            return
        for i in self.owners():
            n = min(length, self.layers[i].size)
            self.k[i][dst, :, :n] = self.k[i][src, :, :n]
            self.v[i][dst, :, :n] = self.v[i][src, :, :n]

    def clear_row(self, row: int) -> None:
        """Zero a whole row: masked attention multiplies stale slots by 0, and 0 * inf/NaN is NaN, so a row whose
        request ended in inf/NaN must not hand those values to the next sequence that uses it."""
        for i in self.owners():
            self.k[i][row].zero_()
            self.v[i][row].zero_()

    def swap_rows(self, a: int, b: int, length_a: int, length_b: int) -> None:
        if a == b:
            return
        for i in self.owners():
            n = min(max(length_a, length_b), self.layers[i].size)
            for t in (self.k[i], self.v[i]):
                tmp = t[a, :, :n].clone()
                t[a, :, :n] = t[b, :, :n]
                t[b, :, :n] = tmp


def slot_positions(lengths: torch.Tensor, size: int, span: int) -> torch.Tensor:
    """Position held by each of the first `span` indices of a row of `size` slots, given the row's length
    (tokens written so far); negative where nothing valid is stored. Shape [len(lengths), span]."""
    j = torch.arange(span)
    last = (lengths - 1)[:, None]
    return last - torch.remainder(last - j[None, :], size)


def visibility(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) visibility of keys at `kpos` for queries at `qpos` (broadcasting)."""
    ok = (kpos >= 0) & (kpos <= qpos)
    if window is not None:
        ok &= kpos > qpos - window
    return ok
