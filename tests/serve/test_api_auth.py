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


def test_metrics_text_format_escapes_labels():
    m = Metrics(queue_depth=lambda: 3, loaded=lambda: ['we"ird@v1'])
    m.requests.inc("/v1/models", "200")
    m.latency.observe(0.3, "chat")
    text = m.render()
    assert "gemtune_queue_depth 3\n" in text
    assert 'gemtune_loaded_adapters{adapter="we\\"ird@v1"} 1' in text
    assert 'gemtune_request_latency_seconds_bucket{endpoint="chat",le="0.25"} 0' in text
    assert 'gemtune_request_latency_seconds_bucket{endpoint="chat",le="0.5"} 1' in text
    assert 'gemtune_request_latency_seconds_bucket{endpoint="chat",le="+Inf"} 1' in text
    assert "# TYPE gemtune_requests_total counter" in text
