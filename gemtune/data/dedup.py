"""Exact and near-duplicate detection, and decontamination against a frozen eval set.

Definition (used everywhere, tests included): two rows are near-duplicates when the Jaccard similarity of the
character 5-gram shingle sets of their normalised keys is ≥ 0.8. The key is the row's distinguishing text (the
input, or the user turns), normalised to lowercase letters/digits/spaces with whitespace collapsed.

How it scales: MinHash signatures are computed for all rows at once with numpy (the same affine32 permutations
and murmur3 pre-mix as `datasketch.MinHash`, so a signature equals datasketch's for the same shingle hashes — a
test checks this); 80 permutations in 20 bands × 4 rows, tuned for recall at the threshold (a pair at Jaccard 0.8
is missed with probability 3e-5). Every candidate is verified by the exact Jaccard before a row is dropped:
precision comes from the check, recall from generous banding. Rows are resolved in blocks — band collisions
looked up in a sorted array, signature agreement compared in one vectorised pass — and the first occurrence is
kept. Templated or boilerplate-heavy text, the worst case for LSH, stays linear: buckets are capped, and a block of
mutually similar rows is split until its rows meet the few kept ones instead of each other.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

SHINGLE = 5
NUM_PERM = 80
BANDS, ROWS = 20, 4
# Most rows one LSH bucket keeps. Only rows that share boilerplate yet are not near-duplicates of each other can
# fill a bucket (near-duplicates are dropped, never indexed); capping keeps the work per row bounded on such data.
# A true pair is lost only if *every* band it shares (≈ 8 of 20 at Jaccard 0.8) is a full bucket.
BUCKET_CAP = 100
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


class _SortedIndex:
    """Band keys of indexed rows as one sorted array: lookups and inserts are vectorised, never per key.

    A block of queries is answered with two `searchsorted` calls and a range expansion; a block of new rows is
    merged in with one `np.insert` (a memmove), so indexing n rows costs O(n) per block instead of n dict ops.
    """

    def __init__(self, cap: Optional[int] = None):
        self.keys = np.zeros(0, dtype=np.uint64)
        self.rows = np.zeros(0, dtype=np.int64)
        self.cap = cap

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """rows (m,), keys (m, bands): every (key, row) pair goes in (buckets already holding `cap` stay as they are)."""
        if not len(rows):
            return
        k = keys.ravel()
        r = np.repeat(rows.astype(np.int64), keys.shape[1])
        order = np.argsort(k, kind="stable")
        self._insert_sorted(k[order], r[order])

    def merge(self, other: "_SortedIndex") -> None:
        self._insert_sorted(other.keys, other.rows)

    def _insert_sorted(self, k: np.ndarray, r: np.ndarray) -> None:
        if not len(k):
            return
        if self.cap is not None:
            have = np.searchsorted(self.keys, k, side="right") - np.searchsorted(self.keys, k, side="left")
            first = np.r_[True, k[1:] != k[:-1]]
            rank = np.arange(len(k)) - np.maximum.accumulate(np.where(first, np.arange(len(k)), 0))
            ok = have + rank < self.cap
            k, r = k[ok], r[ok]
        at = np.searchsorted(self.keys, k, side="right")
        self.keys = np.insert(self.keys, at, k)
        self.rows = np.insert(self.rows, at, r)

    def pairs(self, rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query row, indexed row) for every band key a query row shares with an indexed row (repeats kept)."""
        if not len(rows) or not len(self.keys):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        q = keys.ravel()
        owner = np.repeat(rows.astype(np.int64), keys.shape[1])
        order = np.argsort(q)  # sorted queries walk the index in order: far fewer cache misses
        q, owner = q[order], owner[order]
        lo = np.searchsorted(self.keys, q, side="left")
        cnt = np.searchsorted(self.keys, q, side="right") - lo
        hit = cnt > 0
        lo, cnt, owner = lo[hit], cnt[hit], owner[hit]
        total = int(cnt.sum())
        if not total:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        starts = np.cumsum(cnt) - cnt
        idx = np.repeat(lo - starts, cnt) + np.arange(total)
        return np.repeat(owner, cnt), self.rows[idx]


