"""``bitchat router``: the cluster's router, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from bitchat.cli.options import add_settings_options, print_config, settings_from_args
from bitchat.errors import BitchatError, ConfigError
from bitchat.server import install_uvloop
from bitchat.settings import ROUTER

log = logging.getLogger("bitchat.cli")

DEFAULTS: dict[str, Any] = {"port": 8870, "redis_url": "redis://127.0.0.1:6379/0"}
"""The router's own defaults, where they differ from the fields' (a server's)."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "router",
        help="run the cluster router",
        description="Run the cluster router: clients ask it which live server to use "
        "(bitchat client --router HOST:PORT). Settings come from the options, the "
        "BITCHAT_<NAME> environment variables and the --config file, as for bitchat "
        "server. Exit status: 0 after a clean stop, 1 if the router cannot start, 2 for "
        "a bad option or setting.",
    )
    add_settings_options(p, ROUTER, DEFAULTS)
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitchat.cli.server_cmd import serve
    from bitchat.cluster.router import build_router

    try:
        loaded = settings_from_args(args, defaults=DEFAULTS)
        redis_url = loaded.settings.redis_url
        if redis_url is None:
            where = loaded.origins.get("redis_url", "redis_url")
            raise ConfigError(f"{where}: the router needs a Redis URL")
    except ConfigError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    if args.print_config:
        print_config(loaded, ROUTER)
        return 0
    if not args.no_uvloop:
        install_uvloop()
    settings = loaded.settings
    try:
        server = build_router(settings.host, settings.port, settings, redis_url=redis_url)
        asyncio.run(serve(server))
    except (OSError, BitchatError) as exc:
        log.error("cannot start the router: %s", exc)
        return 1
    return 0
