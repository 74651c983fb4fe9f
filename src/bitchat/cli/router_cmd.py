"""``bitchat router``: the cluster's router, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from bitchat.errors import BitchatError
from bitchat.server import install_uvloop
from bitchat.settings import Settings

log = logging.getLogger("bitchat.cli")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "router",
        help="run the cluster router",
        description="Run the cluster router: clients ask it which live server to use "
        "(bitchat client --router HOST:PORT).",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8870, help="port to listen on (default 8870)")
    p.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/0",
        help="Redis URL of the cluster registry (default redis://127.0.0.1:6379/0)",
    )
    p.add_argument(
        "--redis-prefix",
        default=Settings.redis_prefix,
        help="prefix of the cluster's Redis keys (default bitchat:)",
    )
    p.add_argument(
        "--policy",
        default="least-connections",
        choices=["least-connections", "round-robin"],
        help="how to pick a server (default least-connections)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=Settings.read_idle_timeout,
        help="close connections silent for this many seconds (default 15)",
    )
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitchat.cli.server_cmd import serve
    from bitchat.cluster.router import build_router

    if not args.no_uvloop:
        install_uvloop()
    settings = Settings(
        redis_prefix=args.redis_prefix,
        router_policy=args.policy.replace("-", "_"),
        read_idle_timeout=args.idle_timeout,
    )
    try:
        server = build_router(args.host, args.port, settings, redis_url=args.redis)
        asyncio.run(serve(server))
    except (OSError, BitchatError) as exc:
        log.error("cannot start the router: %s", exc)
        return 1
    return 0
