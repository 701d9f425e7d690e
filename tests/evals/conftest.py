"""Eval fixtures: an isolated GEMTUNE_HOME (so the output cache starts empty), tiny LoRA adapters whose random
non-zero B weights make their outputs differ from the base, and real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run 10-100x faster on one thread when the CPU is shared: the pool's spin-waits dominate."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def eval_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "gemtune-home"
    monkeypatch.setenv("GEMTUNE_HOME", str(home))
    monkeypatch.delenv("SLACK_WEBHOOK_URL", raising=False)
    return home


def make_adapter(base_dir: Path, out: Path, *, seed: int = 1, std: float = 0.5, r: int = 4) -> Path:
    """A PEFT LoRA adapter for `base_dir` with random B (PEFT initialises B to zero, which would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from gemtune.base.families import family_of, target_modules
    from gemtune.base.loader import load_base

    model, _ = load_base(base_dir)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules(family_of(model))))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.save_pretrained(out)
    (out / "gemtune.json").write_text(json.dumps({"base_model": str(base_dir)}))
    return out


@pytest.fixture(scope="session")
def adapter3(tiny_gemma3, tmp_path_factory) -> Path:
    return make_adapter(tiny_gemma3, tmp_path_factory.mktemp("adapter3") / "adapter")


@pytest.fixture(scope="session")
def adapter4(tiny_gemma4, tmp_path_factory) -> Path:
    return make_adapter(tiny_gemma4, tmp_path_factory.mktemp("adapter4") / "adapter")


def write_suite(path: Path, n: int = 12, scorers=None) -> Path:
    """Cases with prompts of varied length (so batches carry padding) and a scorer the tiny model can pass."""
    rows = []
    for i in range(n):
        rows.append({"id": f"c{i}", "prompt": f"case {i}: " + "route this " * (i % 4), "expected": "x",
                     "scorers": scorers or [{"type": "regex", "pattern": "unused[0-4]"}], "tags": [f"t{i % 2}"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Recorder:
    """A real HTTP server on 127.0.0.1 that records POST bodies and answers with `respond(body) -> (code, dict)`."""

    def __init__(self, respond: Callable[[dict], tuple[int, dict]]):
        self.posts: list[dict] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                rec.posts.append({"path": self.path, "body": body})
                code, doc = respond(body)
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_recorder():
    servers = []

    def start(respond=lambda body: (200, {"ok": True})) -> Recorder:
        r = Recorder(respond)
        servers.append(r)
        return r

    yield start
    for s in servers:
        s.close()


def run_cli(argv: list[str]) -> int:
    """`gemtune …` in-process through the real entry point; returns the exit code."""
    from gemtune.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture
def cli() -> Callable[[list[str]], int]:
    return run_cli


@pytest.fixture
def suite_writer():
    return write_suite


@pytest.fixture(scope="session")
def adapter_maker():
    return make_adapter
