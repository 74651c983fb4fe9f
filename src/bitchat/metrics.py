"""Prometheus metrics of one server (each server has its own registry).

The per-message and per-request series are kept cheap to update, since they
are on every message's path: counter children are looked up once, and handler
times go into :class:`HandlerTimes`, a lock-free histogram of the event loop.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

__all__ = ["CONTENT_TYPE_LATEST", "HandlerTimes", "Metrics"]

HANDLER_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class HandlerTimes:
    """A Prometheus histogram by packet name, observed from the event loop only.

    prometheus-client's ``Histogram`` takes a lock and walks its buckets in
    Python on every observation; this one bisects into a plain list, which is
    safe because every handler's time is observed on the loop's thread (a POOL
    handler's too: its completion callback runs there). It is exposed exactly as
    a ``Histogram`` with a ``packet`` label would be.
    """

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float] = HANDLER_BUCKETS
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = [*sorted(buckets), math.inf]
        self._les = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        self._series: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, packet: str, seconds: float) -> None:
        series = self._series.get(packet)
        if series is None:
            series = self._series[packet] = ([0] * len(self.bounds), [0.0])
        series[0][bisect.bisect_left(self.bounds, seconds)] += 1
        series[1][0] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["packet"])
        for packet, (counts, total) in sorted(self._series.items()):
            cumulative = itertools.accumulate(counts)
            family.add_metric([packet], list(zip(self._les, cumulative, strict=True)), total[0])
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=["packet"])


class Metrics:
    """The counters a server keeps; ``render()`` gives the Prometheus text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "bitchat_connections", "Open connections", ["transport"], registry=r
        )
        self.connections_total = Counter(
            "bitchat_connections_opened", "Connections accepted", ["transport"], registry=r
        )
        self.logins = Counter("bitchat_logins", "Successful logins", registry=r)
        self.login_failures = Counter("bitchat_login_failures", "Refused logins", registry=r)
        self.messages = Counter("bitchat_messages", "Chat messages stored", ["kind"], registry=r)
        self.errors = Counter("bitchat_errors", "Error packets sent", ["code"], registry=r)
        self.handler_seconds = HandlerTimes(
            "bitchat_handler_seconds", "Time spent in request handlers"
        )
        r.register(self.handler_seconds)
        self.http_requests = Counter(
            "bitchat_http_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.webhook_deliveries = Counter(
            "bitchat_webhook_deliveries",
            "Webhook deliveries by outcome: delivered, failed (tried again later), "
            "dead (a dead letter after the last attempt)",
            ["result"],
            registry=r,
        )
        # Children resolved once: label lookup is the slow part of prometheus-client.
        self._tcp = self.connections.labels("tcp")
        self._ws = self.connections.labels("ws")
        self._error_children: dict[str, Counter] = {}
        # Stored messages are counted in plain ints, added to the counter when read:
        # Counter.inc takes a lock, a cost on every message.
        self._stored: dict[str, int] = {}

    def connection_opened(self, transport: str) -> None:
        self.connections.labels(transport).inc()
        self.connections_total.labels(transport).inc()

    def connection_closed(self, transport: str) -> None:
        self.connections.labels(transport).dec()

    def error(self, code: str) -> None:
        child = self._error_children.get(code)
        if child is None:
            child = self._error_children[code] = self.errors.labels(code)
        child.inc()

    def message_stored(self, kind: str) -> None:
        """One chat message of ``kind`` ("p2p", "group") was stored (on the loop's thread)."""
        stored = self._stored
        stored[kind] = stored.get(kind, 0) + 1

    def _fold_stored(self) -> None:
        stored, self._stored = self._stored, {}
        for kind, n in stored.items():
            self.messages.labels(kind).inc(n)

    def observe_handler(self, packet: str, seconds: float) -> None:
        self.handler_seconds.observe(packet, seconds)

    def render(self) -> bytes:
        self._fold_stored()
        return generate_latest(self.registry)
