"""Prometheus metrics of one server (each server has its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


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
        self.deliveries = Counter(
            "bitchat_deliveries", "Chat messages pushed to connections", registry=r
        )
        self.errors = Counter("bitchat_errors", "Error packets sent", ["code"], registry=r)
        self.handler_seconds = Histogram(
            "bitchat_handler_seconds",
            "Time spent in request handlers",
            ["packet"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.http_requests = Counter(
            "bitchat_http_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        # Children resolved once: label lookup is the slow part of prometheus-client.
        self._tcp = self.connections.labels("tcp")
        self._ws = self.connections.labels("ws")
        self._error_children: dict[str, Counter] = {}
        self._latency_children: dict[str, Histogram] = {}

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

    def observe_handler(self, packet: str, seconds: float) -> None:
        child = self._latency_children.get(packet)
        if child is None:
            child = self._latency_children[packet] = self.handler_seconds.labels(packet)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
