"""Webhooks: server events POSTed, signed, to the product's HTTP endpoints.

What a receiver needs is here: the event names (:data:`EVENTS`), and
:func:`verify`, which checks the ``X-Bitchat-Signature`` header of a delivery::

    from bitchat.webhooks import verify

    if not verify(SECRET, request.headers["X-Bitchat-Signature"], request.body):
        return 400

Each delivery is a JSON ``POST`` of ``{"id", "type", "created_at", "data"}``
(``created_at`` in Unix ms), with the headers ``X-Bitchat-Event-Id`` (the same
``id``: the same event delivered twice has one id, so a receiver drops repeats),
``X-Bitchat-Event-Type`` and ``X-Bitchat-Signature: t=<unix seconds>,v1=<hex>``,
where ``v1`` is the HMAC-SHA256 of ``"<t>.<body>"`` under the endpoint's secret.

The server side: :func:`endpoints` reads the settings (and refuses what is not
an ``http(s)`` URL, an event it does not know, a table key it does not know);
:class:`Outbox` makes the rows the stores write into the outbox table in the
same transaction as the event (a message batch, a join, a leave), one row per
event and endpoint that wants it; :mod:`bitchat.im.webhook_dispatch` delivers
them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from bitchat.errors import ConfigError

if TYPE_CHECKING:
    from bitchat.settings import Settings

__all__ = [
    "EVENTS",
    "SENT_EVENTS",
    "SIGNATURE_HEADER",
    "Endpoint",
    "Outbox",
    "endpoints",
    "sign",
    "verify",
]

MESSAGE_STORED = "message.stored"
MESSAGE_EDITED = "message.edited"
MESSAGE_RECALLED = "message.recalled"
USER_ONLINE = "user.online"
USER_OFFLINE = "user.offline"
MEMBER_ADDED = "group.member_added"
MEMBER_REMOVED = "group.member_removed"

EVENTS = (
    MESSAGE_STORED,
    MESSAGE_EDITED,
    MESSAGE_RECALLED,
    USER_ONLINE,
    USER_OFFLINE,
    MEMBER_ADDED,
    MEMBER_REMOVED,
)
"""Every event an endpoint may ask for."""
SENT_EVENTS = EVENTS
"""The events the server sends: all of them (``message.edited`` and ``message.recalled``
are written with the edit or recall event, in its transaction; reactions send none)."""

SIGNATURE_HEADER = "X-Bitchat-Signature"
EVENT_ID_HEADER = "X-Bitchat-Event-Id"
EVENT_TYPE_HEADER = "X-Bitchat-Event-Type"


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(
        secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256
    ).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Bitchat-Signature`` value of ``body`` at ``timestamp`` (Unix seconds,
    default now): ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<t>.<body>">``."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_mac(secret, t, body)}"


def verify(
    secret: str,
    header: str,
    body: bytes | str,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (an ``X-Bitchat-Signature`` value) signs ``body`` (the
    request body exactly as received) under ``secret``, at a time at most
    ``tolerance`` seconds from ``now`` (default: the clock): an old delivery
    replayed by someone who recorded it is refused. ``tolerance`` 0: any time.

    Several ``v1`` values may be given (comma-separated); one matching is enough.
    """
    raw = body.encode() if isinstance(body, str) else body
    timestamp: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif name == "v1":
            macs.append(value)
    if timestamp is None or not macs:
        return False
    if tolerance and abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = _mac(secret, timestamp, raw)
    return any(hmac.compare_digest(expected, m) for m in macs)


# -- configuration ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One receiver: its URL, its secret, the events it gets."""

    url: str
    secret: str
    events: frozenset[str]


_TABLE_KEYS = ("url", "secret", "events")


def _check_url(where: str, url: object) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"{where}: expected a URL string, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {url!r}")
    return url


def _check_events(where: str, events: object) -> frozenset[str]:
    if not isinstance(events, list | tuple) or not all(isinstance(e, str) for e in events):
        raise ConfigError(f"{where}: expected an array of event names")
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise ConfigError(f"{where}: unknown event {unknown[0]!r} (known: {', '.join(EVENTS)})")
    return frozenset(events) if events else frozenset(EVENTS)


def endpoints(settings: Settings) -> list[Endpoint]:
    """The endpoints the settings name (``webhook_urls``, then each ``[[webhooks]]``
    table), in that order; a URL named twice is one endpoint (the first).

    Raises :class:`ConfigError` (``<setting>: <problem>``) for a URL that is not
    ``http(s)``, an unknown event or table key, or an endpoint without a secret.
    """
    default_events = _check_events("webhook_events", settings.webhook_events)
    found: dict[str, Endpoint] = {}
    for url in settings.webhook_urls:
        _check_url("webhook_urls", url)
        if not settings.webhook_secret:
            raise ConfigError("webhook_urls: the endpoints need webhook_secret too")
        found.setdefault(url, Endpoint(url, settings.webhook_secret, default_events))
    for table in settings.webhooks:
        unknown = [k for k in table if k not in _TABLE_KEYS]
        if unknown:
            raise ConfigError(
                f"webhooks: unknown key {unknown[0]!r} (known: {', '.join(_TABLE_KEYS)})"
            )
        url = _check_url("webhooks", table.get("url"))
        secret = table.get("secret", settings.webhook_secret)
        if not isinstance(secret, str) or not secret:
            raise ConfigError(f"webhooks: {url} needs a secret (or webhook_secret)")
        events = _check_events("webhooks", table["events"]) if "events" in table else default_events
        found.setdefault(url, Endpoint(url, secret, events))
    return list(found.values())


# -- the outbox's rows ----------------------------------------------------------------------

OutboxRow = tuple[str, str, str, str, str, float]
"""A row to write into ``webhook_outbox``: event id, endpoint URL, event type, order
key, body (JSON text), created at (Unix seconds)."""


class Outbox:
    """Which endpoints get which events, and the outbox rows of one event.

    The stores hold one (or None: no webhooks, nothing written) and write
    :meth:`rows` in the transaction of the event; :attr:`wake`, set by the
    dispatcher, is called (on the event loop) once rows were committed.
    """

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self._by_event: dict[str, list[str]] = {
            e: [p.url for p in self.endpoints if e in p.events] for e in EVENTS
        }
        self.wake: Callable[[], None] | None = None

    def wants(self, event: str) -> bool:
        """Whether some endpoint gets ``event``."""
        return bool(self._by_event.get(event))

    def rows(
        self, event: str, key: str, data: Mapping[str, Any], at: float | None = None
    ) -> list[OutboxRow]:
        """The rows of one ``event`` (none if no endpoint wants it). ``key`` orders
        deliveries: of one key, an endpoint gets them in the order written."""
        urls = self._by_event.get(event)
        if not urls:
            return []
        now = time.time() if at is None else at
        # 128 random bits: unique without coordination between nodes (as a UUID's 122).
        event_id = os.urandom(16).hex()
        body = orjson.dumps(
            {"id": event_id, "type": event, "created_at": int(now * 1000), "data": data}
        ).decode()
        return [(event_id, url, event, key, body, now) for url in urls]

    def written(self) -> None:
        """Rows were committed: wake the dispatcher (on the event loop)."""
        if self.wake is not None:
            self.wake()


def member_data(group_id: int, user_id: int, reason: str) -> dict[str, Any]:
    """The ``data`` of ``group.member_added`` / ``group.member_removed``."""
    return {"group_id": group_id, "user_id": user_id, "reason": reason}


def group_key(group_id: int) -> str:
    """The order key of a group's events: its conversation's (messages and membership
    changes of one group keep their order)."""
    return f"g:{group_id}"