class NearDup:
    """Greedy first-occurrence dedup over a fixed list of keys, with an optional frozen eval set taking priority.

    `add_eval(rows)` registers frozen eval rows; `check_many(rows)` classifies rows in order: a row duplicating
    an eval row (exactly or nearly) is "decontaminated"; otherwise an exact or near duplicate of a row kept
    earlier is "exact"/"near"; otherwise it is "kept" and becomes a candidate for later rows. `scopes` (e.g. task
    names) confine duplicate detection to rows of the same scope; decontamination is always global.
    """

    def __init__(self, keys: Sequence[str], *, scopes: Optional[Sequence[str]] = None, threshold: float = 0.8,
                 num_perm: int = NUM_PERM, bands: int = BANDS, rows: int = ROWS, seed: int = 1,
                 bucket_cap: Optional[int] = BUCKET_CAP):
        if bands * rows > num_perm:
            raise ValueError("bands * rows must not exceed num_perm")
        self.keys = list(keys)
        self.threshold = threshold
        self.sig = minhash_signatures(self.keys, num_perm, seed)
        self.bk = band_keys(self.sig, bands, rows)
        # Low byte of each MinHash value for the agreement filter: P(agree) = J + (1 - J)/256, a quarter of the
        # memory traffic of the full signature (b-bit minwise hashing, Li & König 2010).
        self.sig8 = (self.sig & np.uint32(0xFF)).astype(np.uint8)
        self.scopes = list(scopes) if scopes is not None else None
        self._scoped = self.bk if scopes is None else self._salted(self.bk, self.scopes)
        self._kept = np.zeros(len(self.keys), dtype=bool)
        self._sets: dict[int, set] = {}
        self._eval_exact: dict[str, int] = {}
        self._eval = _SortedIndex()
        self._exact: dict[str, int] = {}
        self._index = _SortedIndex(cap=bucket_cap)
        # A candidate whose signature agreement is far below the threshold cannot reach it: at Jaccard 0.8 the
        # 80-permutation estimate has sd 0.045, so a cut 0.2 lower loses a true pair with probability ~1e-5.
        self._min_equal = int(np.ceil(max(0.0, threshold - 0.2) * num_perm))

    @staticmethod
    def _salted(bk: np.ndarray, scopes: Sequence[str]) -> np.ndarray:
        salt = {sc: int.from_bytes(hashlib.blake2b(sc.encode("utf-8"), digest_size=8).digest(), "little")
                for sc in set(scopes)}
        col = np.fromiter((salt[sc] for sc in scopes), dtype=np.uint64, count=len(scopes))
        return bk ^ col[:, None]

    def _set(self, i: int) -> set:
        s = self._sets.get(i)
        if s is None:
            k = self.keys[i]
            s = self._sets[i] = {k[j:j + SHINGLE] for j in range(len(k) - SHINGLE + 1)} if len(k) > SHINGLE else {k}
        return s

    def _exact_key(self, i: int) -> str:
        return self.keys[i] if self.scopes is None else f"{self.scopes[i]}\x00{self.keys[i]}"

    # -- candidate verification
    def _close(self, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unique (row, candidate) pairs whose signature agreement could reach the threshold, grouped by row and,
        within a row, most-agreeing candidate first (so the first verified candidate is usually the first tried)."""
        if not src.size:
            return src, dst
        agree = np.empty(len(src), dtype=np.int64)
        step = 1 << 16
        for lo in range(0, len(src), step):
            a, b = src[lo:lo + step], dst[lo:lo + step]
            agree[lo:lo + step] = np.count_nonzero(self.sig8[a] == self.sig8[b], axis=1)
        keep = agree >= self._min_equal
        src, dst, agree = src[keep], dst[keep], agree[keep]
        n = len(self.keys)
        code, first = np.unique(src * n + dst, return_index=True)  # a pair sharing k bands was listed k times
        src, dst, agree = code // n, code % n, agree[first]
        order = np.lexsort((dst, -agree, src))
        return src[order], dst[order]

    def _jaccard(self, i: int, j: int) -> float:
        a, b = self._set(i), self._set(j)
        inter = len(a & b)
        return inter / (len(a) + len(b) - inter)

    def _first_matches(self, src: np.ndarray, dst: np.ndarray) -> dict[int, tuple[int, float]]:
        """{row: (a candidate meeting the threshold — the most agreeing one that does —, jaccard)}."""
        src, dst = self._close(src, dst)
        out: dict[int, tuple[int, float]] = {}
        for i, j in zip(src.tolist(), dst.tolist()):
            if i in out:
                continue
            s = self._jaccard(i, j)
            if s >= self.threshold:
                out[i] = (j, s)
        return out

    def _run_pairs(self, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Band-sharing pairs (later, earlier) among `live`, or only their count when there are too many to list."""
        keys = self._scoped[live].ravel()
        owner = np.repeat(live, self._scoped.shape[1])
        order = np.lexsort((owner, keys))
        keys, owner = keys[order], owner[order]
        brk = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
        sizes = np.diff(brk)
        total = int((sizes * (sizes - 1) // 2).sum())
        if total > self._pair_budget(len(live)):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), total
        src: list[int] = []
        dst: list[int] = []
        for s, m in zip(brk[:-1][sizes > 1].tolist(), sizes[sizes > 1].tolist()):
            members = owner[s:s + m].tolist()  # ascending row order within a run
            for x in range(1, m):
                src.extend([members[x]] * x)
                dst.extend(members[:x])
        return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64), total

    @staticmethod
    def _pair_budget(n: int) -> int:
        return max(20_000, 64 * n)

    def _near_pass(self, live: list[int], local: _SortedIndex, verdicts: dict[int, Verdict]) -> None:
        """Resolve `live` rows (in order) against kept rows of earlier blocks, of this block (`local`), and each other.

        Rows matching an already-kept row are settled by a vectorised lookup. The rest are compared among
        themselves; when they are so alike that listing their pairs would be quadratic (templated text), the
        rows are split in halves and the first half's survivors join `local` before the second half is looked up:
        similar rows then meet the few kept ones instead of each other, and the work stays linear.
        """
        if not live:
            return
        arr = np.asarray(live, dtype=np.int64)
        s1, d1 = self._index.pairs(arr, self._scoped[arr])
        s2, d2 = local.pairs(arr, self._scoped[arr])
        found = self._first_matches(np.concatenate([s1, s2]), np.concatenate([d1, d2]))
        rest = []
        for i in live:
            m = found.get(i)
            if m is not None:
                verdicts[i] = Verdict("near", m[0], m[1])
            else:
                rest.append(i)
        if not rest:
            return
        rarr = np.asarray(rest, dtype=np.int64)
        src, dst, total = self._run_pairs(rarr) if len(rest) > 1 else (np.zeros(0, np.int64),) * 2 + (0,)
        if total > self._pair_budget(len(rest)):
            half = len(rest) // 2
            self._near_pass(rest[:half], local, verdicts)
            self._near_pass(rest[half:], local, verdicts)
            return
        # Candidate edges among `rest`, then in-order resolution: a row is a near-duplicate when it verifies against
        # a row kept before it (candidates tried most-agreeing first).
        src, dst = self._close(src, dst)
        edges: dict[int, list[int]] = {}
        for i, j in zip(src.tolist(), dst.tolist()):
            edges.setdefault(i, []).append(j)
        kept = self._kept
        new = []
        for i in rest:
            match = None
            for j in edges.get(i, ()):
                if kept[j]:
                    s = self._jaccard(i, j)
                    if s >= self.threshold:
                        match = (j, s)
                        break
            if match is not None:
                verdicts[i] = Verdict("near", match[0], match[1])
            else:
                kept[i] = True
                new.append(i)
                verdicts[i] = Verdict("kept")
        new_arr = np.asarray(new, dtype=np.int64)
        local.add(new_arr, self._scoped[new_arr])

    # -- public
    def add_eval(self, rows) -> None:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        for i in rows.tolist():
            self._eval_exact.setdefault(self.keys[i], i)
        self._eval.add(rows, self.bk[rows])

    def match_eval_many(self, rows: Sequence[int]) -> dict[int, tuple[int, float]]:
        """{row: (eval row, jaccard)} for the rows that duplicate a frozen eval row (exactly, else the closest)."""
        hits: dict[int, tuple[int, float]] = {}
        pending = []
        for i in rows:
            e = self._eval_exact.get(self.keys[i])
            if e is not None:
                hits[i] = (e, 1.0)
            else:
                pending.append(i)
        if pending and len(self._eval):
            arr = np.asarray(pending, dtype=np.int64)
            hits.update(self._first_matches(*self._eval.pairs(arr, self.bk[arr])))
        return hits

    def match_eval(self, i: int) -> Optional[tuple[int, float]]:
        return self.match_eval_many([i]).get(i)

    def check(self, i: int) -> Verdict:
        """One row; for many rows use `check_many` (each kept row here costs a merge into the sorted index)."""
        return self.check_many([i])[0]

    def check_many(self, rows: Sequence[int], *, block: int = 4096,
                   progress: Optional[Callable[[int], None]] = None) -> list[Verdict]:
        """Verdicts for `rows` in order: the greedy first-occurrence result of classifying them one by one (a row is
        dropped when it verifies against a row kept before it; `match` is the kept row it duplicates).

        Per block of rows, candidate pairs come from band collisions with rows kept earlier (a sorted index) and
        within the block; far pairs are dropped by one vectorised signature comparison, the rest verified by exact
        Jaccard, most-agreeing candidate first, stopping at each row's first match.
        """
        out: list[Verdict] = []
        for start in range(0, len(rows), block):
            out.extend(self._check_block(list(rows[start:start + block])))
            if progress:
                progress(min(block, len(rows) - start))
        return out

    def _check_block(self, block: list[int]) -> list[Verdict]:
        verdicts: dict[int, Verdict] = {}
        if self._eval_exact:
            for i, (j, s) in self.match_eval_many(block).items():
                verdicts[i] = Verdict("decontaminated", j, s)
        live = []
        for i in block:
            if i in verdicts:
                continue
            ek = self._exact_key(i)
            first = self._exact.get(ek)
            if first is not None:
                verdicts[i] = Verdict("exact", first, 1.0)
            else:
                self._exact[ek] = i
                live.append(i)
        local = _SortedIndex()
        self._near_pass(live, local, verdicts)
        self._index.merge(local)
        return [verdicts[i] for i in block]


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
