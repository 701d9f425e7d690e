"""Pairwise judge for open-ended cases, on any OpenAI-compatible `/v1/chat/completions` endpoint.

Scorers cannot say which of two free-form answers is better; a larger model can, but judges prefer whichever
answer they see first. So each differing pair is judged in both orders: a side wins only when both orders agree,
and a disagreement counts as a tie. Identical outputs are a tie without a call.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

from gemtune.errors import UserError

API_KEY_ENV = "GEMTUNE_JUDGE_API_KEY"

PROMPT = """You compare two answers to the same request and decide which one better fulfils it.

Request:
{prompt}

Reference answer (may be empty):
{expected}

Answer A:
{a}

Answer B:
{b}

Which answer is better? Reply with exactly one word: A, B, or TIE."""

_WORD = re.compile(r"\b(A|B|TIE)\b")


def chat_url(url: str) -> str:
    """Accept `http://host:port`, `.../v1` or the full `.../v1/chat/completions`."""
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if u.endswith("/v1"):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


def parse_choice(text: str) -> Optional[str]:
    m = _WORD.search(text.strip().upper().replace("[[", " ").replace("]]", " "))
    return m.group(1) if m else None


@dataclass
class PairwiseJudge:
    url: str
    model: str = "judge"
    api_key: Optional[str] = None
    timeout: float = 60.0
    retries: int = 2
    calls: int = 0
    unparseable: int = 0
    inconsistent: int = 0
    _client: httpx.Client = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self):
        key = self.api_key or os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=self.timeout, headers=headers)
        self.endpoint = chat_url(self.url)

    def close(self) -> None:
        self._client.close()

    def ask(self, prompt: str, expected: str, a: str, b: str) -> Optional[str]:
        """One judgement: "A", "B", "TIE", or None when the reply names none of them."""
        body = {"model": self.model, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": PROMPT.format(prompt=prompt, expected=expected, a=a, b=b)}]}
        last = ""
        for attempt in range(self.retries + 1):
            try:
                r = self._client.post(self.endpoint, json=body)
                if r.status_code == 200:
                    self.calls += 1
                    text = r.json()["choices"][0]["message"]["content"] or ""
                    choice = parse_choice(text)
                    self.unparseable += choice is None
                    return choice
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code < 500 and r.status_code != 429:
                    break
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.25 * (2 ** attempt))
        raise UserError(f"judge endpoint failed: {last}", file=self.endpoint, field="judge_url")

    def verdict(self, prompt: str, expected: str, baseline: str, candidate: str) -> str:
        """"candidate", "baseline" or "tie", from both presentation orders."""
        if baseline.strip() == candidate.strip():
            return "tie"
        first = {"A": "baseline", "B": "candidate"}.get(self.ask(prompt, expected, baseline, candidate) or "", "tie")
        second = {"A": "candidate", "B": "baseline"}.get(self.ask(prompt, expected, candidate, baseline) or "", "tie")
        if first != second:
            self.inconsistent += 1
            return "tie"
        return first

    def judge_results(self, candidate: dict, baseline: dict) -> dict[str, str]:
        """Verdicts for every case present in both results documents."""
        base_by_id = {str(c["id"]): c for c in baseline["cases"]}
        out = {}
        for c in candidate["cases"]:
            b = base_by_id.get(str(c["id"]))
            if b is None:
                continue
            out[str(c["id"])] = self.verdict(str(c.get("prompt", "")), _text(c.get("expected")),
                                             str(b.get("output", "")), str(c.get("output", "")))
        return out

    def stats(self) -> dict:
        return {"endpoint": self.endpoint, "model": self.model, "calls": self.calls,
                "inconsistent": self.inconsistent, "unparseable": self.unparseable}


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    import json

    return json.dumps(v, ensure_ascii=False)
