"""Prometheus metrics for the gateway, through `prometheus_client` (exposition format, escaping, histograms).

Each gateway has its own `CollectorRegistry`, never the process-global one, so two gateways in one process (tests,
notebooks) count separately and never collide on registration. Names are prefixed `gemtune_` so they never collide
with an engine's own (vLLM exports `vllm:*`). Adapter labels are registry refs (`name@vN`), so a dashboard shows
which version served. Gauges that mirror the engine (queue depth, loaded adapters) are read at scrape time.
"""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import Counter as _PCounter
from prometheus_client import Histogram as _PHistogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("gemtune.serve")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Counter:
    """A labelled counter: `inc(*label_values, by=1)`, `get(*label_values)`."""

    def __init__(self, registry: CollectorRegistry, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.labelnames = name, tuple(labels)
        self._c = _PCounter(name, help, self.labelnames, registry=registry)

    def _child(self, labels: tuple):
        return self._c.labels(*map(str, labels)) if self.labelnames else self._c

    def inc(self, *labels, by: float = 1.0) -> None:
        self._child(labels).inc(by)

    def get(self, *labels) -> float:
        return self._child(labels)._value.get()


class Histogram:
    """A labelled histogram: `observe(value, *label_values)`."""

    def __init__(self, registry: CollectorRegistry, name: str, help: str, labels: tuple[str, ...] = (),
                 buckets=LATENCY_BUCKETS):
        self.name, self.labelnames = name, tuple(labels)
        self._h = _PHistogram(name, help, self.labelnames, registry=registry, buckets=buckets)

    def observe(self, value: float, *labels) -> None:
        (self._h.labels(*map(str, labels)) if self.labelnames else self._h).observe(value)


class _Callbacks(Collector):
    """Gauges read from callbacks at scrape time; a failing callback costs its own series only."""

    def __init__(self, gauges: list[tuple[str, str, tuple[str, ...], Callable]]):
        self.gauges = gauges

    def describe(self):
        return [GaugeMetricFamily(name, help, labels=list(labels)) for name, help, labels, _ in self.gauges]

    def collect(self):
        for name, help, labels, fn in self.gauges:
            fam = GaugeMetricFamily(name, help, labels=list(labels))
            try:
                for values, v in fn():
                    fam.add_metric([str(x) for x in values], float(v))
            except Exception:  # the scrape of everything else must not break
                log.exception("metrics callback for %s failed", name)
            yield fam


class Metrics:
    """Every series the gateway exports; `render()` is the body of GET /metrics."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0,
                 loaded: Callable[[], list[str]] = lambda: [], running: Callable[[], float] = lambda: 0.0,
                 tenants: Callable[[], list[tuple[str, int, int]]] = lambda: []):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(r, "gemtune_requests_total", "Requests answered, by endpoint and HTTP status.",
                                ("endpoint", "status"))
        self.adapter_requests = Counter(r, "gemtune_adapter_requests_total",
                                        "Generation requests served, by the adapter version that served them.",
                                        ("adapter",))
        self.prompt_tokens = Counter(r, "gemtune_prompt_tokens_total", "Prompt tokens processed.", ("adapter",))
        self.completion_tokens = Counter(r, "gemtune_completion_tokens_total", "Tokens generated.", ("adapter",))
        self.latency = Histogram(r, "gemtune_request_latency_seconds", "End-to-end generation latency.",
                                 ("endpoint",))
        self.ttft = Histogram(r, "gemtune_time_to_first_token_seconds", "Time to the first streamed token.",
                              ("endpoint",))
        self.rejected = Counter(r, "gemtune_rejected_total", "Requests refused before generation, by reason.",
                                ("reason",))
        self.tenant_rejected = Counter(r, "gemtune_tenant_rejected_total",
                                       "Requests refused because their tenant was over its own concurrency and "
                                       "queue limits.", ("tenant",))
        self.route_changes = Counter(r, "gemtune_route_changes_total", "Route table reloads that changed routing.")
        self.route_rejections = Counter(r, "gemtune_route_rejections_total",
                                        "Route changes refused (e.g. sha256 mismatch); the alias kept its last "
                                        "good version.", ("name", "alias"))
        self.adapter_loads = Counter(r, "gemtune_adapter_loads_total", "Adapter loads into the engine, by result.",
                                     ("result",))
        self.failures = Counter(r, "gemtune_generation_failures_total",
                                "Requests that failed while generating, by reason: sampling or numerics (that "
                                "request alone, 500), engine (the shared step, 503), backend (unreachable, 503).",
                                ("reason",))
        self.cluster_retries = Counter(r, "gemtune_cluster_retries_total",
                                       "Requests sent again to another replica because theirs died or stayed silent "
                                       "before the first token, by reason.", ("reason",))
        self.cluster_stream_errors = Counter(r, "gemtune_cluster_stream_errors_total",
                                             "Requests ended with an error because their replica was lost after "
                                             "they had streamed.", ("reason",))
        r.register(_Callbacks([
            ("gemtune_queue_depth", "Requests admitted and waiting for a batch slot.", (),
             lambda: [((), queue_depth())]),
            ("gemtune_requests_running", "Requests currently generating.", (), lambda: [((), running())]),
            ("gemtune_loaded_adapters", "Adapter versions loaded in the engine (1 per version).", ("adapter",),
             lambda: [((a,), 1) for a in sorted(loaded())]),
            ("gemtune_loaded_adapters_count", "Number of adapter versions loaded.", (), lambda: [((), len(loaded()))]),
            ("gemtune_tenant_running", "Generation requests a tenant has in the engine.", ("tenant",),
             lambda: [((t,), run) for t, run, _ in tenants()]),
            ("gemtune_tenant_queued", "Generation requests a tenant has waiting at the gateway for one of its own "
             "concurrency slots.", ("tenant",), lambda: [((t,), q) for t, _, q in tenants()]),
        ]))

    def render(self) -> bytes:
        return generate_latest(self.registry)
