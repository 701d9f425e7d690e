"""Property-based requests from the server's own OpenAPI schema (`/openapi.json`), against the real server.

Every operation gets schema-valid (positive) and schema-violating (negative) examples from Schemathesis, each sent
four times: without a key, as the victim tenant, as the hostile tenant and as the admin. Checked on every answer:
no 5xx; every 4xx in OpenAI's error shape; no answer to a tenant (or to no key) names an adapter of the other tenant
unless the request itself did. Deterministic (hypothesis derandomize) and bounded (max_examples per operation).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

EXAMPLES = 15  # per operation and generation mode; every example is sent 4 times
MIN_REQUESTS = 1000


def _sent_text(resp) -> str:
    req = resp.request
    body = req.body or b""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    return (req.url or "") + body.decode("utf-8", "replace")


def test_generated_requests_never_5xx_always_openai_errors_never_leak(secure):
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(secure.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = sorted(f"{op.method.upper()} {op.path}" for op in operations)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /v1/load_lora_adapter",
            "POST /v1/unload_lora_adapter", "GET /admin/routes", "POST /admin/routes/promote",
            "POST /admin/routes/split", "POST /admin/routes/rollback", "GET /healthz", "GET /metrics"} <= set(labels)

    auths = {"none": None, "victim": secure.victim, "hostile": secure.hostile, "admin": secure.admin}
    foreign = {"none": secure.victim_adapters + secure.hostile_adapters, "victim": secure.hostile_adapters,
               "hostile": secure.victim_adapters, "admin": ()}
    sent: Counter = Counter()
    statuses: Counter = Counter()
    problems: list[str] = []
    session = requests.Session()

    def check(case, who: str) -> None:
        key = auths[who]
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if key:
            case.headers["Authorization"] = f"Bearer {key}"
        resp = case.call(base_url=secure.url, session=session, timeout=120)
        sent[(case.operation.label, who)] += 1
        statuses[(case.operation.label, resp.status_code)] += 1
        where = f"{case.operation.label} as {who}: {resp.status_code} {resp.content[:200]!r}"
        if resp.status_code >= 500:
            problems.append("5xx: " + where)
            return
        if resp.status_code >= 400:
            try:
                body = json.loads(resp.content)
                err = body["error"]
                ok = (set(body) == {"error"} and set(err) == {"message", "type", "param", "code"}
                      and isinstance(err["message"], str) and err["code"] == resp.status_code)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                problems.append("not OpenAI's error shape: " + where)
        text = resp.content.decode("utf-8", "replace")
        asked = _sent_text(resp)
        for name in foreign[who]:
            if name in text and name not in asked:
                problems.append(f"names {name!r}: " + where)

    # random names almost never hit a real adapter: most examples get a real (or near-real) one in the field
    # that names it, so generation, foreign-adapter 404s and admin changes on real adapters are exercised too
    real = ["base", *secure.victim_adapters, *secure.hostile_adapters, "victim-bot@v1", "hostile-a@v1",
            "hostile-b@prod", "victim-bot@v2", "hostile-a@canary"]
    name_fields = ("model", "lora_name", "name")

    def with_real_name(case, name):
        if name is not None and isinstance(case.body, dict):
            for f in name_fields:
                if f in case.body:
                    case.body[f] = name if f != "name" else name.split("@")[0]
        return case

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = st.builds(with_real_name, op.as_strategy(generation_mode=mode),
                                 st.sampled_from([*real, None]))

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                for who in auths:
                    check(case, who)

            try:
                run()
            except Exception as e:  # e.g. no negative example exists for an operation without inputs
                if "Unsatisfiable" not in type(e).__name__ and "GenerationError" not in type(e).__name__:
                    raise

    total = sum(sent.values())
    assert not problems, f"{len(problems)} bad answers of {total}:\n" + "\n".join(problems[:20])
    assert total >= MIN_REQUESTS, (total, sent)
    for path in ("/v1/chat/completions", "/v1/completions"):  # generation really ran, and foreign names were met
        assert statuses[(f"POST {path}", 200)] >= 1 and statuses[(f"POST {path}", 404)] >= 1, statuses
    for label in labels:  # every operation, with and without keys, as each tenant and as admin
        assert all(sent[(label, who)] >= 1 for who in auths), (label, {w: sent[(label, w)] for w in auths})
