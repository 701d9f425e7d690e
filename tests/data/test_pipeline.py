"""End-to-end `data build` on a planted messy file: the acceptance lines of the data-curation issue.

The base is the tiny Gemma 3 (character tokenizer) so a build takes well under a second; the real tokenizer is
exercised in test_tokens.py (slow).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gemtune.data.config import DataConfig
from gemtune.data.dedup import jaccard, normalise_key, shingles
from gemtune.data.pipeline import build
from gemtune.data.records import load_dataset_dir, tokenizer_sha256
from gemtune.data.sanitise import GEMMA_CONTROL_TOKENS
from gemtune.errors import UserError
from gemtune.utils import sha256_file

from messy_tickets import INSTRUCTION, record_key, typo


def _cfg(base: Path, **kw) -> DataConfig:
    return DataConfig(base=str(base), **kw)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def built(messy, tiny_gemma3, tmp_path):
    out = tmp_path / "ds"
    report = build([messy.path], out, _cfg(tiny_gemma3))
    return messy, out, report


def test_every_malformed_line_is_quarantined_with_its_line_number(built):
    messy, out, report = built
    q = _records(out / "quarantine.jsonl")
    lines = {r["line"] for r in q}
    assert lines == set(messy.malformed_lines), (lines ^ set(messy.malformed_lines))
    for r in q:
        assert r["file"] == str(messy.path) and r["reason"] and "raw" in r
    by_line = {r["line"]: r for r in q}
    assert by_line[max(messy.malformed_lines)]["reason"].startswith("too long")
    utf8_line = next(ln for ln, why in messy.malformed_lines.items() if why == "invalid UTF-8")
    assert "invalid UTF-8" in by_line[utf8_line]["reason"] and "\ufffd" in by_line[utf8_line]["raw"]
    assert report["counts"]["quarantined"] == len(messy.malformed_lines)


def test_no_planted_pii_reaches_any_output_file(built):
    messy, out, report = built
    written = "".join((out / f).read_text(encoding="utf-8") for f in ("train.jsonl", "eval.jsonl", "quarantine.jsonl"))
    for kind, value in messy.pii_values:
        assert value not in written, (kind, value)
        assert value.upper() not in written, (kind, value)
    assert "jane.doe@example.com" not in written and "415-555-2671" not in written  # inside a quarantined raw line
    assert "<EMAIL>" in written and "<IBAN>" in written
    for kind in ("EMAIL", "PHONE", "SSN", "CREDIT_CARD", "IBAN", "IP_ADDRESS"):
        assert report["pii"][kind] >= 4, kind


def test_control_tokens_are_neutralised(built, tiny_gemma3):
    messy, out, report = built
    train, evals, _ = load_dataset_dir(out)
    text = json.dumps(train + evals, ensure_ascii=False)
    for tok in GEMMA_CONTROL_TOKENS + ("<unused42>",):
        assert tok not in text, tok
    assert report["control_tokens_neutralised"] >= 9 * 2
    # The neutralised tickets survived and carry the look-alike text, which the tokenizer reads as plain characters.
    from gemtune.base.loader import load_tokenizer

    tok = load_tokenizer(tiny_gemma3)
    special_ids = set(tok.all_special_ids) - {tok.unk_token_id}  # the char-level tiny vocab maps "‹" to <unk>
    ctl = [r for r in train + evals if "‹end_of_turn›" in json.dumps(r, ensure_ascii=False)]
    assert ctl
    for r in ctl:
        for m in r["messages"]:
            assert not special_ids & set(tok(m["content"], add_special_tokens=False)["input_ids"])


def test_no_near_duplicate_pair_inside_train_or_across_train_and_eval(built):
    messy, out, report = built
    train, evals, _ = load_dataset_dir(out)
    keys = [shingles(normalise_key(record_key(r))) for r in train + evals]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert jaccard(keys[i], keys[j]) < 0.8, (record_key((train + evals)[i]), record_key((train + evals)[j]))
    assert report["counts"]["exact_duplicates"] == len(messy.exact_pairs)
    assert report["counts"]["near_duplicates"] == len(messy.near_pairs)


def test_accounting_identity_and_eval_fraction(built):
    messy, out, report = built
    c = report["counts"]
    assert c["input_rows"] == messy.n_lines
    assert c["input_rows"] == (c["train"] - c["generic_added"] + c["eval"] + c["quarantined"] + c["exact_duplicates"]
                               + c["near_duplicates"] + c["decontaminated"] + c["balanced_out"])
    assert 0.10 <= c["eval"] / (c["eval"] + c["train"] - c["generic_added"]) <= 0.15
    assert len(_records(out / "train.jsonl")) == c["train"] and len(_records(out / "eval.jsonl")) == c["eval"]
    # Every stage row: in = out + what it removed.
    for s in report["stages"]:
        removed = sum(s.get(k, 0) for k in ("quarantined", "exact_duplicates", "near_duplicates", "decontaminated", "balanced_out"))
        assert s["in"] - removed == s["out"] - s.get("generic_added", 0), s


def test_records_follow_the_contract(built, tiny_gemma3):
    messy, out, report = built
    train, evals, meta = load_dataset_dir(out)
    for r in train + evals:
        assert list(r)[:5] == ["id", "task", "messages", "provenance", "sha256"]
        assert r["messages"][-1]["role"] == "assistant"
    inst = [r for r in train + evals if r["messages"][0]["content"].startswith(INSTRUCTION)]
    assert inst and all(r["provenance"]["reviewer"] == "ops-team" and r["provenance"]["license"] == "internal" for r in inst)
    lock = json.loads((out / "eval.lock.json").read_text())
    assert [x["id"] for x in lock["rows"]] == [r["id"] for r in evals]
    assert [x["sha256"] for x in lock["rows"]] == [r["sha256"] for r in evals]
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tiny_gemma3)
    assert meta["eval_lock_sha256"] == sha256_file(out / "eval.lock.json")
    assert meta["counts"] == report["counts"]
    # Stratified: every queue with enough rows has some eval rows.
    queues = {r["messages"][-1]["content"] for r in evals}
    assert len(queues) >= 7


def test_eval_lock_reproduces_identical_eval_and_decontaminates(built, tiny_gemma3, tmp_path):
    messy, out, _ = built
    first_eval = (out / "eval.jsonl").read_bytes()
    lock_copy = tmp_path / "eval.lock.json"
    lock_copy.write_bytes((out / "eval.lock.json").read_bytes())
    evals = _records(out / "eval.jsonl")
    rng = random.Random(3)
    # A later, larger input: the old file, new distinct tickets, and near-duplicates of eval rows.
    bigger = tmp_path / "more.jsonl"
    planted = []
    with open(bigger, "w", encoding="utf-8") as f:
        for r in evals[:15]:
            key = record_key(r)
            for _ in range(20):
                t = typo(key, rng)
                if normalise_key(t) != normalise_key(key) and jaccard(shingles(normalise_key(t)), shingles(normalise_key(key))) >= 0.8:
                    break
            planted.append(t)
            f.write(json.dumps({"instruction": INSTRUCTION, "input": t, "output": r["messages"][-1]["content"]}) + "\n")
        for k in range(30):
            f.write(json.dumps({"instruction": INSTRUCTION, "input": f"new ticket {k}: my {k}th standing order to the gym "
                                f"failed {'twice' if k % 2 else 'again'} in branch {k * 7}", "output": "cancellation"}) + "\n")
    out2 = tmp_path / "ds2"
    report = build([messy.path, bigger], out2, _cfg(tiny_gemma3, eval_lock=str(lock_copy)))
    assert (out2 / "eval.jsonl").read_bytes() == first_eval
    assert (out2 / "eval.lock.json").read_bytes() == lock_copy.read_bytes()
    assert report["counts"]["decontaminated"] >= len(planted)
    train_keys = {normalise_key(record_key(r)) for r in _records(out2 / "train.jsonl")}
    assert not {normalise_key(t) for t in planted} & train_keys
    c = report["counts"]
    assert c["input_rows"] == (c["train"] - c["generic_added"] + c["eval"] + c["quarantined"] + c["exact_duplicates"]
                               + c["near_duplicates"] + c["decontaminated"] + c["balanced_out"])


def test_rebuilding_into_the_same_dir_keeps_the_frozen_eval_unless_refrozen(built, tiny_gemma3):
    messy, out, _ = built
    before = (out / "eval.jsonl").read_bytes()
    report = build([messy.path], out, _cfg(tiny_gemma3, eval_fraction=0.15))  # lock in OUT wins over the new fraction
    assert report["split"]["locked"] and (out / "eval.jsonl").read_bytes() == before
    report = build([messy.path], out, _cfg(tiny_gemma3, eval_fraction=0.15, refreeze=True))
    assert not report["split"]["locked"] and (out / "eval.jsonl").read_bytes() != before


def test_lock_with_missing_rows_stops_the_build(built, tiny_gemma3, tmp_path):
    messy, out, _ = built
    lines = messy.path.read_bytes().split(b"\n")
    evals = [r for r in _records(out / "eval.jsonl") if r["messages"][0]["content"].startswith(INSTRUCTION)]
    gone = [json.dumps(record_key(r), ensure_ascii=False)[1:-1].encode() for r in evals[:2]]
    smaller = tmp_path / "smaller.jsonl"
    smaller.write_bytes(b"\n".join(ln for ln in lines if not any(g in ln for g in gone)))
    with pytest.raises(UserError) as e:
        build([smaller], tmp_path / "ds3", _cfg(tiny_gemma3, eval_lock=str(out / "eval.lock.json")))
    assert "locked eval row" in str(e.value) and "--refreeze" in str(e.value)


def test_all_bad_and_missing_inputs_exit_2(cli, tmp_path, tiny_gemma3, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n{"input": "x"}\n[1, 2]\n', encoding="utf-8")
    assert cli("data", "build", str(bad), "--out", str(tmp_path / "o1"), "--base", str(tiny_gemma3), "-q") == 2
    err = capsys.readouterr().err
    assert "no usable row" in err and "bad.jsonl:1" in err
    assert not (tmp_path / "o1").exists()
    assert cli("data", "build", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o2"), "--base", str(tiny_gemma3)) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("text,category\n", encoding="utf-8")
    assert cli("data", "build", str(empty), "--out", str(tmp_path / "o3"), "--base", str(tiny_gemma3)) == 2


def test_bad_rows_exit_0_and_summary_points_to_quarantine(cli, messy, tiny_gemma3, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli("data", "build", str(messy.path), "--out", str(out), "--base", str(tiny_gemma3), "-q") == 0
    printed = capsys.readouterr().out
    assert f"{len(messy.malformed_lines)} row(s) quarantined" in printed and "quarantine.jsonl" in printed
    assert cli("data", "report", str(out)) == 0
    assert "input rows" in capsys.readouterr().out


def test_bad_option_names_the_field_and_exits_2(cli, messy, tiny_gemma3, tmp_path, capsys):
    assert cli("data", "build", str(messy.path), "--out", str(tmp_path / "o"), "--base", str(tiny_gemma3),
                "--eval-fraction", "1.5") == 2  # 0.4 is only advised against (a warning), 1.5 is no fraction
    err = capsys.readouterr().err
    assert 'field "--eval-fraction"' in err and "data.eval_fraction" in err


def test_generic_mix_fraction_and_never_in_eval(messy, tiny_gemma3, tmp_path):
    gen = tmp_path / "generic.jsonl"
    with open(gen, "w", encoding="utf-8") as f:
        for k in range(60):
            f.write(json.dumps({"id": f"seed_{k}", "instruction": f"Write a {k + 3}-line poem about topic number {k} "
                                f"and {['rivers', 'owls', 'trains', 'tea'][k % 4]} in the style of era {k * 13}",
                                "instances": [{"input": "", "output": f"poem {k} line one\nline two"}]}) + "\n")
        f.write('{"instruction": "broken generic"\n')
    report = build([messy.path], tmp_path / "g", _cfg(tiny_gemma3, generic=[str(gen)], generic_fraction=0.07))
    train, evals, _ = load_dataset_dir(tmp_path / "g")
    generic = [r for r in train if r["task"] == "generic"]
    c = report["counts"]
    assert len(generic) == c["generic_added"] > 0
    assert abs(c["generic_added"] / c["train"] - 0.07) < 0.01
    assert not [r for r in evals if r["task"] == "generic"]
    assert all(r["provenance"]["source"] == "generic.jsonl" and r["provenance"]["origin_id"].startswith("seed_") for r in generic)
    assert report["generic"]["quarantined"] == 1


def test_canaries_are_planted_in_train_and_recorded_outside(messy, tiny_gemma3, tmp_path):
    from gemtune.data.canaries import candidates, find_canary_file, load_canaries

    out = tmp_path / "c"
    report = build([messy.path], out, _cfg(tiny_gemma3, canaries=5))
    assert report["counts"]["canaries"] == 5
    train, evals, meta = load_dataset_dir(out)
    path = find_canary_file(out, meta)
    assert path == tmp_path / "c.canaries.json" and path.parent != out
    doc = load_canaries(path)
    assert len(doc["canaries"]) == 5 and doc["format"] == "***-***-###"
    by_id = {r["id"]: r for r in train}
    everything = "".join(p.read_text(encoding="utf-8") for p in out.iterdir() if p.name not in ("train.jsonl",))
    for c in doc["canaries"]:
        rec = by_id[c["row_id"]]
        assert rec["messages"][c["turn"]]["content"].endswith(c["text"]) and c["secret"] in c["text"]
        assert c["secret"] not in everything  # eval, report, dataset.json never reveal it
    cands = candidates(doc["format"], 100, exclude=tuple(c["secret"] for c in doc["canaries"]))
    assert len(set(cands)) == 100 and all(len(x) == 11 and x[3] == "-" for x in cands)


def test_token_limit_counts_the_full_template(messy, tiny_gemma3, tmp_path):
    report = build([messy.path], tmp_path / "t", _cfg(tiny_gemma3, max_tokens=200))
    train, evals, _ = load_dataset_dir(tmp_path / "t")
    from gemtune.base.loader import load_tokenizer
    from gemtune.base.templates import render
    from gemtune.base.families import GEMMA3_TEXT

    tok = load_tokenizer(tiny_gemma3)
    lengths = [len(render(r["messages"], tok, GEMMA3_TEXT).input_ids) for r in train + evals]
    assert max(lengths) <= 200
    assert report["tokens"]["all"]["max"] == max(lengths)
    too_long = [q for q in _records(tmp_path / "t" / "quarantine.jsonl") if q["reason"].startswith("too long")]
    assert len(too_long) > 1


def test_balance_caps_an_overrepresented_label(tiny_gemma3, tmp_path):
    rows = []
    for q, n in (("a", 30), ("b", 30), ("c", 30), ("d", 400)):
        for k in range(n):
            rows.append({"input": f"ticket {q} number {k} about thing {k * 31 % 97} in region {k % 11} {'x' * (k % 5)}",
                         "output": q, "label": q})
    f = tmp_path / "skew.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = build([f], tmp_path / "b", _cfg(tiny_gemma3, instruction="Route it.", balance_multiple=3.0))
    b = report["balance"]
    assert b["cap"] == 3 * b["median"] or b["cap"] == int(3 * b["median"]) + 1
    assert b["after"]["default/d"] == b["cap"] < b["before"]["default/d"]
    assert report["counts"]["balanced_out"] == b["before"]["default/d"] - b["cap"]
    evals = _records(tmp_path / "b" / "eval.jsonl")
    assert {r["label"] for r in evals} == {"a", "b", "c", "d"}  # eval keeps the real distribution, stratified


def test_output_dir_is_replaced_atomically_on_failure(messy, tiny_gemma3, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    build([messy.path], out, _cfg(tiny_gemma3))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="canaries"):
        build([messy.path], out, _cfg(tiny_gemma3, canaries=5000))

    def crash(report):  # fails halfway through writing the new directory
        raise OSError("disk full")

    monkeypatch.setattr("gemtune.data.pipeline.render_html", crash)
    with pytest.raises(OSError):
        build([messy.path], out, _cfg(tiny_gemma3, eval_fraction=0.15, refreeze=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_token_limit_is_exact_when_statistics_are_sampled(messy, tiny_gemma3, tmp_path, monkeypatch):
    import gemtune.data.tokens as tokens

    full = build([messy.path], tmp_path / "full", _cfg(tiny_gemma3, max_tokens=150))
    monkeypatch.setattr(tokens, "COUNT_ALL_UP_TO", 50)
    monkeypatch.setattr(tokens, "STATS_SAMPLE", 40)
    sampled = build([messy.path], tmp_path / "sampled", _cfg(tiny_gemma3, max_tokens=150))
    assert sampled["tokens"]["sampled"] and not full["tokens"]["sampled"]
    # The same rows are quarantined as too long: the limit never depends on the sample.
    too_long = lambda d: sorted(q["line"] for q in _records(d / "quarantine.jsonl") if q["reason"].startswith("too long"))
    assert too_long(tmp_path / "sampled") == too_long(tmp_path / "full") and len(too_long(tmp_path / "full")) > 5
    assert sampled["counts"] == full["counts"]
    assert sampled["tokens"]["all"]["max"] == full["tokens"]["all"]["max"]
    assert (tmp_path / "sampled" / "train.jsonl").read_bytes() == (tmp_path / "full" / "train.jsonl").read_bytes()
