"""Data curation speed and near-duplicate quality: gemtune vs a datasketch-only MinHashLSH baseline.

Corpus: banking77 (train + test) expanded to N rows with perturbed copies (distinct openers/closers and word
substitutions, so copies are *not* near-duplicates of each other), plus planted near-duplicates (1–2 keyboard
slips of an earlier row, exact Jaccard in [0.8, 1) on character 5-gram shingles — the definition) whose positions
are the ground truth. Same corpus, same process run, for both systems:

- gemtune: the full `data build` (read, sanitise, PII, token counting with the real Gemma 3 tokenizer, dedup,
  split, balance, write), and its dedup stage alone (`NearDup`, the class the build uses);
- baseline: what a user writes with datasketch alone — `MinHash(num_perm=128)` per row over the same shingles,
  `MinHashLSH(threshold=0.8)`, query-then-insert in input order, no verification.

Quality: recall = planted copies flagged / planted; recall (first occurrence) = the same over planted copies whose
original is not itself a near-duplicate of an earlier row (otherwise keeping the copy can be right: it may be
< 0.8 from the row its original duplicates); planted precision = flagged rows that are planted copies / flagged
rows (accidental near-duplicates in the corpus count against it); pair precision = flagged (row, match) pairs whose
exact Jaccard ≥ 0.8, i.e. meeting the definition. Scaling: full builds at 25k / 50k / 100k rows drawn from the same
distribution (source rows in proportion to n), reported per row without the fixed cost of loading the tokenizer.

    .venv/bin/python bench/data.py [--rows 100000] [--scaling 25000,50000,100000] [--planted 0.08]
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROUTING_INSTRUCTION, banking77_rows, peak_rss_gib, write_result  # noqa: E402

from gemtune.data.dedup import NearDup, jaccard, normalise_key, shingles  # noqa: E402

OPENERS = [
    "Hi there, I need some help with this: ", "Hello team, quick question for you today: ", "Good morning, sorry to bother you but ",
    "Dear support, I am writing because ", "Hey, hoping someone can sort this out - ", "Urgent request from a long time customer: ",
    "I have been a client for years and ", "Please read this carefully before replying: ", "My partner asked me to message you because ",
    "Writing from my phone so excuse typos, ", "Second time asking about this, ", "Question regarding my personal account: ",
    "I tried the FAQ first but ", "Sorry if this is a silly question but ", "Following up on my chat from yesterday, ",
    "Not sure who handles this so ", "I am travelling at the moment and ", "Before I call the hotline, ", "My employer told me to check with you: ",
    "Hope you are well, ", "I am a little confused here, ", "Could a human look at this please? ", "This is my first time using the app and ",
    "Long story short, ", "I just switched from another bank and ", "Okay so here is the situation: ", "Morning! ",
    "Hello, student account holder here, ", "Hi, small business owner here, ", "Evening team, ",
]
CLOSERS = [
    " Thanks so much in advance for your help.", " Please get back to me as soon as you can.", " I would really appreciate a quick reply.",
    " This is getting quite frustrating, honestly.", " Let me know if you need any more details from me.", " Cheers, and have a nice day.",
    " I am using the latest version of the iOS app.", " I am on Android if that matters.", " It happened twice this week already.",
    " My husband has the same problem on his account.", " I need this fixed before the weekend.", " Kind regards from a worried customer.",
    " Nobody on the phone line could tell me anything.", " I already restarted the app and my phone.", " Is there a fee for this?",
    " Please do not close my ticket until this is solved.", " I can send screenshots if needed.", " This never happened with my old bank.",
    " Thank you for your patience with me.", " Waiting for your answer, thanks.", " I hope this can be sorted out quickly.",
    " Could you also email me a confirmation?", " Many thanks, talk soon.", " I am abroad until next month.",
    " The branch told me to ask online.", " I would rather not visit a branch.", " Appreciate any help you can give.",
    " Best wishes and thanks again.", " Sorry for the long message.", " Answer whenever you have a moment.",
]
SYNONYMS = {"card": ["card", "bank card", "debit card"], "money": ["money", "funds", "cash"], "account": ["account", "profile"],
            "payment": ["payment", "charge"], "transfer": ["transfer", "bank transfer"], "app": ["app", "application"],
            "why": ["why", "how come"], "help": ["help", "assist"], "need": ["need", "want"], "top": ["top", "top"]}


def clean_base(texts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """banking77 rows with no exact or near duplicate among themselves (exact Jaccard by sparse products), ≥ 20 chars."""
    import numpy as np
    from scipy import sparse

    rows, seen = [], set()
    for t, c in texts:
        k = normalise_key(t)
        if len(k) >= 20 and k not in seen:
            seen.add(k)
            rows.append((t, c))
    sets = [shingles(normalise_key(t)) for t, _ in rows]
    vocab: dict[str, int] = {}
    ind, ptr = [], [0]
    for s in sets:
        ind.extend(vocab.setdefault(x, len(vocab)) for x in s)
        ptr.append(len(ind))
    X = sparse.csr_matrix((np.ones(len(ind), dtype=np.float32), ind, ptr), shape=(len(sets), len(vocab)))
    sizes = np.diff(X.indptr)
    drop = set()
    for lo in range(0, len(sets), 2000):
        inter = (X[lo:lo + 2000] @ X.T).tocoo()
        i, j, v = inter.row + lo, inter.col, inter.data
        m = (j < i) & (v / (sizes[i] + sizes[j] - v) >= 0.7)
        drop.update(i[m].tolist())
    return [r for k, r in enumerate(rows) if k not in drop]


def perturb(text: str, copy: int, rng: random.Random) -> str:
    o = OPENERS[(zlib.crc32(text.encode()) + copy * 7) % len(OPENERS)]
    c = CLOSERS[(zlib.crc32(text[::-1].encode()) + copy * 11) % len(CLOSERS)]
    words = []
    for w in text.split():
        alts = SYNONYMS.get(w.lower())
        words.append(rng.choice(alts) if alts and rng.random() < 0.5 else w)
    body = " ".join(words)
    return o + (body[0].lower() + body[1:] if body else body) + c


def typo(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(1, max(2, len(chars) - 2))
        op = rng.choice(["swap", "drop", "double", "sub"])
        if op == "swap":
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op == "drop":
            del chars[i]
        elif op == "double":
            chars.insert(i, chars[i])
        else:
            chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return "".join(chars)


def make_corpus(base: list[tuple[str, str]], n: int, planted_frac: float, seed: int = 0):
    """(rows [(text, category)], planted {copy index: original index}) with planted copies after their originals."""
    rng = random.Random(seed)
    n_planted = int(n * planted_frac)
    n_distinct = n - n_planted
    order = list(range(len(base)))
    rng.shuffle(order)
    distinct = []
    for k in range(n_distinct):
        t, c = base[order[k % len(base)]]
        distinct.append((perturb(t, k // len(base), rng), c))
    # Planted near-duplicates: typo copies verified against the definition, inserted after their original.
    originals = rng.sample(range(n_distinct), n_planted)
    inserts: dict[int, list[tuple[str, str, int]]] = {}
    for o in originals:
        t, c = distinct[o]
        key = normalise_key(t)
        for _ in range(50):
            cand = typo(t, rng)
            ck = normalise_key(cand)
            if ck != key and jaccard(shingles(ck), shingles(key)) >= 0.8:
                break
        else:
            continue
        pos = rng.randint(o + 1, n_distinct)
        inserts.setdefault(pos, []).append((cand, c, o))
    rows, planted, where = [], {}, {}
    for k in range(n_distinct + 1):
        for cand, c, o in inserts.get(k, ()):
            planted[len(rows)] = o
            rows.append((cand, c))
        if k < n_distinct:
            where[k] = len(rows)
            rows.append(distinct[k])
    planted = {copy: where[o] for copy, o in planted.items()}
    return rows, planted


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        w.writerows(rows)


def quality(flagged: dict[int, int], planted: dict[int, int], texts: list[str], first: set[int]) -> dict:
    """flagged: {row: matched earlier row}. `first`: planted copies whose original is a first occurrence (has no
    near-duplicate earlier in the corpus); a copy of an original that is itself a duplicate may rightly be kept
    when it is not within 0.8 of the row that original duplicates, so recall is also given over `first`."""
    tp = sum(1 for r in flagged if r in planted)
    keys = {}

    def sh(i):
        if i not in keys:
            keys[i] = shingles(normalise_key(texts[i]))
        return keys[i]

    pair_ok = sum(1 for r, m in flagged.items() if m is not None and jaccard(sh(r), sh(m)) >= 0.8)
    return {"flagged": len(flagged), "planted": len(planted), "recall": round(tp / max(1, len(planted)), 4),
            "recall_first_occurrence": round(sum(1 for r in first if r in flagged) / max(1, len(first)), 4),
            "planted_precision": round(tp / max(1, len(flagged)), 4), "pair_precision": round(pair_ok / max(1, len(flagged)), 4)}


def run_gemtune_dedup(texts: list[str]) -> tuple[dict[int, int], float]:
    t = time.perf_counter()
    keys = [normalise_key(x) for x in texts]
    nd = NearDup(keys)
    flagged = {i: v.match for i, v in enumerate(nd.check_many(range(len(keys)))) if v.status == "near"}
    return flagged, time.perf_counter() - t


def run_baseline(texts: list[str]) -> tuple[dict[int, int], float]:
    """datasketch alone: MinHash(num_perm=128) per row, MinHashLSH(threshold=0.8), no verification.

    Exact duplicates (same normalised key) are skipped first by a set, as gemtune's exact pass does, so both
    systems are scored on near-duplicates only.
    """
    from datasketch import MinHash, MinHashLSH

    t = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    seen, flagged = set(), {}
    sets = {}
    for i, x in enumerate(texts):
        k = normalise_key(x)
        if k in seen:
            continue
        seen.add(k)
        m = MinHash(num_perm=128)
        m.update_batch([s.encode("utf-8") for s in shingles(k)])
        hits = lsh.query(m)
        if hits:
            sets.setdefault(i, shingles(k))
            # the best-matching candidate (what a careful user would report as the pair)
            best = max(hits, key=lambda j: jaccard(sets[i], sets.setdefault(j, shingles(normalise_key(texts[j])))))
            flagged[i] = best
        else:
            lsh.insert(i, m)
    return flagged, time.perf_counter() - t


def full_build(rows, workdir: Path, tag: str) -> tuple[float, dict]:
    from gemtune.data.config import DataConfig
    from gemtune.data.pipeline import build

    src = workdir / f"corpus-{tag}.csv"
    write_csv(rows, src)
    cfg = DataConfig(instruction=ROUTING_INSTRUCTION, columns={"input": "text", "output": "category", "label": "category"})
    t = time.perf_counter()
    report = build([src], workdir / f"ds-{tag}", cfg)
    return time.perf_counter() - t, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--scaling", default="25000,50000,100000")
    ap.add_argument("--planted", type=float, default=0.08)
    args = ap.parse_args()

    base = clean_base([(r["text"], r["category"]) for s in ("train", "test") for r in banking77_rows(s)])
    rows, planted = make_corpus(base, args.rows, args.planted)
    texts = [t for t, _ in rows]
    print(f"corpus: {len(rows):,} rows from {len(base):,} clean banking77 rows; {len(planted):,} planted near-duplicates")

    g_flag, g_dedup_s = run_gemtune_dedup(texts)
    b_flag, b_s = run_baseline(texts)
    # Originals that are near-duplicates of an earlier row, by exact Jaccard (gemtune's matches are verified
    # pairs, i.e. facts about the corpus; the baseline's are re-checked exactly).
    dup_originals = {r for r, m in g_flag.items()} | {r for r, m in b_flag.items()
                                                      if jaccard(shingles(normalise_key(texts[r])),
                                                                 shingles(normalise_key(texts[m]))) >= 0.8}
    first = {c for c, o in planted.items() if o not in dup_originals}
    gq, bq = quality(g_flag, planted, texts, first), quality(b_flag, planted, texts, first)

    sizes = sorted({int(x) for x in args.scaling.split(",") if x} | {args.rows})
    scaling = []
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            # Same distribution at every size: the number of banking77 source rows grows with n, so each row has
            # the same number of perturbed siblings (similar but not near-duplicate rows) at 25k as at 100k.
            sub_base = base[:max(1, round(len(base) * n / args.rows))]
            sub_rows, _ = (rows, planted) if n == args.rows else make_corpus(sub_base, n, args.planted)
            secs, report = full_build(sub_rows, Path(d), str(n))
            fixed = report["timings_s"].get("tokenizer", 0.0)  # loading the 262k tokenizer: the same at any size
            scaling.append({"rows": n, "seconds": round(secs, 2), "rows_per_s": round(n / secs), "us_per_row": round(1e6 * secs / n, 1),
                            "fixed_s": round(fixed, 2), "us_per_row_excl_fixed": round(1e6 * (secs - fixed) / n, 1),
                            "stages_s": report["timings_s"], "near_duplicates": report["counts"]["near_duplicates"]})
            print(f"  full build {n:>7,} rows: {secs:6.1f} s  ({n / secs:,.0f} rows/s)  stages {report['timings_s']}")
    full = next(s for s in scaling if s["rows"] == args.rows)

    print()
    print(f"{'':34}{'gemtune':>14}{'datasketch':>14}{'ratio':>10}")
    print(f"{'dedup time (s)':34}{g_dedup_s:>14.2f}{b_s:>14.2f}{b_s / g_dedup_s:>9.2f}x")
    print(f"{'dedup rows/s':34}{len(rows) / g_dedup_s:>14,.0f}{len(rows) / b_s:>14,.0f}")
    for k in ("recall", "recall_first_occurrence", "planted_precision", "pair_precision"):
        print(f"{'near-dup ' + k.replace('_', ' '):34}{gq[k]:>14.4f}{bq[k]:>14.4f}")
    print(f"{'full build time (s), ' + format(args.rows, ','):34}{full['seconds']:>14.2f}{'—':>14}")
    print(f"{'full build rows/s':34}{full['rows_per_s']:>14,}")
    per_row = [s["us_per_row_excl_fixed"] for s in scaling]
    print("scaling, µs/row without the fixed tokenizer load: "
          + ", ".join(f"{s['rows']:,}: {s['us_per_row_excl_fixed']}" for s in scaling)
          + f"  → max/min {max(per_row) / min(per_row):.2f} (1.00 = perfectly linear)")
    print(f"peak RSS: {peak_rss_gib():.2f} GiB")
    p = write_result("data", {
        "rows": len(rows), "planted": len(planted),
        "gemtune": {"dedup_s": round(g_dedup_s, 2), "dedup_rows_per_s": round(len(rows) / g_dedup_s), **gq,
                    "full_build_s": full["seconds"], "full_build_rows_per_s": full["rows_per_s"], "stages_s": full["stages_s"]},
        "datasketch_baseline": {"dedup_s": round(b_s, 2), "dedup_rows_per_s": round(len(rows) / b_s), **bq,
                                "config": "MinHash(num_perm=128) + MinHashLSH(threshold=0.8), no verification"},
        "dedup_speed_ratio": round(b_s / g_dedup_s, 2),
        "scaling": scaling, "linearity_max_over_min_us_per_row": round(max(per_row) / min(per_row), 2),
        "target_full_build_s": 60, "peak_rss_gib": round(peak_rss_gib(), 2),
    })
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
