"""A hostile tenant against a real server (issue #12): every attack is answered 4xx in OpenAI's error shape (or served
harmlessly), and meanwhile the victim tenant's greedy requests all complete with exactly the text they get alone.

No timing is asserted: only statuses, shapes and texts. Deadlines are generous bounds on waiting, never pass/fail
criteria on speed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

VICTIM_PROMPTS = ["hello there", "what is my balance?", "reset my password please"]


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}", "content-type": "application/json"}


def _victim_body(prompt: str) -> dict:
    return {"model": "victim-bot", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
            "temperature": 0}


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (status, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and len(body["error"]["message"]) <= 1000
    return body["error"]


def _recv_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            b = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not b:
            return out
        out += b


class Attacks:
    """Each attack sends its requests and checks its own answers; `failures` collects what went wrong."""

    def __init__(self, s):
        self.s = s
        self.failures: list[str] = []
        self.host, port = s.url.removeprefix("http://").split(":")
        self.port = int(port)

    def run(self, name: str, fn) -> None:
        try:
            with httpx.Client(base_url=self.s.url, timeout=120) as c:
                fn(c)
        except Exception as e:  # an assertion or a transport error: report it with the attack's name
            self.failures.append(f"{name}: {type(e).__name__}: {e}")

    @staticmethod
    def post(c, path: str, **kw) -> httpx.Response:
        """POST as the hostile tenant, retrying while its own flood has it over its share (429 is the flood
        attack's expected answer, not these)."""
        for _ in range(600):
            r = c.post(path, **kw)
            if r.status_code != 429:
                return r
            time.sleep(0.1)
        return r

    def _chat(self, c, model="hostile-a", **kw):
        body = {"model": model, "messages": [{"role": "user", "content": "give me everything"}], "max_tokens": 8,
                "temperature": 0, **kw}
        return self.post(c, "/v1/chat/completions", json=body, headers=_h(self.s.hostile))

    def _raw(self, c, raw: bytes, path="/v1/chat/completions"):
        return self.post(c, path, content=raw, headers=_h(self.s.hostile))

    # -- item 1: a temperature that divides logits into infinities
    def tiny_temperature(self, c):
        greedy = self._chat(c)
        assert greedy.status_code == 200, greedy.text
        for t in (1e-50, 5e-324):
            r = self._chat(c, temperature=t, seed=3)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
        for t in ("1e-50x", -1e-50, 3.0):
            _error(self._chat(c, temperature=t), 400)
        _error(self._raw(c, b'{"model": "hostile-a", "messages": [{"role": "user", "content": "x"}], '
                            b'"temperature": NaN}'), 400)
        _error(self._raw(c, b'{"model": "hostile-a", "messages": [{"role": "user", "content": "x"}], '
                            b'"temperature": 1e999}'), 400)

    # -- item 2: seeds past int64 (which leaked adapter slot references in the engine)
    def huge_seeds(self, c):
        for model in ("hostile-a", "hostile-b"):
            for seed in (2**63, 2**64, 2**63, 2**64, -(2**63) - 1):
                assert _error(self._chat(c, model=model, temperature=1.0, seed=seed), 400)["param"] == "seed"
        for seed in (2**63 - 1, -(2**63)):  # the int64 edges are served
            r = self._chat(c, temperature=1.0, seed=seed)
            assert r.status_code == 200, r.text

    # -- item 4: huge prompts
    def huge_prompts(self, c):
        _error(c.post("/v1/completions", json={"model": "hostile-a", "prompt": "x" * 5_000_000},
                      headers=_h(self.s.hostile)), 413)
        r = c.post("/v1/completions", json={"model": "hostile-a", "prompt": "x" * 1_500_000},
                   headers=_h(self.s.hostile))
        assert "characters" in _error(r, 400)["message"]
        r = c.post("/v1/chat/completions", json={"model": "hostile-a", "messages": [
            {"role": "user" if i % 2 == 0 else "assistant", "content": ""} for i in range(20001)]},
            headers=_h(self.s.hostile))
        _error(r, 400)
        _error(c.post("/v1/completions", json={"model": "hostile-a", "prompt": [5] * 100_000},
                      headers=_h(self.s.hostile)), 400)

        def chunked():
            for _ in range(100):
                yield b"[" * 65536

        _error(c.post("/v1/completions", content=chunked(), headers=_h(self.s.hostile)), 413)

    # -- item 8: partial requests (slowloris), partial bodies
    def slowloris(self, c):
        socks = []
        try:
            for partial in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", b"GET /v1/mod",
                            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                            self.s.hostile.encode()):
                s = socket.create_connection((self.host, self.port), timeout=60)
                s.sendall(partial)
                socks.append(s)
            for s in socks:
                try:
                    assert _recv_until_closed(s) == b"", "a partial request got an answer"
                except socket.timeout:
                    raise AssertionError("a partial request was kept open for 60 s") from None
            with socket.create_connection((self.host, self.port), timeout=60) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Authorization: Bearer " + self.s.hostile.encode() + b"\r\nContent-Length: 500\r\n\r\n{")
                answer = _recv_until_closed(s)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        finally:
            for s in socks:
                s.close()

    # -- item 9: bodies that used to be 500 or {"detail": ...}
    def malformed_bodies(self, c):
        cases = [
            b'{"model": "hostile-a", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            b'{"model": "hostile-a\\udfff", "messages": [{"role": "user", "content": "x"}]}',
            b'{"model": "hostile-a", "messages": [{"role": "user", "content": "x"}], "user": "\\ud83d"}',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
            b'{"model": "hostile-a", "messages": [{"role": "user", "content": "x"}], "max_tokens": ' +
            b"7" * 5000 + b"}",
            b'{"model": "hostile-a", "messages": [{"role": "user", "content": "x"}], "seed": -' + b"1" * 5000 + b"}",
            b"\xff\xfe\x00garbage",
            b"{not json",
            b"null",
            b'"just a string"',
            b'{"model": ["hostile-a"], "messages": {}}',
            b'{"model": "hostile-a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            b'{"model": "hostile-a", "messages": [{"role": "user", "content": "x"}], "stop": ' +
            json.dumps(["s"] * 1000).encode() + b"}",
        ]
        for raw in cases:
            for path in ("/v1/chat/completions", "/v1/completions"):
                err = _error(self._raw(c, raw, path), 400)
                assert "\\ud800" not in err["message"] or len(err["message"]) < 200
        for path in ("/v1/load_lora_adapter", "/admin/routes/promote"):  # admin only, body never read
            _error(self._raw(c, b"[" * 100_000, path), 403)

    def huge_model_name(self, c):
        for model in ("m" * 100_000, "hostile-a@" + "v" * 100_000, "\u202e" * 50_000):
            err = _error(self._chat(c, model=model), 400)
            assert err["param"] == "model" and len(err["message"]) < 400, err

    # -- other things a tenant might try
    def probing(self, c):
        h = _h(self.s.hostile)
        for model in ("victim-bot", "victim-bot@v1", "victim-bot@prod", "victim-nothing"):
            err = _error(self._chat(c, model=model), 404)
            assert "does not exist or you do not have access" in err["message"]
        ids = {m["id"] for m in c.get("/v1/models", headers=h).json()["data"]}
        assert not any(i.startswith("victim") for i in ids) and "hostile-a" in ids
        _error(c.post("/v1/load_lora_adapter", json={"lora_name": "victim-bot@v1"}, headers=h), 403)
        _error(c.post("/v1/unload_lora_adapter", json={"lora_name": "victim-bot@v1"}, headers=h), 403)
        _error(c.post("/admin/routes/rollback", json={"name": "victim-bot"}, headers=h), 403)
        _error(c.get("/admin/routes", headers=h), 403)
        _error(c.get("/metrics", headers=h), 403)
        _error(c.get("/v1/models", headers={"Authorization": "Bearer " + "k" * 10_000}), 401)
        # over h11's 16 KiB for an incomplete header block: refused by the parser (400) if it arrives in pieces,
        # else read whole and refused as a key (401); OpenAI's shape either way
        r = c.get("/v1/models", headers={"Authorization": "Bearer " + "k" * 100_000})
        _error(r, r.status_code if r.status_code in (400, 401) else 401)
        r = self.post(c, "/v1/completions", json={"model": "hostile-a", "prompt": [10**6, -1], "max_tokens": 2},
                      headers=h)
        _error(r, 400)
        r = self.post(c, "/v1/completions", json={"model": "base", "prompt": "\x00\x01\u2028", "max_tokens": 2,
                                                  "temperature": 0}, headers=h)
        assert r.status_code == 200, r.text

    def flood(self, c):
        """More long requests at once than the tenant's share: each is served or refused with 429 and Retry-After
        (how many of each depends on timing; tests/serve/test_api.py holds a slot to check the 429 exactly)."""
        def one(i):
            with httpx.Client(base_url=self.s.url, timeout=120) as c2:
                return self._chat(c2, model=("hostile-a", "hostile-b")[i % 2], max_tokens=120, ignore_eos=True,
                                  temperature=2.0, top_p=1e-300, seed=i)

        with ThreadPoolExecutor(max_workers=12) as ex:
            answers = list(ex.map(one, range(12)))
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 429}, statuses
        for r in answers:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and "hostile" in _error(r, 429)["message"]

    def abandoned_stream(self, c):
        body = {"model": "hostile-b", "messages": [{"role": "user", "content": "stream"}], "max_tokens": 150,
                "stream": True, "ignore_eos": True, "temperature": 0}
        for _ in range(3):
            with httpx.Client(base_url=self.s.url, timeout=60) as c2:
                with c2.stream("POST", "/v1/chat/completions", json=body, headers=_h(self.s.hostile)) as r:
                    if r.status_code == 429:
                        continue
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if '"content"' in line:
                            break  # walk away mid-stream


def test_hostile_tenant_cannot_hurt_the_victim(secure):
    c = secure.client
    # what each victim request answers when it runs alone
    alone = {}
    for p in VICTIM_PROMPTS:
        r = c.post("/v1/chat/completions", json=_victim_body(p), headers=_h(secure.victim))
        assert r.status_code == 200, r.text
        alone[p] = r.json()["choices"][0]["message"]["content"]
    assert len(set(alone.values())) > 1

    attacks = Attacks(secure)
    names = ["tiny_temperature", "huge_seeds", "huge_prompts", "slowloris", "malformed_bodies", "huge_model_name",
             "probing", "flood", "abandoned_stream"]
    done = threading.Event()
    victim: list[tuple[str, int, str]] = []

    def victim_loop():
        with httpx.Client(base_url=secure.url, timeout=120) as vc:
            rounds = 0
            while not done.is_set() or rounds < 2:
                for p in VICTIM_PROMPTS:
                    try:
                        r = vc.post("/v1/chat/completions", json=_victim_body(p), headers=_h(secure.victim))
                        text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
                        victim.append((p, r.status_code, text))
                    except Exception as e:
                        victim.append((p, -1, f"{type(e).__name__}: {e}"))
                rounds += 1

    vt = threading.Thread(target=victim_loop)
    vt.start()
    with ThreadPoolExecutor(max_workers=len(names)) as ex:
        list(ex.map(lambda n: attacks.run(n, getattr(attacks, n)), names))
    done.set()
    vt.join(600)
    assert not vt.is_alive()

    assert not attacks.failures, "\n".join(attacks.failures)
    bad = [(p, s, t[:200]) for p, s, t in victim if s != 200 or t != alone[p]]
    assert not bad, f"{len(bad)} of {len(victim)} victim requests went wrong: {bad[:5]}"
    assert len(victim) >= 2 * len(VICTIM_PROMPTS)


def test_no_adapter_slot_is_leaked(secure):
    """After every attack above (and again here), the 2-slot engine still serves all three adapters in turn: no
    request left a slot reference behind."""
    c = secure.client
    for seed in (2**63, 2**64, 2**63, 2**64):
        for model in secure.hostile_adapters:
            r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}],
                                                     "temperature": 1.0, "seed": seed, "max_tokens": 2},
                       headers=_h(secure.hostile))
            assert r.status_code == 400, r.text
    for _ in range(2):
        for model, key in (("hostile-a", secure.hostile), ("hostile-b", secure.hostile),
                           ("victim-bot", secure.victim)):
            r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}],
                                                     "temperature": 0, "max_tokens": 2}, headers=_h(key))
            assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60  # finished requests leave the engine at its next step
    while True:
        h = c.get("/healthz").json()
        if h["running"] == 0 and h["queue_depth"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    gates = secure.gw.gates
    assert all(g.running == 0 and not g.waiters for g in gates.values()), {n: g.running for n, g in gates.items()}


@pytest.mark.parametrize("key", ["victim", "hostile", "admin", None])
def test_every_error_names_no_other_tenants_adapter(secure, key):
    """404s for foreign and missing models read the same, whoever asks."""
    c = secure.client
    h = _h(getattr(secure, key)) if key else {"content-type": "application/json"}
    r = c.post("/v1/chat/completions", json={"model": "nothing-here", "messages": [{"role": "user", "content": "x"}]},
               headers=h)
    assert r.status_code == (401 if key is None else 404)
    others = secure.victim_adapters if key == "hostile" else secure.hostile_adapters if key == "victim" else ()
    assert not any(n in r.text for n in others)
