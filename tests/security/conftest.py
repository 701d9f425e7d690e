"""A real gateway for the security tests: two tenants (a victim and a hostile one), an admin, and a 2-slot engine.

The victim may use `victim-bot`; the hostile tenant `hostile-a`, `hostile-b` and the base, and is limited to 2
running + 2 queued requests. With 2 engine adapter slots for 3 adapters, the hostile tenant alone can keep both
slots busy: the victim must still be served. Short header/body timeouts keep the slowloris cases quick.
"""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from gemtune.registry.routes import RouteTable
from gemtune.registry.store import Registry
from gemtune.registry.synthetic import make_random_adapters

ADMIN = "security-admin-key-0123456789"
VICTIM = "security-victim-key-0123456789"
HOSTILE = "security-hostile-key-0123456789"
VICTIM_ADAPTERS = ("victim-bot",)
HOSTILE_ADAPTERS = ("hostile-a", "hostile-b")


@pytest.fixture(scope="module")
def secure(tiny_gemma3, tmp_path_factory):
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    d = tmp_path_factory.mktemp("security")
    names = VICTIM_ADAPTERS + HOSTILE_ADAPTERS
    srcs = make_random_adapters(tiny_gemma3, [d / f"src-{n}" for n in names], r=8, scale=4.0, seeds=[5, 6, 7])
    reg = Registry(d / "registry")
    for name, src in zip(names, srcs):
        reg.push(name, src, require_verdict=False)
        RouteTable(reg).promote(name, "v1")
    tenants = d / "tenants.yaml"
    tenants.write_text(
        f"admin_key: {ADMIN}\n"
        "tenants:\n"
        f"  victim: {{api_key: {VICTIM}, adapters: ['victim-*']}}\n"
        f"  hostile: {{api_key: {HOSTILE}, adapters: ['hostile-*', base], max_concurrent: 2, max_queued: 2}}\n")
    gw = build_gateway(str(reg.root), tenants=str(tenants), base=str(tiny_gemma3), max_model_len=256, max_batch=4,
                       max_loras=2, max_queue=32, poll_s=0.1)
    server = ServerThread(create_app(gw, body_timeout_s=2.0), header_timeout_s=2.0).start()
    client = httpx.Client(base_url=server.url, timeout=120)
    yield SimpleNamespace(url=server.url, gw=gw, reg=reg, client=client, dir=d, admin=ADMIN, victim=VICTIM,
                          hostile=HOSTILE, victim_adapters=VICTIM_ADAPTERS, hostile_adapters=HOSTILE_ADAPTERS)
    client.close()
    server.stop()
