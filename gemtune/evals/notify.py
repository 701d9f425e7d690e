"""The one line a team reads in Slack, and the webhook that carries it.

`ckpt-400 acc 0.81 (+0.06 vs base) win 0.74 regress 1.2% p=0.003 PASS` — enough to decide whether to look closer;
the baseline is named as resolved (`registry:support-router@v3 (live as prod)`, `openai:gpt-4o-mini`), and a priced
run adds the cost per 1k cases of both sides before the verdict.
Posting retries with backoff on network errors, 429 and 5xx (a 4xx will not heal); a webhook that still fails
produces a warning and never fails the run: the eval result matters more than its announcement.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

WEBHOOK_ENV = "SLACK_WEBHOOK_URL"


def summary_line(summary: dict, comparison: Optional[dict] = None) -> str:
    name = summary.get("name", "?")
    acc = summary.get("accuracy", 0.0)
    if not comparison:
        line = f"{name} acc {acc:.2f} ({summary.get('passed', 0)}/{summary.get('n', 0)})"
        if summary.get("format_compliance") is not None:
            line += f" format {summary['format_compliance']:.2f}"
        return line
    delta = comparison["accuracy"]["delta"]
    p = comparison["mcnemar"]["p_value"]
    verdict = "PASS" if comparison["gate"]["passed"] else "FAIL"
    return (f"{name} acc {comparison['accuracy']['candidate']:.2f} ({delta:+.2f} vs {comparison['baseline']}) "
            f"win {comparison['win_rate']:.2f} regress {comparison['regression_rate']:.1%} p={p:.3g}"
            f"{cost_part(summary.get('cost'))} {verdict}")


def cost_part(cost: Optional[dict]) -> str:
    """` $/1k cases 0.012 vs 1.5` (candidate vs baseline; `?` for a side without a price); empty without any."""
    if not cost:
        return ""

    def fmt(side: Optional[dict]) -> str:
        v = (side or {}).get("usd_per_1k_cases")
        return "?" if v is None else f"{v:.3g}"

    return f" $/1k cases {fmt(cost.get('candidate'))} vs {fmt(cost.get('baseline'))}"


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def post_webhook(url: str, text: str, *, retries: int = 3, backoff: float = 0.5, timeout: float = 10.0,
                 warn: Callable[[str], None] = _warn) -> bool:
    """POST `{"text": text}`; True when the endpoint answered 2xx. Never raises."""
    body = json.dumps({"text": text}).encode("utf-8")
    last = ""
    for attempt in range(1, retries + 1):
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if 200 <= resp.status < 300:
                    return True
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code < 500 and e.code != 429:
                break
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if isinstance(e, ValueError):  # malformed URL: retrying cannot help
                break
        if attempt < retries:
            time.sleep(backoff * (2 ** (attempt - 1)))
    warn(f"webhook post failed ({last}); the eval result stands")
    return False


def notify(line: str, webhook: Optional[str] = None, *, echo: Callable[[str], None] = print, **post_kw) -> bool:
    """Print the line; POST it when a webhook is given (or `SLACK_WEBHOOK_URL` is set). True if posted."""
    echo(line)
    url = webhook or os.environ.get(WEBHOOK_ENV)
    if not url:
        return False
    return post_webhook(url, line, **post_kw)
