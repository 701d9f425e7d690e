"""Comparison statistics checked by hand, the gate on planted regressions through the real CLI, and the webhook
against a real HTTP server on 127.0.0.1."""

import json
from math import comb

import pytest

from gemtune.errors import UserError
from gemtune.evals.compare import compare, load_results
from gemtune.evals.notify import notify, post_webhook, summary_line
from gemtune.evals.stats import bootstrap_delta_ci, mcnemar_exact


def results(passes, name, outputs=None):
    cases = [{"id": f"c{i}", "output": (outputs or {}).get(i, f"out{i}"), "pass": bool(p), "scores": {},
              "latency_ms": None} for i, p in enumerate(passes)]
    n, k = len(passes), sum(map(bool, passes))
    return {"meta": {"name": name}, "cases": cases, "summary": {"name": name, "n": n, "passed": k, "accuracy": k / n}}


def test_mcnemar_matches_hand_computation():
    # b=1 regression, c=6 improvements: P(X<=1 | n=7, 1/2) = (C(7,0)+C(7,1))/2^7 = 8/128; two-sided = 16/128
    assert mcnemar_exact(1, 6) == pytest.approx(0.125, abs=1e-12)
    assert mcnemar_exact(6, 1) == pytest.approx(0.125, abs=1e-12)
    # b=2, c=10: (1 + 12 + 66) / 4096 * 2
    assert mcnemar_exact(2, 10) == pytest.approx(2 * (comb(12, 0) + comb(12, 1) + comb(12, 2)) / 2 ** 12, abs=1e-12)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 7) == pytest.approx(2 / 128)


def test_bootstrap_ci_matches_hand_computation():
    # One improvement in four cases: a resample's delta is K/4 with K ~ Binomial(4, 1/4).
    # P(K=0)=81/256=.316 > .025, so the 2.5% quantile is 0; P(K<=2)=243/256=.949 < .975 <= P(K<=3)=.996, so 0.75.
    lo, hi = bootstrap_delta_ci([0, 0, 0, 0], [1, 0, 0, 0], n_boot=20000, seed=0)
    assert (lo, hi) == (0.0, 0.75)
    # every case improves: every resample has delta 1
    assert bootstrap_delta_ci([0] * 5, [1] * 5) == (1.0, 1.0)
    # seeded: the same inputs give the same interval; the interval contains the observed delta
    base = [1] * 30 + [0] * 10
    cand = [1] * 27 + [0] * 3 + [1] * 8 + [0] * 2
    a = bootstrap_delta_ci(base, cand, seed=3)
    assert a == bootstrap_delta_ci(base, cand, seed=3)
    assert a[0] < (35 - 30) / 40 < a[1]


def test_compare_counts_and_gate():
    base = results([1] * 90 + [0] * 10, "base")
    cand_passes = [1] * 90 + [0] * 10
    cand_passes[0] = 0  # one regression
    for i in (90, 91, 92):
        cand_passes[i] = 1  # three improvements
    c = compare(results(cand_passes, "ckpt-400"), base, gate=0.02)
    assert c["regressions"] == ["c0"] and c["improvements"] == ["c90", "c91", "c92"]
    assert (c["wins"], c["losses"], c["ties"]) == (3, 1, 96)
    assert c["win_rate"] == pytest.approx((3 + 0.5 * 96) / 100)
    assert c["accuracy"] == {"candidate": 0.92, "baseline": 0.9, "delta": pytest.approx(0.02)}
    assert c["mcnemar"]["p_value"] == pytest.approx(mcnemar_exact(1, 3))
    assert c["gate"]["passed"] and c["regression_rate"] == 0.01
    line = summary_line({"name": "ckpt-400"}, c)
    assert line == "ckpt-400 acc 0.92 (+0.02 vs base) win 0.51 regress 1.0% p=0.625 PASS"
    # a priced run: the cost per 1k cases of both sides, before the verdict (a side without a price shows ?)
    cost = {"candidate": {"usd_per_1k_cases": 0.004183}, "baseline": {"usd_per_1k_cases": 0.014}}
    assert summary_line({"name": "ckpt-400", "cost": cost}, c).endswith(" p=0.625 $/1k cases 0.00418 vs 0.014 PASS")
    assert summary_line({"name": "x", "cost": {"candidate": None, "baseline": {"usd_per_1k_cases": 2.5}}},
                        c).endswith(" $/1k cases ? vs 2.5 PASS")
    # judge verdicts replace scorer outcomes in the win-rate (unjudged cases keep theirs), never the regressions
    v = compare(results(cand_passes, "x"), base, verdicts={f"c{i}": "candidate" for i in range(50)})
    assert (v["wins"], v["losses"]) == (50 + 3, 0) and v["regressions"] == ["c0"] and v["outcome_source"] == "judge"


