"""Near-duplicate detection: the definition, datasketch-identical signatures, and recall against brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gemtune.data.dedup import (BUCKET_CAP, NearDup, jaccard, minhash_signatures, near_duplicate_pairs, normalise_key,
                                shingle_hash32, shingles, similarity)


def test_normalised_key_is_lowercase_letters_digits_spaces():
    assert normalise_key("  Hello,   WORLD!!  it's_ 42\tnow ") == "hello world its 42 now"
    assert normalise_key("Café — déjà vu") == "café déjà vu"


def test_shingles_and_jaccard_follow_the_definition():
    assert shingles("abcdef") == frozenset({"abcde", "bcdef"})
    assert shingles("abc") == frozenset({"abc"})
    assert similarity("The card never arrived!", "the card never arrived") == 1.0
    a, b = "my card has not arrived yet", "my card has not arrived yet again"
    sa, sb = shingles(normalise_key(a)), shingles(normalise_key(b))
    assert similarity(a, b) == pytest.approx(len(sa & sb) / len(sa | sb))


def test_signatures_equal_datasketch_minhash():
    from datasketch import MinHash

    rng = random.Random(0)
    keys = ["", "a", "abcd", "abcde"] + ["".join(rng.choice("abc déf") for _ in range(rng.randint(1, 60))) for _ in range(40)]
    sig = minhash_signatures(keys, num_perm=64)
    for k, s in zip(keys, sig):
        m = MinHash(num_perm=64, seed=1, hashfunc=shingle_hash32)
        m.update_batch(list(shingles(k)))
        assert np.array_equal(m.hashvalues, s), k


def _corpus(n_base: int, seed: int):
    """Distinct short sentences plus planted near-duplicates (typos) and exact duplicates."""
    rng = random.Random(seed)
    words = ("card account transfer refund fee pin app login address payment statement branch limit cash atm "
             "travel abroad currency exchange blocked frozen pending declined salary loan mortgage").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + f" {rng.randint(0, 10**6)}" for _ in range(n_base)]
    planted = []
    for i in rng.sample(range(n_base), n_base // 5):
        t = list(texts[i])
        j = rng.randrange(len(t) - 1)
        t[j], t[j + 1] = t[j + 1], t[j]
        texts.append("".join(t))
        planted.append((i, len(texts) - 1))
    for i in rng.sample(range(n_base), n_base // 10):
        texts.append(texts[i].upper())
    return texts, planted


def test_greedy_dedup_matches_brute_force_definition():
    texts, _ = _corpus(400, 1)
    keys = [normalise_key(t) for t in texts]
    nd = NearDup(keys)
    verdicts = [nd.check(i) for i in range(len(keys))]
    kept = [i for i, v in enumerate(verdicts) if v.status == "kept"]
    # No pair of kept rows meets the definition...
    kept_texts = [texts[i] for i in kept]
    assert near_duplicate_pairs(kept_texts) == []
    # ...and every dropped row really is a duplicate of an earlier kept row.
    for i, v in enumerate(verdicts):
        if v.status in ("exact", "near"):
            assert v.match < i and verdicts[v.match].status == "kept"
            assert similarity(texts[i], texts[v.match]) >= 0.8
    # Everything the brute force calls a duplicate of an earlier row was removed (nothing missed).
    pairs = near_duplicate_pairs(texts)
    later = {j for i, j, s in pairs}
    assert later <= {i for i, v in enumerate(verdicts) if v.status != "kept"}


def test_eval_rows_take_priority_and_scopes_separate_tasks():
    keys = [normalise_key(t) for t in ["the card payment was declined twice today", "the card payment was declined twice todya",
                                        "the card payment was declined twice today"]]
    nd = NearDup(keys, scopes=["route", "route", "summarise"])
    nd.add_eval(1)
    assert nd.check(0).status == "decontaminated" and nd.check(0).match == 1
    nd2 = NearDup(keys, scopes=["route", "route", "summarise"])
    assert [nd2.check(i).status for i in range(3)] == ["kept", "near", "kept"]  # other task: not a duplicate


def test_recall_on_planted_pairs_at_scale():
    texts, planted = _corpus(3000, 2)
    keys = [normalise_key(t) for t in texts]
    nd = NearDup(keys)
    status = [nd.check(i).status for i in range(len(keys))]
    truly = [(a, b) for a, b in planted if similarity(texts[a], texts[b]) >= 0.8]
    found = sum(status[b] != "kept" for a, b in truly)
    assert found / len(truly) >= 0.99


def _greedy_reference(texts: list[str]) -> list[str]:
    """The definition applied literally: keep a row unless it is an exact or ≥ 0.8 duplicate of a row kept earlier."""
    keys = [normalise_key(t) for t in texts]
    sets = [shingles(k) for k in keys]
    kept, seen, out = [], set(), []
    for i, k in enumerate(keys):
        if k in seen:
            out.append("exact")
            continue
        seen.add(k)
        if any(jaccard(sets[i], sets[j]) >= 0.8 for j in kept):
            out.append("near")
        else:
            kept.append(i)
            out.append("kept")
    return out


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_block_dedup_equals_the_literal_greedy_definition(block):
    texts, _ = _corpus(700, 4)
    nd = NearDup([normalise_key(t) for t in texts])
    got = [v.status for v in nd.check_many(range(len(texts)), block=block)]
    assert got == _greedy_reference(texts)


def test_templated_rows_stay_fast_and_exact():
    """Templated text (every row ~0.75 similar to every other) is the worst case for LSH buckets and in-block pairs."""
    rng = random.Random(9)
    tmpl = "Dear customer, your order {} of {} has shipped and will arrive within {} working days, thank you"
    texts = [tmpl.format(rng.randint(10**5, 10**7), rng.choice(["shoes", "a laptop", "two books", "a sofa"]),
                         rng.randint(2, 9)) for _ in range(1500)]
    nd = NearDup([normalise_key(t) for t in texts])
    got = [v.status for v in nd.check_many(range(len(texts)), block=256)]
    assert got == _greedy_reference(texts)
    assert np.unique(nd._index.keys, return_counts=True)[1].max() == BUCKET_CAP  # capped buckets were exercised
