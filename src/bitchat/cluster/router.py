"""The router (its own process): tells a client which live node to connect to.

It is a bitchat :class:`~bitchat.Server` with one handler: a client sends
:class:`~bitchat.cluster.packets.WhereTo` and gets a
:class:`~bitchat.cluster.packets.NodeAddress`, or an Error ``no_server`` when
no node is alive (``unavailable`` when Redis cannot be read). It holds no
state of its own beyond a little bookkeeping, so several routers may run side
by side, and a restarted one works at once.

Policies (``Settings.router_policy``):

``least_connections`` (default)
    the node with the fewest connections, as last published by the nodes
    plus the clients this router sent there since (published loads are up
    to a heartbeat old; without the correction a burst of clients would all
    go to the same node).
``round_robin``
    the live nodes in turn, by node id.
"""

from __future__ import annotations

import logging

from bitchat.cluster.health import Health
from bitchat.cluster.packets import NodeAddress, WhereTo
from bitchat.cluster.registry import (
    REDIS_ERRORS,
    Keys,
    NodeInfo,
    connect_redis,
    live_nodes,
    safe_url,
)
from bitchat.errors import RequestError, ServiceUnavailable, UsageError, codes
from bitchat.server import Server
from bitchat.session import Session
from bitchat.settings import Settings

log = logging.getLogger("bitchat.cluster.router")

POLICIES = ("least_connections", "round_robin")


class Router:
    """Picks a live node from the Redis registry."""

    def __init__(self, redis_url: str, settings: Settings) -> None:
        if settings.router_policy not in POLICIES:
            raise UsageError(
                f"unknown router policy {settings.router_policy!r}; "
                f"choose one of {', '.join(POLICIES)}"
            )
        self.redis_url = redis_url
        self.settings = settings
        self.policy = settings.router_policy
        self.keys = Keys(settings.redis_prefix)
        self.redis = connect_redis(redis_url, settings)
        self.health = Health("Redis", log)
        # node id -> (its last seen heartbeat number, clients sent there since).
        self._sent: dict[int, tuple[int, int]] = {}
        self._turn = -1

    async def start(self, server: Server) -> None:
        try:
            nodes = await live_nodes(self.redis, self.keys)
        except REDIS_ERRORS as exc:
            self.health.failed(exc, "reading the registry at start")
            return
        log.info(
            "router uses Redis at %s (key prefix %r, policy %s): %d live node(s)",
            safe_url(self.redis_url),
            self.keys.prefix,
            self.policy,
            sum(n.ready for n in nodes),
        )

    async def close(self, server: Server) -> None:
        await self.redis.aclose()

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes that are ready for clients."""
        try:
            nodes = await live_nodes(self.redis, self.keys)
        except REDIS_ERRORS as exc:
            self.health.failed(exc, "reading the registry")
            raise ServiceUnavailable(
                "the router cannot read the cluster registry (Redis is down); retry later"
            ) from exc
        self.health.ok()
        return [n for n in nodes if n.ready and n.host and n.port]

    def choose(self, nodes: list[NodeInfo], avoid: list[int] | None = None) -> NodeInfo:
        """A node by the policy, preferring those not in ``avoid``."""
        if not nodes:
            raise RequestError(codes.NO_SERVER, "no bitchat server is alive in the cluster")
        preferred = [n for n in nodes if n.node_id not in (avoid or ())] or nodes
        if self.policy == "round_robin":
            later = [n for n in preferred if n.node_id > self._turn]
            node = later[0] if later else preferred[0]
            self._turn = node.node_id
            return node
        node = min(preferred, key=lambda n: (n.conns + self._since_beat(n), n.node_id))
        beat, sent = self._sent.get(node.node_id, (node.beat, 0))
        self._sent[node.node_id] = (beat, sent + 1)
        return node

    def _since_beat(self, node: NodeInfo) -> int:
        beat, sent = self._sent.get(node.node_id, (node.beat, 0))
        if beat != node.beat:  # a fresh load figure: it counts our clients already
            self._sent[node.node_id] = (node.beat, 0)
            return 0
        return sent

    async def where_to(self, session: Session, p: WhereTo) -> NodeAddress:
        node = self.choose(await self.nodes(), p.avoid)
        log.debug(
            "sending %s to node %d at %s:%d", session.remote, node.node_id, node.host, node.port
        )
        return NodeAddress(node.host, node.port, node.node_id)


def build_router(
    host: str = "0.0.0.0",
    port: int = 8870,
    settings: Settings | None = None,
    *,
    redis_url: str = "redis://127.0.0.1:6379/0",
) -> Server:
    """The router process's server (``bitchat router``)."""
    settings = settings or Settings()
    server = Server(host, port, settings, mode="router")
    router = Router(redis_url, settings)
    server.add_handler(WhereTo, router.where_to)
    server.on_startup.append(router.start)
    server.on_shutdown.append(router.close)
    server.data["router"] = router
    return server
