"""Exact and near-duplicate detection, and decontamination against a frozen eval set.

Definition (used everywhere, tests included): two rows are near-duplicates when the Jaccard similarity of the
character 5-gram shingle sets of their normalised keys is ≥ 0.8. The key is the row's distinguishing text (the
input, or the user turns), normalised to lowercase letters/digits/spaces with whitespace collapsed.

How it scales: MinHash signatures are computed for all rows at once with numpy (the same affine32 permutations
and murmur3 pre-mix as `datasketch.MinHash`, so a signature equals datasketch's for the same shingle hashes — a
test checks this), banded into an LSH table tuned for recall at the threshold (80 permutations in 20 bands × 4 rows: a pair at
Jaccard 0.8 is missed with probability 3e-5), and every LSH candidate is verified by the exact Jaccard before a
row is dropped. Verification is what lets the bands be generous: precision comes from the exact check, recall
from the banding. Rows are visited in input order and the first occurrence is kept.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

SHINGLE = 5
NUM_PERM = 80
BANDS, ROWS = 20, 4
_M64 = (1 << 64) - 1
_NON_KEY = re.compile(r"[^\w\s]|_")

# Fixed random odd multipliers for the shingle hash (position j) and the length term, and for band hashing.
_RNG = np.random.RandomState(0x5EED)
_SHINGLE_MULT = (_RNG.randint(1, 1 << 62, size=SHINGLE + 1, dtype=np.uint64) * np.uint64(2) + np.uint64(1))
_BAND_MULT = (_RNG.randint(1, 1 << 62, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1))
_BAND_SALT = _RNG.randint(1, 1 << 62, size=256, dtype=np.uint64)


def normalise_key(text: str) -> str:
    """Lowercase, letters/digits/spaces only, whitespace collapsed (the dedup definition's normal form)."""
    return " ".join(_NON_KEY.sub("", text.lower()).split())


def shingles(key: str, k: int = SHINGLE) -> frozenset[str]:
    """Character k-grams; a key shorter than k is its own single shingle."""
    if len(key) <= k:
        return frozenset((key,))
    return frozenset(key[i:i + k] for i in range(len(key) - k + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def similarity(text_a: str, text_b: str) -> float:
    """Jaccard of two raw texts under the definition (normalise, then 5-gram shingles)."""
    return jaccard(shingles(normalise_key(text_a)), shingles(normalise_key(text_b)))


# ------------------------------------------------------------------------------------------------ hashing
def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: the pre-mix datasketch's affine32 scheme applies to every hash value."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hash32(s: str) -> int:
    """Scalar twin of the vectorised shingle hash (tests feed it to datasketch.MinHash as `hashfunc`)."""
    mult = [int(x) for x in _SHINGLE_MULT]
    h = sum(ord(c) * mult[j] for j, c in enumerate(s)) + len(s) * mult[SHINGLE]
    h &= _M64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    h ^= h >> 33
    return h & 0xFFFFFFFF


def shingle_hashes(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every shingle of every key, concatenated, and the per-key shingle counts.

    All keys are laid end to end as one array of code points; each window hash is a dot product of 5 code points
    with fixed multipliers, so one pass of numpy covers every row. Windows that straddle two keys are dropped.
    """
    n = len(keys)
    lengths = np.fromiter((len(k) for k in keys), dtype=np.int64, count=n)
    cps = np.frombuffer("".join(keys).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    starts = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(lengths[:-1], out=starts[1:])
    long_ = lengths >= SHINGLE
    counts = np.where(long_, lengths - SHINGLE + 1, 1)
    # Full windows: positions start .. start+len-5 of every long key.
    wcount = np.where(long_, lengths - SHINGLE + 1, 0)
    total_w = int(wcount.sum())
    win_hash = np.zeros(0, dtype=np.uint64)
    if total_w:
        firsts = np.repeat(starts, wcount)
        offs = np.arange(total_w, dtype=np.int64) - np.repeat(np.cumsum(wcount) - wcount, wcount)
        pos = firsts + offs
        acc = np.full(total_w, np.uint64((SHINGLE * int(_SHINGLE_MULT[SHINGLE])) & _M64), dtype=np.uint64)
        for j in range(SHINGLE):
            acc += cps[pos + j] * _SHINGLE_MULT[j]
        win_hash = (_fmix64(acc) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    # Short keys (< 5 chars) are one shingle each: hash them one by one (they are few).
    short_idx = np.flatnonzero(~long_)
    short_hash = np.fromiter((shingle_hash32(keys[i]) for i in short_idx), dtype=np.uint32, count=len(short_idx))
    if len(short_idx) == 0:
        return win_hash, counts
    # Interleave: place each key's hashes contiguously in key order.
    out = np.empty(int(counts.sum()), dtype=np.uint32)
    out_starts = np.cumsum(counts) - counts
    long_rows = np.flatnonzero(long_)
    if total_w:
        dst = np.repeat(out_starts[long_rows], wcount[long_rows]) + (
            np.arange(total_w) - np.repeat(np.cumsum(wcount[long_rows]) - wcount[long_rows], wcount[long_rows]))
        out[dst] = win_hash
    out[out_starts[short_idx]] = short_hash
    return out, counts


def permutations(num_perm: int = NUM_PERM, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own affine32 permutation parameters (a, b), so signatures match `datasketch.MinHash`."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def minhash_signatures(keys: Sequence[str], num_perm: int = NUM_PERM, seed: int = 1, chunk: int = 32768) -> np.ndarray:
    """(n, num_perm) uint32 MinHash signatures of the keys' shingle sets, computed in row-aligned chunks."""
    hv, counts = shingle_hashes(keys)
    a, b = permutations(num_perm, seed)
    hv = _fmix32(hv)
    n = len(keys)
    sig = np.empty((n, num_perm), dtype=np.uint32)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    buf = np.empty((max(chunk, int(counts.max(initial=1))), num_perm), dtype=np.uint32)
    i = 0
    while i < n:
        # Take rows until the chunk holds ~`chunk` shingles (at least one row).
        j = int(np.searchsorted(bounds, bounds[i] + chunk, side="right")) - 1
        j = min(max(j, i + 1), n)
        lo, hi = int(bounds[i]), int(bounds[j])
        block = buf[:hi - lo]
        np.multiply(hv[lo:hi, None], a[None, :], out=block)
        block += b[None, :]
        sig[i:j] = np.minimum.reduceat(block, (bounds[i:j] - lo).astype(np.int64), axis=0)
        i = j
    return sig


def band_keys(sig: np.ndarray, bands: int = BANDS, rows: int = ROWS) -> np.ndarray:
    """(n, bands) uint64 bucket keys: each band's `rows` values hashed together, salted by band number."""
    n = sig.shape[0]
    s = sig[:, :bands * rows].reshape(n, bands, rows).astype(np.uint64)
    acc = np.zeros((n, bands), dtype=np.uint64)
    for j in range(rows):
        acc += s[:, :, j] * _BAND_MULT[j]
    return _fmix64(acc ^ _BAND_SALT[:bands][None, :])


# ------------------------------------------------------------------------------------------------ the index
@dataclass
class Verdict:
    status: str  # "kept" | "exact" | "near" | "decontaminated"
    match: Optional[int] = None
    jaccard: float = 1.0


class NearDup:
    """Greedy first-occurrence dedup over a fixed list of keys, with an optional frozen eval set taking priority.

    `add_eval(i)` registers a frozen eval row; `check(i)` classifies row i against eval rows (decontaminated)
    and then against rows kept so far (exact / near duplicate), keeping it otherwise. `scopes` (e.g. task names)
    confine duplicate detection to rows of the same scope; decontamination is always global.
    """

    def __init__(self, keys: Sequence[str], *, scopes: Optional[Sequence[str]] = None, threshold: float = 0.8,
                 num_perm: int = NUM_PERM, bands: int = BANDS, rows: int = ROWS, seed: int = 1):
        if bands * rows > num_perm:
            raise ValueError("bands * rows must not exceed num_perm")
        self.keys = list(keys)
        self.threshold = threshold
        self.sig = minhash_signatures(self.keys, num_perm, seed)
        self.bk = band_keys(self.sig, bands, rows)
        self.scopes = list(scopes) if scopes is not None else None
        self._scope_salt: dict[str, int] = {}
        self._sets: dict[int, frozenset] = {}
        self._eval_exact: dict[str, int] = {}
        self._eval_buckets: dict[int, list[int]] = {}
        self._exact: dict[str, int] = {}
        self._buckets: dict[int, list[int]] = {}
        self.prefilter = max(0.0, threshold - 0.25)  # signature estimate far below the threshold: skip exact check

    # -- helpers
    def _set(self, i: int) -> frozenset:
        s = self._sets.get(i)
        if s is None:
            s = self._sets[i] = shingles(self.keys[i])
        return s

    def _salt(self, i: int) -> int:
        if self.scopes is None:
            return 0
        sc = self.scopes[i]
        if sc not in self._scope_salt:
            self._scope_salt[sc] = int.from_bytes(hashlib.blake2b(sc.encode("utf-8"), digest_size=8).digest(), "little")
        return self._scope_salt[sc]

    def _exact_key(self, i: int) -> str:
        return self.keys[i] if self.scopes is None else f"{self.scopes[i]}\x00{self.keys[i]}"

    def _verify(self, i: int, cands: Iterable[int]) -> Optional[tuple[int, float]]:
        """First candidate (lowest row index = earliest kept) whose exact Jaccard reaches the threshold."""
        cands = sorted(set(cands))
        if not cands:
            return None
        if len(cands) == 1:
            est = [np.count_nonzero(self.sig[cands[0]] == self.sig[i]) / self.sig.shape[1]]
        else:
            est = (np.count_nonzero(self.sig[cands] == self.sig[i], axis=1) / self.sig.shape[1]).tolist()
        mine = None
        for c, e in zip(cands, est):
            if e < self.prefilter:
                continue
            if mine is None:
                mine = self._set(i)
            j = jaccard(mine, self._set(c))
            if j >= self.threshold:
                return c, j
        return None

    # -- public
    def add_eval(self, i: int) -> None:
        self._eval_exact.setdefault(self.keys[i], i)
        for h in self.bk[i].tolist():
            self._eval_buckets.setdefault(h, []).append(i)

    def match_eval(self, i: int) -> Optional[tuple[int, float]]:
        """The frozen eval row that row i duplicates (exactly or nearly), if any."""
        e = self._eval_exact.get(self.keys[i])
        if e is not None:
            return e, 1.0
        if not self._eval_buckets:
            return None
        cands = [c for h in self.bk[i].tolist() for c in self._eval_buckets.get(h, ())]
        return self._verify(i, cands)

    def check(self, i: int, *, keep: bool = True) -> Verdict:
        m = self.match_eval(i)
        if m is not None:
            return Verdict("decontaminated", m[0], m[1])
        ek = self._exact_key(i)
        first = self._exact.get(ek)
        if first is not None:
            return Verdict("exact", first, 1.0)
        self._exact[ek] = i
        salt = self._salt(i)
        hs = [h ^ salt for h in self.bk[i].tolist()] if salt else self.bk[i].tolist()
        cands = [c for h in hs for c in self._buckets.get(h, ())]
        m = self._verify(i, cands)
        if m is not None:
            return Verdict("near", m[0], m[1])
        if keep:
            for h in hs:
                b = self._buckets.get(h)
                if b is None:
                    self._buckets[h] = [i]
                else:
                    b.append(i)
        return Verdict("kept")


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.8) -> list[tuple[int, int, float]]:
    """All pairs (i < j) at or above the threshold by brute force: the ground truth tests compare against."""
    sets = [shingles(normalise_key(t)) for t in texts]
    out = []
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            s = jaccard(sets[i], sets[j])
            if s >= threshold:
                out.append((i, j, s))
    return out
