"""An OpenAI-compatible chat endpoint as the baseline: a frontier API, another `gemtune serve`, vLLM, a local server.

Each case's messages go to `POST {URL}/chat/completions` with the suite's `max_new_tokens` and temperature 0, and
the answer is scored by the same scorers as the adapter's, so the comparison (win-rate, regressions, McNemar) is
the one any other baseline gets. Answers are cached in the eval output cache keyed by (endpoint, model, case,
generation config): a rerun of an unchanged suite sends no request. At most `concurrency` requests are in flight;
a 429, a 5xx or a connection error is retried with exponential backoff (honouring a short `Retry-After`), a bounded
number of times; any other 4xx will not heal and stops at once. Either way the error names the endpoint (exit 2).
Token usage is recorded per case (also for cached answers: what they cost when they were bought), so the summary
can price the baseline per 1k cases (`--price`) beside the adapter (`--adapter-price`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Optional

import httpx

from gemtune.base.templates import format_tool_calls
from gemtune.errors import UserError
from gemtune.evals.baselines import DEFAULT_KEY_ENV, ExternalOptions
from gemtune.evals.cache import OutputCache
from gemtune.evals.judge import chat_url
from gemtune.evals.runner import RESULTS_VERSION, score_case, summarise
from gemtune.evals.scorers import ScoreContext
from gemtune.evals.suite import Case, Suite
from gemtune.utils import sha256_text

RETRY_AFTER_CAP_S = 30.0


def api_key(key_env: Optional[str]) -> Optional[str]:
    """The key from `key_env`; a variable named explicitly must be set. No name: $OPENAI_API_KEY when set, else
    none (a local server needs none)."""
    if key_env is None:
        return os.environ.get(DEFAULT_KEY_ENV) or None
    key = os.environ.get(key_env)
    if not key:
        raise UserError(f"--baseline-key-env {key_env}: the environment variable {key_env} is not set (or empty)",
                        field="baseline_key_env")
    return key


def usage_cost(prompt_tokens: int, completion_tokens: int, cases: int,
               price: Optional[tuple[float, float]]) -> Optional[dict]:
    """USD for these tokens at `price` (USD per 1M input, output tokens), and per 1k cases; None without a price."""
    if price is None:
        return None
    usd = prompt_tokens * price[0] / 1e6 + completion_tokens * price[1] / 1e6
    return {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens), "cases": int(cases),
            "usd_per_1m": {"input": price[0], "output": price[1]}, "usd": round(usd, 6),
            "usd_per_1k_cases": round(1000 * usd / cases, 6) if cases else None}


@dataclass
class ExternalModel:
    """One endpoint + model; `run(suite, cache)` returns a results.json document like `runner.evaluate`'s."""

    url: str
    model: str
    options: ExternalOptions = field(default_factory=ExternalOptions)
    requests_sent: int = 0  # HTTP requests, retries included
    retried: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.endpoint = chat_url(self.url)
        self.key = api_key(self.options.key_env)

    @property
    def name(self) -> str:
        return f"openai:{self.model}"

    def generation_key(self, suite: Suite) -> dict:
        return {"engine": "openai-chat", "endpoint": self.endpoint, "model": self.model,
                "max_new_tokens": suite.config.max_new_tokens, "temperature": 0}

    def body(self, case: Case, max_new_tokens: int) -> dict:
        body = {"model": self.model, "messages": case.messages, "max_tokens": max_new_tokens, "temperature": 0}
        tools = getattr(case, "tools", None)
        if tools:
            body["tools"] = tools
        return body

    def _count(self, retry: bool) -> None:
        with self._lock:
            self.requests_sent += 1
            self.retried += retry

    def complete(self, client: httpx.Client, body: dict) -> dict:
        """One case: {"output", "tokens", "prompt_tokens"}; retries 429/5xx/connection errors with backoff."""
        last, tries = "", max(1, self.options.retries)
        for attempt in range(tries):
            wait_s = self.options.backoff_s * (2 ** attempt)
            self._count(attempt > 0)
            try:
                r = client.post(self.endpoint, json=body)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return self._parse(r)
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code != 429 and r.status_code < 500:
                    raise UserError(f"baseline endpoint {self.endpoint} refused the request ({last})",
                                    field="baseline")
                wait_s = max(wait_s, _retry_after(r))
            if attempt + 1 < tries:
                time.sleep(wait_s)
        raise UserError(f"baseline endpoint {self.endpoint} unreachable or failing after {tries} tries ({last})",
                        field="baseline")

    def _parse(self, r: httpx.Response) -> dict:
        try:
            doc = r.json()
            msg = doc["choices"][0]["message"]
            text = msg.get("content") or ""
            usage = doc.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise UserError(f"baseline endpoint {self.endpoint} answered without choices[0].message "
                            f"({type(e).__name__}: {r.text[:200]})", field="baseline") from None
        if msg.get("tool_calls"):  # written in Gemma 3's call syntax, which the `tool_call` scorer parses by default
            try:
                calls = format_tool_calls(msg["tool_calls"], "gemma3")
            except (UserError, ValueError, KeyError, TypeError, AttributeError):
                calls = json.dumps(msg["tool_calls"], ensure_ascii=False)  # malformed calls: scored as a format error
            text = f"{text}\n{calls}" if text else calls
        return {"output": str(text).strip(), "tokens": int(usage.get("completion_tokens") or 0),
                "prompt_tokens": int(usage.get("prompt_tokens") or 0)}

    def outputs(self, suite: Suite, cache: OutputCache,
                progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
        """An answer per case (cache first, then the endpoint, `concurrency` at a time) and the run's stats."""
        gen = self.generation_key(suite)
        msha = sha256_text(json.dumps(["openai", self.endpoint, self.model], sort_keys=True))
        keys = [OutputCache.key(msha, c.key(), gen) for c in suite.cases]
        answers: list[Optional[dict]] = [None] * len(keys)
        hits_before, sent_before, retried_before = cache.hits, self.requests_sent, self.retried
        for i, k in enumerate(keys):
            hit = cache.get(k)
            if hit is not None and isinstance(hit.get("output"), str):
                answers[i] = hit
        missing = [i for i, a in enumerate(answers) if a is None]
        t0 = time.perf_counter()
        if missing:
            if progress:
                progress(f"{self.name}: asking {self.endpoint} for {len(missing)} of {len(keys)} cases "
                         f"({len(keys) - len(missing)} cached, {self.options.concurrency} at a time)")
            self._fetch(suite, missing, keys, answers, cache)
        seconds = time.perf_counter() - t0
        stats = {"cases_generated": len(missing), "cache_hits": cache.hits - hits_before,
                 "requests": self.requests_sent - sent_before, "retries": self.retried - retried_before,
                 "seconds": round(seconds, 4), "new_tokens": sum(int(answers[i]["tokens"]) for i in missing)}
        return answers, stats  # type: ignore[return-value]

    def _fetch(self, suite: Suite, missing: list[int], keys: list[str], answers: list, cache: OutputCache) -> None:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        n_tok = suite.config.max_new_tokens

        def one(i: int) -> None:
            a = self.complete(client, self.body(suite.cases[i], n_tok))
            answers[i] = a
            cache.put(keys[i], a)  # kept as it arrives: a run stopped half-way resumes where it stopped

        with httpx.Client(timeout=self.options.timeout_s, headers=headers) as client, \
                ThreadPoolExecutor(max_workers=max(1, min(self.options.concurrency, len(missing)))) as pool:
            futures = [pool.submit(one, i) for i in missing]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()
                raise failed[0].exception()  # type: ignore[misc]

    def run(self, suite: Suite, cache: OutputCache | None = None, *,
            progress: Callable[[str], None] | None = None) -> dict:
        """The results.json document of the endpoint on `suite`, scored like any model's."""
        cache = cache if cache is not None else OutputCache()
        answers, stats = self.outputs(suite, cache, progress)
        ctx = ScoreContext(labels=suite.labels, max_latency_ms=suite.config.max_latency_ms)
        rows = []
        for case, a in zip(suite.cases, answers):
            ok, scores = score_case(case, a["output"], ctx, None)
            rows.append({"id": case.id, "output": a["output"], "pass": ok, "scores": scores, "latency_ms": None,
                         "expected": case.expected, "prompt": case.prompt_text(), "tags": case.tags,
                         "new_tokens": int(a.get("tokens", 0)), "prompt_tokens": int(a.get("prompt_tokens", 0))})
        summary = summarise(suite, rows, self.name)
        summary["generation"] = stats
        summary["usage"] = {"prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                            "completion_tokens": sum(r["new_tokens"] for r in rows)}
        summary["placement"] = None
        cost = usage_cost(summary["usage"]["prompt_tokens"], summary["usage"]["completion_tokens"], len(rows),
                          self.options.price)
        if cost is not None:
            summary["cost"] = cost
        meta = {"version": RESULTS_VERSION, "name": self.name, "base": None, "base_sha256": None, "adapter": None,
                "adapter_sha256": None, "external": {"url": self.url, "endpoint": self.endpoint, "model": self.model},
                "suite": {"path": suite.path, "sha256": suite.sha256, "n": len(suite.cases)},
                "generation": self.generation_key(suite), "placement": None,
                "labels": sorted(suite.labels) if suite.labels else None}
        return {"meta": meta, "cases": rows, "summary": summary}


def _retry_after(r: httpx.Response) -> float:
    """A numeric `Retry-After` (seconds), capped so a server cannot park the eval for hours; 0 when absent."""
    try:
        return min(RETRY_AFTER_CAP_S, max(0.0, float(r.headers.get("retry-after", "0"))))
    except ValueError:
        return 0.0
