"""The pairwise judge against real OpenAI-compatible endpoints on 127.0.0.1 that answer deterministically."""

import json
import re

import pytest

from gemtune.errors import UserError
from gemtune.evals.judge import PairwiseJudge, chat_url, parse_choice


def content_judge(body):
    """Prefers the answer containing "good" whatever its position; TIE when neither or both do."""
    text = body["messages"][0]["content"]
    a = re.search(r"Answer A:\n(.*?)\n\nAnswer B:", text, re.S).group(1)
    b = re.search(r"Answer B:\n(.*?)\n\nWhich answer", text, re.S).group(1)
    choice = "TIE" if ("good" in a) == ("good" in b) else ("A" if "good" in a else "B")
    return 200, {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": f"{choice}."}, "finish_reason": "stop"}]}


def always_a(body):
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}}]}


def docs(pairs):
    base = {"meta": {"name": "base"}, "cases": [], "summary": {}}
    cand = {"meta": {"name": "cand"}, "cases": [], "summary": {}}
    for i, (b, c) in enumerate(pairs):
        base["cases"].append({"id": f"c{i}", "output": b, "pass": True, "prompt": f"q{i}", "expected": ""})
        cand["cases"].append({"id": f"c{i}", "output": c, "pass": True, "prompt": f"q{i}", "expected": ""})
    return cand, base


PAIRS = [("bad", "good answer"), ("good one", "meh"), ("same", "same"), ("x", "y"), ("good", "good too")]


def test_judge_both_orders_content_based(http_recorder):
    srv = http_recorder(content_judge)
    judge = PairwiseJudge(srv.url, model="gemma-judge")
    cand, base = docs(PAIRS)
    v = judge.judge_results(cand, base)
    assert v == {"c0": "candidate", "c1": "baseline", "c2": "tie", "c3": "tie", "c4": "tie"}
    # identical outputs cost no call; every other pair is asked twice, once per order
    assert len(srv.posts) == 2 * 4 and judge.calls == 8 and judge.inconsistent == 0
    assert all(p["path"] == "/v1/chat/completions" and p["body"]["model"] == "gemma-judge"
               and p["body"]["temperature"] == 0 for p in srv.posts)
    first, second = srv.posts[0]["body"]["messages"][0]["content"], srv.posts[1]["body"]["messages"][0]["content"]
    assert "Answer A:\nbad\n" in first and "Answer A:\ngood answer\n" in second  # the order really swapped


def test_position_biased_judge_cancels_to_ties(http_recorder):
    srv = http_recorder(always_a)
    judge = PairwiseJudge(srv.url + "/v1")
    cand, base = docs(PAIRS[:2])
    assert judge.judge_results(cand, base) == {"c0": "tie", "c1": "tie"}
    assert judge.inconsistent == 2


def test_judge_feeds_win_rate_through_cli(tmp_path, cli, http_recorder):
    srv = http_recorder(content_judge)
    cand, base = docs([("bad", "good")] * 3 + [("same", "same")])
    cp, bp = tmp_path / "c.json", tmp_path / "b.json"
    cp.write_text(json.dumps(cand))
    bp.write_text(json.dumps(base))
    assert cli(["eval", "compare", str(cp), str(bp), "--judge-url", srv.url, "--out", str(tmp_path / "o")]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["compare"]["outcome_source"] == "judge" and s["compare"]["wins"] == 3 and s["compare"]["ties"] == 1
    assert s["compare"]["win_rate"] == pytest.approx((3 + 0.5) / 4)
    assert s["judge"]["calls"] == 6


def test_judge_endpoint_errors_are_user_errors(http_recorder, cli, tmp_path, capsys):
    srv = http_recorder(lambda body: (401, {"error": "bad key"}))
    judge = PairwiseJudge(srv.url, retries=2)
    with pytest.raises(UserError, match=r"judge endpoint failed: HTTP 401"):
        judge.verdict("q", "", "a", "b")
    assert len(srv.posts) == 1  # 4xx: no retry
    cand, base = docs([("a", "b")])
    cp = tmp_path / "c.json"
    cp.write_text(json.dumps(cand))
    (tmp_path / "b.json").write_text(json.dumps(base))
    assert cli(["eval", "compare", str(cp), str(tmp_path / "b.json"), "--judge-url", srv.url]) == 2
    assert "judge_url" in capsys.readouterr().err


def test_url_forms_and_reply_parsing():
    assert chat_url("http://h:1") == chat_url("http://h:1/v1/") == chat_url("http://h:1/v1/chat/completions") \
        == "http://h:1/v1/chat/completions"
    assert parse_choice("B") == "B" and parse_choice("[[A]]") == "A" and parse_choice("tie.") == "TIE"
    assert parse_choice("Answer B is better") == "B" and parse_choice("neither") is None
