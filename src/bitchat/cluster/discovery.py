"""Finding a node through the router: the resolver of ``Client(resolve=...)``.

::

    im = IMClient(resolve=router_resolver("127.0.0.1", 8870))
    await im.connect()

The resolver asks the router each time the client (re)connects, so a client
whose node died is sent to a live one. It tells the router which node it was
sent to last time, so the router prefers another one: the node a client just
lost may still be in the registry for a few seconds after it died.
"""

from __future__ import annotations

import logging
import time

from bitchat.client import Client, Resolver
from bitchat.cluster.packets import NodeAddress, WhereTo
from bitchat.errors import ConnectionClosed, RequestError, RequestTimeout, codes
from bitchat.settings import Settings

log = logging.getLogger("bitchat.cluster.discovery")

_RECENT = 15.0
"""Seconds during which a node we were sent to counts as one that may have failed us."""


async def where_to(
    host: str, port: int, settings: Settings | None = None, avoid: list[int] | None = None
) -> NodeAddress:
    """Ask the router at ``host:port`` once for a live node.

    Raises :class:`~bitchat.RequestError` ``no_server`` when no node is alive,
    ``unavailable`` when the router cannot read the registry, and
    :class:`~bitchat.ConnectionClosed` (an ``OSError``) or
    :class:`~bitchat.RequestTimeout` when the router cannot be reached.
    """
    settings = settings or Settings()
    # One short-lived connection per question: nothing to keep alive between
    # (rare) reconnects, and a restarted router is simply found again.
    router = Client(host, port, settings.replace(heartbeat_interval=0), reconnect=False)
    try:
        await router.connect(settings.connect_timeout)
    except (OSError, TimeoutError) as exc:
        # A refused or timed-out connect alike: the router cannot be reached.
        if isinstance(exc, ConnectionClosed):
            raise
        raise ConnectionClosed(f"cannot connect: {str(exc) or type(exc).__name__}") from exc
    try:
        answer = await router.request(WhereTo(avoid or None), settings.request_timeout)
    finally:
        await router.close()
    if not isinstance(answer, NodeAddress):
        raise RequestError(
            codes.INVALID_PACKET, f"the router answered with {type(answer).__name__}"
        )
    return answer


def router_resolver(host: str, port: int, settings: Settings | None = None) -> Resolver:
    """An async resolver for ``Client(resolve=...)`` / ``IMClient(resolve=...)``.

    Each call asks the router at ``host:port`` for a live node and returns its
    ``(host, port)``. Errors propagate to the client's reconnect loop, which
    retries with backoff: ``RequestError`` ``no_server`` (no node is alive),
    ``ConnectionClosed`` (the router is down), ``RequestTimeout``.
    """
    # (time, node id) of recent answers: asked again soon after, those nodes failed us.
    recent: list[tuple[float, int]] = []
    failing: list[str] = []  # the error of the current run of failures, logged once

    def failed(message: str) -> None:
        level = logging.DEBUG if failing and failing[0] == message else logging.WARNING
        log.log(level, "%s (retrying)", message)
        failing[:] = [message]

    async def resolve() -> tuple[str, int]:
        now = time.monotonic()
        # The node of the last answer, and any other we were sent to lately.
        kept = recent[-8:]
        recent[:] = [(t, n) for t, n in kept[:-1] if now - t < _RECENT] + kept[-1:]
        avoid = sorted({n for _, n in recent})
        try:
            node = await where_to(host, port, settings, avoid=avoid)
        except RequestError as exc:
            failed(f"the router at {host}:{port} has no node for us: {exc.message or exc.code}")
            raise
        except (ConnectionClosed, RequestTimeout) as exc:
            failed(f"cannot ask the router at {host}:{port}: {exc}")
            raise
        failing.clear()
        recent.append((now, node.node_id))
        log.info("the router sent us to node %d at %s:%d", node.node_id, node.host, node.port)
        return node.host, node.port

    return resolve
