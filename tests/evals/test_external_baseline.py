"""An OpenAI-compatible endpoint as the baseline (`--baseline openai:URL#MODEL`): a real server on 127.0.0.1 (a small
FastAPI app under uvicorn that counts requests and answers per prompt, and a real `gemtune serve`), compared like
any baseline (win-rate, regressions, McNemar), cached (a rerun sends nothing), retried on 429, bounded in
concurrency, priced per 1k cases; an endpoint that cannot be reached exits 2 naming it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gemtune.evals.config import EvalConfig
from gemtune.evals.pipeline import Evaluator
from gemtune.evals.stats import mcnemar_exact
from gemtune.evals.suite import load_suite

MODEL = "gpt-test"
WRONG = "WRONG ANSWER"


class FakeOpenAI:
    """`POST /v1/chat/completions` answering `answers[last user message]` with a fixed usage; counts requests and
    the most requests in flight at once. `fail_first`: that many 429s first. `hold`: each request waits until that
    many are in flight (bounded), so a client that sends them one at a time never reaches it. `key`: required
    bearer key."""

    def __init__(self, answers: dict[str, str], *, fail_first: int = 0, hold: int = 0, key: str | None = None,
                 status: int = 200):
        from gemtune.serve.server import ServerThread

        self.answers, self.fail_first, self.hold, self.key, self.status = answers, fail_first, hold, key, status
        self.requests, self.inflight, self.max_inflight = 0, 0, 0
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self._lock = threading.Lock()
        app = FastAPI()
        full = asyncio.Event()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self._lock:
                self.requests += 1
                n = self.requests
                self.bodies.append(body)
                self.auth.append(request.headers.get("authorization"))
            if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
                return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
            if n <= self.fail_first:
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429)
            if self.status != 200:
                return JSONResponse({"error": {"message": "no"}}, status_code=self.status)
            self.inflight += 1  # one event loop: no lock needed between awaits
            self.max_inflight = max(self.max_inflight, self.inflight)
            if self.hold and self.inflight >= self.hold:
                full.set()
            try:
                if self.hold:
                    try:
                        await asyncio.wait_for(full.wait(), timeout=60)
                    except asyncio.TimeoutError:
                        pass
                text = self.answers.get(body["messages"][-1]["content"], WRONG)
            finally:
                self.inflight -= 1
            return {"id": f"c{n}", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}

        self.server = ServerThread(app).start()
        self.url = f"{self.server.url}/v1"

    def close(self):
        self.server.stop()


@pytest.fixture
def fake_openai():
    servers = []

    def start(answers, **kw) -> FakeOpenAI:
        s = FakeOpenAI(answers, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def base_suite(base, tmp_path, suite_writer, n=6):
    """Cases c0..c3 expect the base's own greedy answer (the base passes them), c4.. an answer it never gives."""
    raw = suite_writer(tmp_path / "raw.jsonl", n=n)
    cfg = EvalConfig(max_new_tokens=6, batch_size=4)
    res = Evaluator(base, config=cfg).run(load_suite(raw, cfg))
    prompts = [json.loads(line)["prompt"] for line in raw.read_text().splitlines()]
    rows = [{"id": c["id"], "prompt": p, "expected": c["output"] if i < 4 else f"ANSWER-{i}", "scorers": ["exact"]}
            for i, (c, p) in enumerate(zip(res["cases"], prompts))]
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(d):
    return (json.loads((d / "summary.json").read_text()), json.loads((d / "results.json").read_text()))


