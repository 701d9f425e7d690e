"""`ClusterStream`'s retry rule, on scripted replica streams: a replica lost before the client saw any text is
retried on another, one lost after is `ReplicaLost`.

The real thing (Ray Serve replicas, one SIGKILLed under load) is tests/serve/test_cluster.py. There, whether the
kill lands between a token that decodes to nothing (the tiny base's first token for one adapter is BOS, text "") and
the next one is timing luck; here it is scripted, so each case runs every time.
"""

from __future__ import annotations

import asyncio
import collections

import pytest

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError  # noqa: E402

from gemtune.serve.backends import BackendError, Gen  # noqa: E402
from gemtune.serve.cluster import ClusterBackend, ClusterConfig, ReplicaLost  # noqa: E402


def ev(text: str, finish: str | None = None, c: int = 1) -> dict:
    return {"t": text, "f": finish, "p": 3, "c": c}


class Replica:
    """One replica's answer to one call: its events, then the end or `dies`."""

    def __init__(self, events: list[dict], dies: bool = False):
        self.events, self.dies, self.cancelled = list(events), dies, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self.events:
            return self.events.pop(0)
        if self.dies:
            raise ActorDiedError()
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class Counts:
    def __init__(self):
        self.seen = collections.Counter()

    def __getattr__(self, what):
        counts = self.seen

        class One:
            def inc(self, reason):
                counts[(what, reason)] += 1

        return One()


class Backend(ClusterBackend):
    """ClusterBackend's own submit/stream code over scripted replicas instead of a Ray handle."""

    def __init__(self, replicas: list[Replica]):
        self.cfg = ClusterConfig(first_event_timeout_s=30.0)
        self.max_model_len, self.max_queue = 128, 8
        self.metrics = Counts()
        self._inflight = self._running = 0
        self.replicas, self.calls = list(replicas), []

    def call(self, g):
        r = self.replicas.pop(0)
        self.calls.append(r)
        return r


def run(b: Backend) -> tuple[list[tuple[str, str | None, int]], BaseException | None]:
    async def go():
        out, err = [], None
        try:
            stream = await b.submit(Gen(prompt_ids=[1, 2, 3], adapter="n1@v2", max_tokens=6))
            async for e in stream:
                out.append((e.text, e.finish_reason, e.completion_tokens))
        except BackendError as e:
            err = e
        return out, err

    return asyncio.run(go())


def test_a_replica_lost_after_tokens_with_no_text_is_retried_elsewhere():
    dead = Replica([ev("", c=1), ev("", c=2)], dies=True)  # BOS, then part of a UTF-8 character: nothing to show
    b = Backend([dead, Replica([ev(""), ev("hi", c=2), ev(" there", "length", c=3)])])
    out, err = run(b)
    assert err is None
    assert out == [("", None, 1), ("hi", None, 2), (" there", "length", 3)]  # the second replica's, held ones included
    assert dead.cancelled and len(b.calls) == 2
    assert b.metrics.seen == {("cluster_retries", "replica_died"): 1}
    assert b._inflight == 0 and b._running == 0


def test_a_replica_lost_after_text_ends_the_stream_with_replica_lost():
    b = Backend([Replica([ev(""), ev("hi", c=2)], dies=True), Replica([ev("never")])])
    out, err = run(b)
    assert out == [("", None, 1), ("hi", None, 2)]
    assert isinstance(err, ReplicaLost) and "after 2 tokens" in str(err)
    assert len(b.calls) == 1 and b.metrics.seen == {("cluster_stream_errors", "replica_lost"): 1}
    assert b._inflight == 0 and b._running == 0


def test_a_stream_of_only_textless_tokens_ends_normally():
    b = Backend([Replica([ev("", c=1), ev("", c=2)])])
    out, err = run(b)
    assert err is None and len(b.calls) == 1
    assert out == [("", None, 1), ("", None, 2), ("", "stop", 2)]


def test_two_replicas_lost_before_text_is_a_backend_error_not_a_stream():
    b = Backend([Replica([ev("")], dies=True), Replica([ev("")], dies=True)])
    out, err = run(b)
    assert out == [] and type(err) is BackendError and "two replicas" in str(err)
    assert b.metrics.seen == {("cluster_retries", "replica_died"): 2}
    assert b._inflight == 0
