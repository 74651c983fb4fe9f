"""A cluster node's place in the registry: the seed's ``ClusterServer`` with its
``registerToRouter()`` done, as hooks on a plain :class:`~bitchat.Server`.

The composition root (:func:`bitchat.app.build_server`, ``mode="cluster"``) builds
the node and calls :func:`join_cluster`. Start-up order: claim the node id in
Redis (the Redis center starts first, so a duplicate of a live node is refused
before anything else), open PostgreSQL (migrating the schema), listen, then
announce the address so the router sends clients (``on_started``). A clean stop
leaves the registry first (``on_stopping``: as the port stops accepting), so the
router sends no one to a node that is draining its connections; a killed node
drops out after ``node_ttl``. A node whose id another instance took over stops.
"""

from __future__ import annotations

import asyncio
import logging

from bitchat.cluster.connections import RedisConnectionCenter
from bitchat.server import Server

log = logging.getLogger("bitchat.cluster.node")


def join_cluster(
    server: Server, center: RedisConnectionCenter, advertise: tuple[str, int] | None = None
) -> None:
    """Make ``server`` a member of the cluster ``center`` registers it in: its load
    is its connection count, it is announced at ``advertise`` (default: the bound
    address) once it listens, leaves as it stops, and stops if evicted."""
    stopping: set[asyncio.Task[None]] = set()  # a reference keeps the stop task alive

    def evicted() -> None:
        task = server.loop.create_task(server.stop())
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    async def announce(server: Server) -> None:
        await center.announce(*advertised(server, advertise))

    async def leave(server: Server) -> None:
        await center.leave()

    center.load = lambda: len(server.sessions)
    center.on_evicted = evicted
    server.on_started.append(announce)
    server.on_stopping.append(leave)


def advertised(server: Server, advertise: tuple[str, int] | None = None) -> tuple[str, int]:
    """The address clients are given: ``advertise``, else the bound one."""
    if advertise is not None:
        return advertise
    host, port = server.address
    if host in ("0.0.0.0", "::", ""):
        log.warning(
            "listening on all interfaces without --advertise: announcing "
            "127.0.0.1:%d, which only clients on this machine can reach",
            port,
        )
        host = "127.0.0.1"
    return host, port
