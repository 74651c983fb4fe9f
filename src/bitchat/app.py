"""The composition root: :func:`build_server` makes a complete IM server from a
:class:`~bitchat.Settings`. This module is the one place that decides which
backends a server has, as uvicorn's ``Config`` picks its protocol classes::

    settings.mode   users              messages              connections
    standalone      SqliteUserCenter   SqliteMessageCenter   MemoryConnectionCenter
    cluster         PgUserCenter       PgMessageCenter       RedisConnectionCenter
                    (one PgDatabase shared by both)          (+ the node registry)

    settings.mode   login throttle
    standalone      MemoryLoginThrottle (counts in this process)
    cluster         RedisLoginThrottle  (counts shared by the nodes)

The rest is the same in both modes: one :class:`~bitchat.im.service.IMService`
holds every handler, and the web front end (the chat page, WebSocket,
``/status``, ``/metrics``) shares the port. A cluster node differs only in its
lifecycle, which is wired here too: its Redis center starts first (claiming the
node id refuses a duplicate before PostgreSQL is touched), and the node is
announced to the router once it listens and leaves the registry as it stops
(:func:`bitchat.cluster.node.join_cluster`).

::

    from bitchat import Settings
    from bitchat.app import build_server

    server = build_server(Settings(host="127.0.0.1", port=8864))
    await server.serve_forever()
"""

from __future__ import annotations

from bitchat.errors import UsageError
from bitchat.files import install as install_files
from bitchat.im.auth import Authenticator
from bitchat.im.memory import MemoryConnectionCenter
from bitchat.im.passwords import hasher_for
from bitchat.im.service import IMService
from bitchat.im.sqlite import SqliteMessageCenter, SqliteUserCenter
from bitchat.im.throttle import MemoryLoginThrottle
from bitchat.server import Server
from bitchat.settings import Settings
from bitchat.web import install as install_web

__all__ = ["build_server", "check_settings", "parse_address"]


def build_server(settings: Settings, *, authenticator: Authenticator | None = None) -> Server:
    """A complete IM server on ``settings.host``:``settings.port``, with the backends
    ``settings.mode`` names: the seed's 单机版 (``standalone``) or a 集群版 node
    (``cluster``). Nothing is opened until the server starts.

    Raises :class:`~bitchat.UsageError` when the settings are incomplete or
    malformed (:func:`check_settings`); a duplicate node id is refused at start
    (:class:`~bitchat.cluster.registry.NodeIdInUse`). ``authenticator`` checks the
    ``jwt`` of a Login (default: JWTs, :class:`~bitchat.im.auth.JwtAuthenticator`).
    """
    check_settings(settings)
    server = Server(settings.host, settings.port, settings, mode=settings.mode)
    if settings.mode == "cluster":
        im = _cluster_service(server, authenticator)
    else:
        im = IMService(
            server,
            SqliteUserCenter(
                settings.db_path,
                hasher_for(settings),
                hash_concurrency=settings.password_hash_concurrency,
            ),
            SqliteMessageCenter(
                settings.db_path,
                batch_max=settings.store_batch_max,
                ack_batch_max=settings.store_batch_max_acks,
            ),
            MemoryConnectionCenter(),
            throttle=MemoryLoginThrottle(settings),
            authenticator=authenticator,
        )
    _install_webhooks(server, im)
    server.data["im"] = im
    install_files(server, im)
    install_web(server, im)
    return server


def _install_webhooks(server: Server, im: IMService) -> None:
    """With endpoints configured: the stores write an outbox, a dispatcher delivers it.
    Without, nothing: the stores' outbox stays None and no row is written."""
    from bitchat.webhooks import Outbox, endpoints

    found = endpoints(server.settings)
    if not found:
        return
    # Imported here: a server without webhooks loads no HTTP client.
    from bitchat import __version__
    from bitchat.im.outbox import OutboxStore
    from bitchat.im.sqlite_outbox import SqliteOutboxStore
    from bitchat.im.webhook_dispatch import WebhookDispatcher

    outbox = Outbox(found)
    im.users.outbox = outbox  # type: ignore[attr-defined]
    im.messages.outbox = outbox  # type: ignore[attr-defined]
    store: OutboxStore
    if server.settings.mode == "cluster":
        from bitchat.cluster.outbox import PgOutboxStore

        store = PgOutboxStore(im.messages.db)  # type: ignore[attr-defined]
    else:
        store = SqliteOutboxStore(server.settings.db_path)
    im.webhooks = WebhookDispatcher(server.settings, store, outbox, server.metrics, __version__)


def _cluster_service(server: Server, authenticator: Authenticator | None) -> IMService:
    """The IM service over PostgreSQL and Redis; ``server`` joins the cluster."""
    # Imported here: a standalone server loads neither redis nor asyncpg.
    from bitchat.cluster.connections import RedisConnectionCenter
    from bitchat.cluster.node import join_cluster
    from bitchat.cluster.pg import PgDatabase, PgMessageCenter, PgUserCenter
    from bitchat.cluster.throttle import RedisLoginThrottle

    settings = server.settings
    assert settings.redis_url and settings.pg_dsn  # check_settings said so
    node_id = settings.node_id
    connections = RedisConnectionCenter(settings.redis_url, settings, node_id)
    db = PgDatabase(settings.pg_dsn, settings, application_name=f"bitchat-node-{node_id}")
    users = PgUserCenter(
        db, hasher_for(settings), hash_concurrency=settings.password_hash_concurrency
    )
    messages = PgMessageCenter(
        db, batch_max=settings.store_batch_max, ack_batch_max=settings.store_batch_max_acks
    )
    throttle = RedisLoginThrottle(settings.redis_url, settings)
    # The node id first: a duplicate is refused before anything else is touched.
    im = IMService(
        server,
        users,
        messages,
        connections,
        start_order=(connections, users, messages),
        throttle=throttle,
        authenticator=authenticator,
    )
    advertise = parse_address(settings.advertise) if settings.advertise else None
    join_cluster(server, connections, advertise)
    server.data["cluster"] = connections
    return im


def check_settings(settings: Settings) -> None:
    """Raise :class:`~bitchat.UsageError` naming what to fix, unless ``settings`` are
    valid (:meth:`Settings.validate`, which raises a ``ConfigError``: in cluster mode
    that includes a Redis URL and a PostgreSQL DSN) and ``advertise`` is a
    ``HOST:PORT``. (The commands also refuse cluster mode without an explicit
    ``node_id``: they know where each value came from.)"""
    # An empty URL or DSN is as good as none: the same message says how to set it.
    blank = {name: None for name in ("redis_url", "pg_dsn") if getattr(settings, name) == ""}
    settings.replace(**blank).validate()
    if settings.mode == "cluster" and settings.advertise:
        parse_address(settings.advertise)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a pair; UsageError if malformed."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
