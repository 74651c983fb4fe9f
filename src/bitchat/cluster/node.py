"""A cluster node: the IM service over PostgreSQL and Redis, registered for the router.

::

    server = build_cluster_server("0.0.0.0", 8871, settings, redis_url="redis://...",
                                  pg_dsn="postgresql://...", node_id=1,
                                  advertise="10.0.0.5:8871")
    await server.serve_forever()

Start-up order: claim the node id in Redis (a duplicate of a live node is
refused here, before anything else), open PostgreSQL (migrating the schema),
listen, then announce the address so the router sends clients. A clean stop
leaves the registry first (as the port stops accepting), so the router sends no
one to a node that is draining its connections; a killed node drops out after
``node_ttl``.
"""

from __future__ import annotations

import logging

from bitchat.cluster.connections import RedisConnectionCenter
from bitchat.cluster.pg import PgDatabase, PgMessageCenter, PgUserCenter
from bitchat.errors import UsageError
from bitchat.im.app import install_web
from bitchat.im.centers import Message, User
from bitchat.im.delivery import SYNCING
from bitchat.im.ids import MAX_NODE, IdGenerator
from bitchat.im.packets import Login, LoginOk
from bitchat.im.passwords import hasher_for
from bitchat.im.service import IMService, push_message_each
from bitchat.server import Server
from bitchat.session import Session
from bitchat.settings import Settings

log = logging.getLogger("bitchat.cluster.node")

_TOKEN = "bitchat.token"


class ClusterServer(Server):
    """A bitchat server that joins the cluster once it listens (the seed's
    ``ClusterServer``, with its ``registerToRouter()`` done)."""

    def __init__(
        self,
        host: str,
        port: int,
        settings: Settings,
        center: RedisConnectionCenter,
        advertise: tuple[str, int] | None,
    ) -> None:
        super().__init__(host, port, settings, mode="cluster")
        self.center = center
        self.advertise = advertise
        center.load = lambda: len(self.sessions)
        center.on_evicted = self._evicted
        self.on_stopping.append(self._leave)

    def advertised(self) -> tuple[str, int]:
        """The address clients are given: ``advertise``, else the bound one."""
        if self.advertise is not None:
            return self.advertise
        host, port = self.address
        if host in ("0.0.0.0", "::", ""):
            log.warning(
                "listening on all interfaces without --advertise: announcing "
                "127.0.0.1:%d, which only clients on this machine can reach",
                port,
            )
            host = "127.0.0.1"
        return host, port

    async def start(self) -> None:
        await super().start()
        host, port = self.advertised()
        await self.center.announce(host, port)

    async def _leave(self, server: Server) -> None:
        await self.center.leave()

    def _evicted(self) -> None:
        self.loop.create_task(self.stop())


class ClusterIMService(IMService):
    """The IM service with cluster-wide presence and re-sync after Redis outages."""

    center: RedisConnectionCenter

    def __init__(
        self,
        server: Server,
        users: PgUserCenter,
        messages: PgMessageCenter,
        connections: RedisConnectionCenter,
    ) -> None:
        super().__init__(server, users, messages, connections)
        self.center = connections
        connections.on_resync = self._resync
        connections.on_presence = self._remote_presence

    async def _start(self, server: Server) -> None:
        # The node id first: a duplicate is refused before anything else is touched.
        # (If a step fails, the server runs the shutdown hooks: every center closes.)
        await self.center.start()
        await self.users.start()
        await self.messages.start()
        last = await self.messages.last_id(self.settings.node_id)
        self.ids = IdGenerator(self.settings.node_id, last)

    async def on_login(self, session: Session, p: Login) -> LoginOk:
        before = session.user_id
        was_syncing = SYNCING in session.data
        try:
            return await super().on_login(session, p)
        except BaseException:
            # A backend failed half-way (Redis or PostgreSQL down): the session
            # must not stay logged in, nor keep its pushes held back.
            if session.user_id is not None and session.user_id != before:
                await self.center.detach(session)
                session.user_id = session.user_name = None
                session.data.pop(_TOKEN, None)
            held = None if was_syncing else session.data.pop(SYNCING, None)
            if held and session.user_id is not None:
                push_message_each(held, session)
            raise

    def _presence(self, user: User, online: bool) -> None:
        super()._presence(user, online)
        self.center.publish_presence(user.id, user.name, online)

    def _remote_presence(self, user_id: int, name: str, online: bool) -> None:
        IMService._presence(self, User(user_id, name), online)

    def _resync(self, session: Session) -> None:
        """Push the session's pending messages again (they may have been lost in transit)."""
        user_id = session.user_id
        if user_id is None or session.closed or session.data.get(SYNCING) is not None:
            return
        held: list[Message] = []
        session.data[SYNCING] = held
        task = self.server.loop.create_task(self._sync(session, user_id, held))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a pair; UsageError if malformed."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def build_cluster_server(
    host: str = "0.0.0.0",
    port: int = 8864,
    settings: Settings | None = None,
    *,
    redis_url: str | None = None,
    pg_dsn: str | None = None,
    node_id: int | None = None,
    advertise: str | None = None,
) -> ClusterServer:
    """A cluster node (the seed's 集群版 server): PostgreSQL users and messages,
    Redis registry, connection center and forwarding.

    Raises :class:`~bitchat.UsageError` with a clear message when an option is
    missing or malformed; a duplicate node id is refused at start
    (:class:`~bitchat.cluster.registry.NodeIdInUse`).
    """
    settings = settings or Settings()
    if not redis_url:
        raise UsageError("cluster mode needs --redis URL (e.g. redis://127.0.0.1:6379/0)")
    if not pg_dsn:
        raise UsageError(
            "cluster mode needs --pg DSN (e.g. postgresql://postgres@127.0.0.1:5432/bitchat)"
        )
    if node_id is None:
        raise UsageError(f"cluster mode needs --node-id N (0-{MAX_NODE}), unique per node")
    if not 0 <= node_id <= MAX_NODE:
        raise UsageError(f"--node-id must be 0-{MAX_NODE}, got {node_id}")
    if settings.node_ttl <= 0:
        raise UsageError("node_ttl must be positive")
    address = parse_address(advertise) if advertise else None
    settings = settings.replace(node_id=node_id)

    center = RedisConnectionCenter(redis_url, settings, node_id)
    server = ClusterServer(host, port, settings, center, address)
    db = PgDatabase(pg_dsn, settings, application_name=f"bitchat-node-{node_id}")
    users = PgUserCenter(db, hasher_for(settings))
    messages = PgMessageCenter(
        db, batch_max=settings.store_batch_max, ack_batch_max=settings.store_batch_max_acks
    )
    im = ClusterIMService(server, users, messages, center)
    server.data["im"] = im
    server.data["cluster"] = center
    install_web(server, im)
    return server