def test_compare_pairs_by_id_and_refuses_disjoint_suites(tmp_path):
    base = results([1, 1, 0], "base")
    cand = results([1, 0], "cand")
    c = compare(cand, base)
    assert c["n"] == 2 and c["only_in_baseline"] == 1
    other = {"meta": {}, "cases": [{"id": "zz", "pass": True}]}
    with pytest.raises(UserError, match="share no case ids"):
        compare(other, base)
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"cases": [{"id": "a"}]}))
    with pytest.raises(UserError, match=r'r.json: field "cases\[0\]"'):
        load_results(p)
    p.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_results(p)


@pytest.mark.parametrize("regressed,code", [(2, 0), (8, 1)])
def test_eval_compare_planted_regressions_gate_and_one_post(tmp_path, cli, http_recorder, regressed, code):
    """200 cases: 2 regressions (1 %) pass the 2 % gate, 8 (4 %) fail it; each run POSTs exactly one line."""
    n = 200
    base = [1] * 180 + [0] * 20
    cand = list(base)
    for i in range(regressed):
        cand[i] = 0
    for i in range(180, 185):
        cand[i] = 1  # some improvements too: the gate looks at regressions, not the average
    bp, cp = tmp_path / "base.json", tmp_path / "cand.json"
    bp.write_text(json.dumps(results(base, "base")))
    cp.write_text(json.dumps(results(cand, "ckpt-7")))
    hook = http_recorder()
    rc = cli(["eval", "compare", str(cp), str(bp), "--gate", "0.02", "--slack-webhook", hook.url + "/hook",
              "--out", str(tmp_path / "cmp")])
    assert rc == code
    assert len(hook.posts) == 1
    text = hook.posts[0]["body"]["text"]
    assert list(hook.posts[0]["body"]) == ["text"] and "\n" not in text
    assert text.startswith("ckpt-7 acc ") and f"regress {regressed / n:.1%}" in text
    assert text.endswith("PASS" if code == 0 else "FAIL")
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["compare"]["regressions"] == [f"c{i}" for i in range(regressed)]
    assert summary["shippable"] is (code == 0)
    assert (tmp_path / "cmp" / "report.html").is_file()


def test_compare_bad_input_exits_2(tmp_path, cli, capsys):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"cases": "nope"}))
    assert cli(["eval", "compare", str(p), str(p)]) == 2
    assert "r.json" in capsys.readouterr().err


def test_webhook_retries_then_succeeds(http_recorder):
    answers = iter([500, 503, 200])
    hook = http_recorder(lambda body: (next(answers), {}))
    warnings = []
    assert post_webhook(hook.url, "line", backoff=0.01, warn=warnings.append) is True
    assert len(hook.posts) == 3 and all(p["body"] == {"text": "line"} for p in hook.posts) and not warnings


def test_webhook_failure_warns_and_never_raises(http_recorder):
    hook = http_recorder(lambda body: (500, {}))
    warnings = []
    assert post_webhook(hook.url, "line", retries=3, backoff=0.01, warn=warnings.append) is False
    assert len(hook.posts) == 3 and "HTTP 500" in warnings[0]
    gone = http_recorder()
    url = gone.url
    gone.close()
    warnings.clear()
    assert post_webhook(url, "line", retries=2, backoff=0.01, timeout=2, warn=warnings.append) is False
    assert warnings and "webhook post failed" in warnings[0]
    client_error = http_recorder(lambda body: (404, {}))
    assert post_webhook(client_error.url, "x", backoff=0.01, warn=warnings.append) is False
    assert len(client_error.posts) == 1  # a 404 will not heal: no retries


def test_webhook_failure_keeps_exit_code(tmp_path, cli, http_recorder, capsys):
    bp = tmp_path / "base.json"
    bp.write_text(json.dumps(results([1] * 10, "base")))
    hook = http_recorder(lambda body: (500, {}))
    assert cli(["eval", "compare", str(bp), str(bp), "--slack-webhook", hook.url]) == 0
    assert "webhook post failed" in capsys.readouterr().err


def test_notify_uses_env_webhook(http_recorder, monkeypatch):
    hook = http_recorder()
    monkeypatch.setenv("SLACK_WEBHOOK_URL", hook.url)
    printed = []
    assert notify("one line", echo=printed.append) is True
    assert printed == ["one line"] and hook.posts[0]["body"] == {"text": "one line"}