def test_external_baseline_compared_cached_and_priced(tiny_gemma3, tmp_path, cli, suite_writer, fake_openai):
    suite, rows = base_suite(tiny_gemma3, tmp_path, suite_writer)
    # the endpoint: right on c0, c1 and c4; wrong on c2, c3, c5 (the base: right on c0..c3)
    right = {0, 1, 4}
    srv = fake_openai({r["prompt"]: (r["expected"] if i in right else WRONG) for i, r in enumerate(rows)})
    args = ["eval", "--adapter", "base", "--base", str(tiny_gemma3), "--suite", str(suite), "--max-new-tokens", "6",
            "--batch-size", "4", "--baseline", f"openai:{srv.url}#{MODEL}", "--gate", "0.5",
            "--price", "1,2", "--adapter-price", "0.1,0.1"]
    assert cli(args + ["--out", str(tmp_path / "a")]) == 0
    assert srv.requests == 6
    assert {b["model"] for b in srv.bodies} == {MODEL} and all(b["temperature"] == 0 and b["max_tokens"] == 6
                                                                for b in srv.bodies)
    s, res = _read(tmp_path / "a")
    c = s["compare"]
    assert c["n"] == 6 and c["baseline"] == f"openai:{MODEL}"
    assert c["regressions"] == ["c4"] and c["improvements"] == ["c2", "c3"]
    assert (c["wins"], c["losses"], c["ties"]) == (2, 1, 3) and c["win_rate"] == pytest.approx(3.5 / 6, abs=1e-6)
    assert c["accuracy"] == {"candidate": pytest.approx(4 / 6, abs=1e-6), "baseline": 0.5,
                             "delta": pytest.approx(1 / 6, abs=1e-6)}
    assert c["mcnemar"]["p_value"] == pytest.approx(mcnemar_exact(1, 2)) and c["regression_rate"] == pytest.approx(1 / 6, abs=1e-6)
    assert s["baseline"]["id"] == f"openai:{srv.url}#{MODEL}" and s["baseline"]["kind"] == "openai"
    # usage and cost: 6 cases x (10 in at $1/M + 2 out at $2/M) = $0.000084 → $0.014 per 1k cases
    b = json.loads((tmp_path / "a" / "baseline_results.json").read_text())
    assert [x["output"] for x in b["cases"]] == [r["expected"] if i in right else WRONG for i, r in enumerate(rows)]
    assert b["summary"]["usage"] == {"prompt_tokens": 60, "completion_tokens": 12}
    assert s["cost"]["baseline"]["usd_per_1k_cases"] == pytest.approx(0.014)
    cand = s["cost"]["candidate"]
    assert cand["completion_tokens"] == sum(x["new_tokens"] for x in res["cases"]) and cand["prompt_tokens"] > 0
    assert cand["usd_per_1k_cases"] == pytest.approx(1000 * 0.1 * (cand["prompt_tokens"] + cand["completion_tokens"]) / 1e6 / 6, abs=1e-6)
    assert f"vs openai:{MODEL})" in s["line"] and " $/1k cases " in s["line"] and s["line"].endswith(" PASS")

    # a second run: every answer from the cache, not one request, the same comparison
    assert cli(args + ["--out", str(tmp_path / "b")]) == 0
    assert srv.requests == 6
    s2, _ = _read(tmp_path / "b")
    b2 = json.loads((tmp_path / "b" / "baseline_results.json").read_text())
    assert b2["summary"]["generation"]["requests"] == 0 and b2["summary"]["generation"]["cache_hits"] == 6
    assert {k: v for k, v in s2["compare"].items() if k != "delta_ci"} == \
        {k: v for k, v in s["compare"].items() if k != "delta_ci"}
    assert s2["cost"]["baseline"] == s["cost"]["baseline"]  # usage comes back with the cached answers
    # another model on the same endpoint is another cache entry
    assert cli(args[:-6] + ["--baseline", f"openai:{srv.url}#other", "--gate", "1", "--out", str(tmp_path / "c")]) == 0
    assert srv.requests == 12


def test_429_is_retried_and_the_key_comes_from_the_named_variable(tiny_gemma3, tmp_path, cli, suite_writer,
                                                                  fake_openai, monkeypatch, capsys):
    suite = suite_writer(tmp_path / "s.jsonl", n=2, scorers=["exact"])
    srv = fake_openai({}, fail_first=1, key="sekrit")
    monkeypatch.setenv("MY_PROVIDER_KEY", "sekrit")
    args = ["eval", "--adapter", "base", "--base", str(tiny_gemma3), "--suite", str(suite), "--max-new-tokens", "2",
            "--baseline", f"openai:{srv.url}#{MODEL}", "--baseline-concurrency", "1", "--gate", "1"]
    assert cli(args + ["--out", str(tmp_path / "o"), "--baseline-key-env", "MY_PROVIDER_KEY"]) == 0
    assert srv.requests == 3 and set(srv.auth) == {"Bearer sekrit"}  # one 429, then two answers
    b = json.loads((tmp_path / "o" / "baseline_results.json").read_text())["summary"]["generation"]
    assert (b["requests"], b["retries"], b["cases_generated"]) == (3, 1, 2)
    # a named variable that is not set is an input error, before anything is sent
    monkeypatch.delenv("MY_PROVIDER_KEY")
    assert cli(args + ["--out", str(tmp_path / "p"), "--baseline-key-env", "MY_PROVIDER_KEY", "--no-cache"]) == 2
    assert "MY_PROVIDER_KEY" in " ".join(capsys.readouterr().err.split()) and srv.requests == 3


