"""Prometheus metrics for the gateway, written in the text exposition format (no client library needed).

Names are prefixed `gemtune_` so they never collide with an engine's own (vLLM exports `vllm:*`). Label values are
escaped per the format; adapter labels are registry refs (`name@vN`), so a dashboard shows which version served.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_esc(v)}"' for n, v in zip(names, values)) + "}"


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    if float(x).is_integer():
        return str(int(x))
    return repr(float(x))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.values: dict[tuple, float] = {}

    def inc(self, *labels, by: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + by

    def get(self, *labels) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self.values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A gauge read at scrape time from a callback (queue depth, loaded adapters), or set directly."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (),
                 fn: Callable[[], Iterable[tuple[tuple, float]]] | None = None):
        super().__init__(name, help, labels)
        self.fn = fn
        self.values: dict[tuple, float] = {}

    def set(self, *labels, value: float) -> None:
        with self._lock:
            self.values[labels] = value

    def render(self) -> list[str]:
        items = list(self.fn()) if self.fn else sorted(self.values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(buckets) + (math.inf,)
        self.values: dict[tuple, list] = {}

    def observe(self, value: float, *labels) -> None:
        with self._lock:
            st = self.values.setdefault(labels, [[0] * len(self.buckets), 0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    st[0][i] += 1
            st[1] += value
            st[2] += 1

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, (list(v[0]), v[1], v[2])) for k, v in self.values.items())
        for k, (counts, total, n) in items:
            for b, c in zip(self.buckets, counts):
                lab = _labels(self.labelnames + ("le",), k + (_num(b),))
                out.append(f"{self.name}_bucket{lab} {c}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, k)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, k)} {n}")
        return out


class Metrics:
    """Every series the gateway exports; `render()` is the body of GET /metrics."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0,
                 loaded: Callable[[], list[str]] = lambda: [], running: Callable[[], float] = lambda: 0.0):
        self.requests = Counter("gemtune_requests_total", "Requests answered, by endpoint and HTTP status.",
                                ("endpoint", "status"))
        self.adapter_requests = Counter("gemtune_adapter_requests_total",
                                        "Generation requests served, by the adapter version that served them.",
                                        ("adapter",))
        self.prompt_tokens = Counter("gemtune_prompt_tokens_total", "Prompt tokens processed.", ("adapter",))
        self.completion_tokens = Counter("gemtune_completion_tokens_total", "Tokens generated.", ("adapter",))
        self.latency = Histogram("gemtune_request_latency_seconds", "End-to-end generation latency.",
                                 ("endpoint",))
        self.ttft = Histogram("gemtune_time_to_first_token_seconds", "Time to the first streamed token.",
                              ("endpoint",))
        self.rejected = Counter("gemtune_rejected_total", "Requests refused before generation, by reason.",
                                ("reason",))
        self.route_changes = Counter("gemtune_route_changes_total", "Route table reloads that changed routing.")
        self.route_rejections = Counter("gemtune_route_rejections_total",
                                        "Route changes refused (e.g. sha256 mismatch); the alias kept its last "
                                        "good version.", ("name", "alias"))
        self.adapter_loads = Counter("gemtune_adapter_loads_total", "Adapter loads into the engine, by result.",
                                     ("result",))
        self.queue_depth = Gauge("gemtune_queue_depth", "Requests admitted and waiting for a batch slot.",
                                 fn=lambda: [((), float(queue_depth()))])
        self.running = Gauge("gemtune_requests_running", "Requests currently generating.",
                             fn=lambda: [((), float(running()))])
        self.loaded = Gauge("gemtune_loaded_adapters", "Adapter versions loaded in the engine (1 per version).",
                            ("adapter",), fn=lambda: [((a,), 1.0) for a in sorted(loaded())])
        self.loaded_count = Gauge("gemtune_loaded_adapters_count", "Number of adapter versions loaded.",
                                  fn=lambda: [((), float(len(loaded())))])

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        lines: list[str] = []
        for m in self.all():
            try:
                lines += m.render()
            except Exception:  # a failing callback must not break the scrape of everything else
                lines += m.header()
        return "\n".join(lines) + "\n"
