"""Tenants file parsing and key matching: every mistake names file, line and field; keys never collide."""

from __future__ import annotations

import hashlib

import pytest

from gemtune.errors import UserError
from gemtune.serve.auth import Principal, bearer_key, load_tenants
from gemtune.serve.metrics import Metrics

KEY_A = "tenant-a-key-0123456789"
KEY_B = "tenant-b-key-0123456789"
ADMIN = "admin-key-0123456789abc"


def _write(tmp_path, text, name="tenants.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_keys_map_to_tenants_and_patterns(tmp_path):
    p = _write(tmp_path, f"admin_key: {ADMIN}\ntenants:\n  a: {{api_key: {KEY_A}, adapters: [acme-*, shared]}}\n"
                         f"  b: {{api_key_sha256: {hashlib.sha256(KEY_B.encode()).hexdigest()}, adapters: [base]}}\n")
    t = load_tenants(p)
    a, b, admin = t.authenticate(KEY_A), t.authenticate(KEY_B), t.authenticate(ADMIN)
    assert (a.name, b.name, admin.name) == ("a", "b", "admin") and admin.admin and not a.admin
    assert t.authenticate("nope-nope-nope-nope") is None and t.authenticate(None) is None
    assert a.allows("acme-support") and a.allows("shared") and not a.allows("shared2")
    assert not a.allows("base") and not a.allows("globex")
    assert b.allows("base") and not b.allows("acme-support")
    assert Principal("x", ("*",)).allows("anything")


@pytest.mark.parametrize("text,needle", [
    ("tenants: {a: {adapters: [x]}}", 'field "tenants.a": missing api_key'),
    ("tenants: {a: {api_key: short, adapters: [x]}}", 'field "tenants.a.api_key": api_key must be a string of at least'),
    ("tenants: {a: {api_key_sha256: zz, adapters: [x]}}", "64 hex"),
    (f"tenants: {{a: {{api_key: {KEY_A}}}}}", 'field "tenants.a.adapters"'),
    (f"tenants:\n  a: {{api_key: {KEY_A}, adapters: [x]}}\n  b: {{api_key: {KEY_A}, adapters: [y]}}\n",
     "tenants.yaml:3: field \"tenants.b.api_key\": the same key is given to 'a' too"),
    ("tenants: {}", 'field "tenants"'),
    ("tenants: [unclosed", "invalid YAML"),
    (f"admin_key: {KEY_A}\ntenants:\n  a: {{api_key: x\n  b: [", "tenants.yaml:4: invalid YAML"),  # config's reader
    (f"admin_key: {KEY_A}\ntenants: {{a: {{api_key: {KEY_A}, adapters: [x]}}}}", "the same key is given to 'admin'"),
])
def test_bad_tenants_files_name_file_line_field(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_tenants(p)
    assert needle in str(e.value) and "tenants.yaml" in str(e.value)


def test_json_tenants_and_missing_file(tmp_path):
    p = _write(tmp_path, '{"tenants": {"a": {"api_key": "%s", "adapters": ["x"]}}}' % KEY_A, "t.json")
    assert load_tenants(p).authenticate(KEY_A).name == "a"
    with pytest.raises(UserError, match="not found"):
        load_tenants(tmp_path / "missing.yaml")


def test_bearer_key_extraction():
    assert bearer_key({"authorization": "Bearer abc"}) == "abc"
    assert bearer_key({"authorization": "bearer  abc "}) == "abc"
    assert bearer_key({"authorization": "Basic abc"}) is None
    assert bearer_key({"x-api-key": "k"}) == "k"
    assert bearer_key({}) is None


def test_metrics_exposition_through_prometheus_client():
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics(queue_depth=lambda: 3, loaded=lambda: ['we"ird@v1'])
    m.requests.inc("/v1/models", "200")
    m.latency.observe(0.3, "chat")
    other = Metrics()  # each gateway has its own registry: a second one neither collides nor shares counts
    other.requests.inc("/v1/models", "200", by=5)
    text = m.render().decode()
    assert "# TYPE gemtune_requests_total counter" in text
    assert 'gemtune_loaded_adapters{adapter="we\\"ird@v1"} 1.0' in text  # escaped per the format
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("gemtune_queue_depth", ())] == 3
    assert samples[("gemtune_loaded_adapters", (("adapter", 'we"ird@v1'),))] == 1
    assert samples[("gemtune_requests_total", (("endpoint", "/v1/models"), ("status", "200")))] == 1
    assert m.requests.get("/v1/models", "200") == 1 and other.requests.get("/v1/models", "200") == 5
    le = {k[1][1][1]: v for k, v in samples.items() if k[0] == "gemtune_request_latency_seconds_bucket"}
    assert le["0.25"] == 0 and le["0.5"] == 1 and le["+Inf"] == 1


def test_metrics_callback_failure_keeps_the_rest():
    def boom():
        raise RuntimeError("engine gone")

    m = Metrics(queue_depth=boom)
    m.requests.inc("/healthz", "200")
    text = m.render().decode()
    assert 'gemtune_requests_total{endpoint="/healthz",status="200"} 1.0' in text
    assert "# TYPE gemtune_queue_depth gauge" in text


@pytest.mark.parametrize("text,needle", [
    (f"max_concurrent: 0\ntenants: {{a: {{api_key: {KEY_A}, adapters: [x]}}}}",
     'tenants.yaml:1: field "max_concurrent": max_concurrent must be an integer from 1'),
    (f"tenants:\n  a:\n    api_key: {KEY_A}\n    adapters: [x]\n    max_queued: many\n",
     'tenants.yaml:5: field "tenants.a.max_queued": max_queued must be an integer from 0'),
    (f"tenants:\n  a: {{api_key: {KEY_A}, adapters: [x], max_concurrent: true}}\n",
     'tenants.yaml:2: field "tenants.a.max_concurrent"'),
])
def test_bad_tenant_limits_name_file_line_field(tmp_path, text, needle):
    with pytest.raises(UserError) as e:
        load_tenants(_write(tmp_path, text))
    assert needle in str(e.value)


def test_tenant_limits_default_and_override(tmp_path):
    from gemtune.serve.auth import DEFAULT_MAX_CONCURRENT, Limits

    t = load_tenants(_write(tmp_path, f"max_queued: 5\ntenants:\n  a: {{api_key: {KEY_A}, adapters: [x]}}\n"
                                      f"  b: {{api_key: {KEY_B}, adapters: [y], max_concurrent: 2, max_queued: 0}}\n"
                                      f"admin_key: {ADMIN}\n"))
    assert t.authenticate(KEY_A).limits == Limits(DEFAULT_MAX_CONCURRENT, 5)
    assert t.authenticate(KEY_B).limits == Limits(2, 0)
    assert t.authenticate(ADMIN).limits is None  # the operator is not rationed
