"""`gemtune demo`: the playbook end to end on the embedded default base.

Each stage adds its step here as it lands; the closing table says what each step proved.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run_demo(out: str | Path = "demo-out", *, quick: bool = False, console: Console | None = None) -> list[tuple[str, str, float]]:
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    proved: list[tuple[str, str, float]] = []

    t = time.time()
    from gemtune.base.provision import pull

    path = pull(progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    proved.append(("base pull", f"embedded Gemma 3 270M cached at {path}", time.time() - t))

    t = time.time()
    from gemtune.base.generate import chat
    from gemtune.base.loader import load_base

    model, tok = load_base(path)
    answer = chat(model, tok, [{"role": "user", "content": "Name one primary colour."}], max_new_tokens=16)
    proved.append(("chat", f"Gemma template round trip, answer: {answer[:60]!r}", time.time() - t))

    table = Table(title="gemtune demo: what each step proved")
    table.add_column("step")
    table.add_column("proved")
    table.add_column("seconds", justify="right")
    for step, what, secs in proved:
        table.add_row(step, what, f"{secs:.1f}")
    console.print(table)
    return proved
