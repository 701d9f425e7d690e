"""Eval verdicts bound to weights (contract C1): what the registry reads before a push, a promote or a split.

The eval stage records each gate verdict in the adapter's sidecar under `eval_verdicts` (newest last), every one
naming the sha256 of the weights it judged (`adapter_sha256`), the suite's sha and what the baseline resolved to
(`baseline_id`: "base:…", "registry:NAME@vN", "openai:URL#MODEL", "adapter:<sha>", "results:<sha>"). A verdict
counts only for the weights it names, so changing one byte of them makes every earlier verdict irrelevant.

- A push needs at least one passing verdict for the weights it copies.
- A route change (promote, split) that gives traffic to a version the alias does not serve yet needs a passing
  verdict for that version's weights against a version the alias serves now (`registry:NAME@vM`); when the alias
  serves nothing yet, any passing verdict for the weights.

These functions only read dicts and return the reason to refuse (None when there is none); the store decides
whether a refusal holds (`--force`) and records it. No I/O here, so the rules are testable on their own.
"""

from __future__ import annotations

from typing import Iterable, Optional

VERDICTS = "eval_verdicts"
EVAL_HINT = "gemtune eval --adapter {where} --suite … --record"


def short(sha: Optional[str]) -> str:
    return f"{sha[:12]}…" if sha else "none"


def verdicts_in(sidecar: Optional[dict]) -> list[dict]:
    """The sidecar's verdict objects, newest last (anything that is not an object is ignored)."""
    got = (sidecar or {}).get(VERDICTS)
    return [v for v in got if isinstance(v, dict)] if isinstance(got, list) else []


def for_weights(sidecars: Iterable[Optional[dict]], weights_sha: Optional[str]) -> list[dict]:
    """Every verdict, from any of `sidecars`, made for exactly these weights."""
    if not weights_sha:
        return []
    return [v for s in sidecars for v in verdicts_in(s) if v.get("adapter_sha256") == weights_sha]


def _failed(v: dict) -> str:
    """One failed verdict in words: against what, and by how much."""
    parts = [f"against {v.get('baseline_id') or v.get('baseline') or '?'}"]
    share, gate = v.get("regressed_share"), v.get("gate")
    if isinstance(share, (int, float)) and isinstance(gate, (int, float)):
        parts.append(f"regressed on {share:.1%} of cases, gate {gate:.1%}")
    return ", ".join(parts)


def push_problem(sidecar: Optional[dict], weights_sha: Optional[str], where: str) -> Optional[str]:
    """Why these weights may not be pushed for lack of a passing eval verdict; None when one exists."""
    hint = f"run `{EVAL_HINT.format(where=where)}`"
    mine = for_weights([sidecar], weights_sha)
    if any(v.get("passed") is True for v in mine):
        return None
    if mine:
        return (f"the eval verdict for these weights (sha256 {short(weights_sha)}) did not pass ({_failed(mine[-1])})"
                f"; improve the adapter, or {hint} again once it does")
    others = verdicts_in(sidecar)
    if others:
        return (f"no eval verdict for these weights (sha256 {short(weights_sha)}): the verdict was for other weights "
                f"(sha256 {short(others[-1].get('adapter_sha256'))}); {hint}")
    return f"no eval verdict for these weights (sha256 {short(weights_sha)}): {hint}"


def route_problem(sidecars: Iterable[Optional[dict]], weights_sha: Optional[str], *, name: str, version: str,
                  alias: str, live: list[str], where: str) -> Optional[str]:
    """Why `name@version` may not take traffic on `name@alias`, which serves `live` now; None when it may.

    It needs a passing verdict for its weights against one of the live versions (`registry:NAME@vM`), or, when the
    alias serves nothing yet, any passing verdict for its weights."""
    mine = for_weights(sidecars, weights_sha)
    ref = f"{name}@{version} (sha256 {short(weights_sha)})"
    if not live:
        if any(v.get("passed") is True for v in mine):
            return None
        hint = f"run `{EVAL_HINT.format(where=where)}`"
        if mine:
            return f"the eval verdict for {ref} did not pass ({_failed(mine[-1])}); {hint} once it does"
        return f"no eval verdict for {ref}: {hint}"
    wanted = [f"registry:{name}@{v}" for v in live]
    against = [v for v in mine if v.get("baseline_id") in wanted]
    if any(v.get("passed") is True for v in against):
        return None
    serves = " and ".join(wanted)
    hint = (f"run `gemtune eval --adapter {where} --baseline registry:{name}@{alias} --suite … --record` "
            "(a verdict recorded in the directory the version was pushed from counts: it names the weights)")
    if against:
        return f"the eval verdict for {ref} against {serves} did not pass ({_failed(against[-1])}); {hint}"
    return f"no passing eval verdict for {ref} against {serves} (what {name}@{alias} serves now): {hint}"
