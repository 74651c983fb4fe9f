"""``bitchat server``: run a server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
from typing import Any

from bitchat.errors import BitchatError
from bitchat.server import Server, install_uvloop
from bitchat.settings import Settings

log = logging.getLogger("bitchat.cli")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "server",
        help="run a bitchat server",
        description="Run a bitchat server (standalone by default).",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8864, help="port to listen on (default 8864)")
    p.add_argument(
        "--data-dir",
        default=Settings.data_dir,
        help="folder of the standalone database (default ./bitchat-data)",
    )
    p.add_argument(
        "--no-auto-register",
        action="store_true",
        help="refuse logins of unknown names instead of registering them",
    )
    p.add_argument("--tls-cert", help="PEM certificate: serve TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=Settings.read_idle_timeout,
        help="close connections silent for this many seconds (default 15)",
    )
    p.add_argument(
        "--max-frame-size",
        type=int,
        default=Settings.max_frame_size,
        help="largest frame body in bytes (default 1 MiB)",
    )
    p.add_argument(
        "--max-message-length",
        type=int,
        default=Settings.max_message_length,
        help="longest chat message in characters (default 4096)",
    )
    p.add_argument(
        "--max-group-size",
        type=int,
        default=Settings.max_group_size,
        help="most members of a group (default 500)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=Settings.rate_limit,
        help="requests per second per connection, 0 = off (default 50)",
    )
    p.add_argument(
        "--rate-burst",
        type=int,
        default=Settings.rate_burst,
        help="burst above the rate (default 200)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=Settings.worker_threads,
        help="worker threads for POOL handlers (default 16)",
    )
    p.add_argument(
        "--admin-token",
        default=None,
        help="token required by /status/* (default: loopback clients only)",
    )
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.add_argument(
        "--cluster", action="store_true", help="cluster mode: Redis registry and PostgreSQL storage"
    )
    p.add_argument("--redis", default=None, help="Redis URL (cluster mode)")
    p.add_argument("--pg", default=None, help="PostgreSQL DSN (cluster mode)")
    p.add_argument("--node-id", type=int, default=None, help="this node's id, 0-1023 (cluster)")
    p.add_argument(
        "--advertise",
        default=None,
        help="HOST:PORT clients should use to reach this node (cluster)",
    )
    p.add_argument(
        "--redis-prefix",
        default=Settings.redis_prefix,
        help="prefix of the cluster's Redis keys (cluster; default bitchat:)",
    )
    p.add_argument(
        "--node-ttl",
        type=float,
        default=Settings.node_ttl,
        help="seconds a dead node stays registered (cluster; default 5)",
    )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        data_dir=args.data_dir,
        auto_register=not args.no_auto_register,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        read_idle_timeout=args.idle_timeout,
        max_frame_size=args.max_frame_size,
        max_message_length=args.max_message_length,
        max_group_size=args.max_group_size,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        worker_threads=args.workers,
        admin_token=args.admin_token,
        node_id=args.node_id or 0,
        redis_prefix=args.redis_prefix,
        node_ttl=args.node_ttl,
    )


def build_server(args: argparse.Namespace) -> Server:
    settings = settings_from_args(args)
    if args.cluster:
        from bitchat.cluster.node import build_cluster_server

        server: Server = build_cluster_server(
            args.host,
            args.port,
            settings,
            redis_url=args.redis,
            pg_dsn=args.pg,
            node_id=args.node_id,
            advertise=args.advertise,
        )
        return server
    from bitchat.im.app import build_standalone_server

    return build_standalone_server(args.host, args.port, settings)


async def serve(server: Server) -> None:
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Task[None]] = set()  # a reference keeps the stop task alive

    def on_signal(sig: signal.Signals) -> None:
        log.info("received %s, shutting down", sig.name)
        task = loop.create_task(server.stop())
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
    # The cyclic collector was the largest single cost under load (`bitchat bench
    # p2p` profile: 20-40% of the server's CPU): what start-up loaded (modules,
    # caches, the user table) lives as long as the process, so it is frozen out of
    # collections; and messages in flight survive the young generation, so it is
    # collected every 20,000 allocations rather than 700. Garbage here is rarely
    # cyclic: reference counting frees it either way.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1000)
    await server.serve_forever()


def run(args: argparse.Namespace) -> int:
    if not args.no_uvloop:
        install_uvloop()
    try:
        server = build_server(args)
        asyncio.run(serve(server))
    except (OSError, BitchatError) as exc:
        log.error("cannot start the server: %s", exc)
        return 1
    return 0