def test_unreachable_or_refusing_endpoint_exits_2_naming_it(tiny_gemma3, tmp_path, cli, suite_writer, fake_openai,
                                                           capsys):
    suite = suite_writer(tmp_path / "s.jsonl", n=2, scorers=["exact"])
    url = f"http://127.0.0.1:{closed_port()}/v1"
    args = ["eval", "--adapter", "base", "--base", str(tiny_gemma3), "--suite", str(suite), "--max-new-tokens", "2"]
    assert cli(args + ["--out", str(tmp_path / "o"), "--baseline", f"openai:{url}#{MODEL}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{url}/chat/completions" in err and "4 tries" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written
    # a 4xx other than 429 will not heal: no case is tried twice (2 cases: at most 2 requests), exit 2, URL named
    srv = fake_openai({}, status=404)
    assert cli(args + ["--out", str(tmp_path / "o"), "--baseline", f"openai:{srv.url}#{MODEL}"]) == 2
    assert 1 <= srv.requests <= 2 and f"{srv.url}/chat/completions" in " ".join(capsys.readouterr().err.split())
    # a malformed spec
    assert cli(args + ["--out", str(tmp_path / "o"), "--baseline", "openai:127.0.0.1:8000"]) == 2
    assert "expected openai:URL#MODEL" in " ".join(capsys.readouterr().err.split())


def test_concurrency_is_bounded(tiny_gemma3, tmp_path, suite_writer, fake_openai):
    from gemtune.evals.baselines import ExternalOptions
    from gemtune.evals.external import ExternalModel

    suite = load_suite(suite_writer(tmp_path / "s.jsonl", n=7, scorers=["exact"]), EvalConfig(max_new_tokens=2))
    srv = fake_openai({}, hold=2)  # each request waits until two are in flight
    doc = ExternalModel(srv.url, MODEL, ExternalOptions(concurrency=2)).run(suite)
    assert srv.requests == 7 and srv.max_inflight == 2
    assert [c["output"] for c in doc["cases"]] == [WRONG] * 7 and doc["summary"]["n"] == 7


def test_a_real_gemtune_server_as_the_baseline(tiny_gemma3, tmp_path, suite_writer):
    """Another `gemtune serve` (the embedded engine on the same tiny base) answers what the local base answers."""
    from gemtune.evals.pipeline import run_eval
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    suite = suite_writer(tmp_path / "s.jsonl", n=4)
    gw = build_gateway(str(tmp_path / "registry"), base=str(tiny_gemma3), max_model_len=256, max_batch=4,
                       poll_s=0.1)
    with ServerThread(create_app(gw)) as server:
        o = run_eval("base", suite, tmp_path / "o", base=str(tiny_gemma3), baseline=f"openai:{server.url}/v1#base",
                     config=EvalConfig(max_new_tokens=6, batch_size=4, gate=1.0), echo=lambda s: None)
    local = [c["output"] for c in o.results["cases"]]
    served = [c["output"] for c in o.baseline["cases"]]
    assert served == local and o.comparison["n"] == 4 and o.comparison["wins"] == o.comparison["losses"] == 0
    assert o.baseline["summary"]["usage"]["completion_tokens"] > 0


def test_an_endpoints_tool_calls_are_scored_by_the_tool_call_scorer():
    """An OpenAI endpoint answers a tool call in `message.tool_calls` (content null): the output is written in the
    call syntax the `tool_call` scorer parses, so a right call passes and a wrong argument fails on that argument."""
    import httpx

    from gemtune.evals.external import ExternalModel
    from gemtune.evals.scorers import ScoreContext, ScorerSpec, score_one

    ext = ExternalModel("http://127.0.0.1:9/v1", MODEL)
    expected = [{"id": "x", "type": "function", "function": {"name": "track", "arguments": '{"id": "SH-1", "n": 2}'}}]

    def answer(args: str) -> str:
        body = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "track", "arguments": args}}]}}],
            "usage": {"completion_tokens": 7, "prompt_tokens": 3}}
        return ext._parse(httpx.Response(200, json=body))["output"]

    spec, ctx = ScorerSpec("tool_call"), ScoreContext()
    right = score_one(spec, answer('{"n": 2, "id": "SH-1"}'), expected, ctx)
    wrong = score_one(spec, answer('{"n": 3, "id": "SH-1"}'), expected, ctx)
    assert right.passed is True and right.format_ok is True
    assert wrong.passed is False and wrong.format_ok is True and "n" in wrong.detail
