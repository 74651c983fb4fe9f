"""``bitchat server``: run a server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import resource
import signal
from typing import Any

from bitchat.cli.options import add_settings_options, print_config, settings_from_args
from bitchat.errors import BitchatError, ConfigError
from bitchat.server import Server, install_uvloop
from bitchat.settings import SERVER, Settings

log = logging.getLogger("bitchat.cli")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "server",
        help="run a bitchat server",
        description="Run a bitchat server (standalone by default). Every setting comes "
        "from, in this order: its option, its BITCHAT_<NAME> environment variable, "
        "the --config file, its default. Exit status: 0 after a clean stop, 1 if the "
        "server cannot start, 2 for a bad option or setting.",
    )
    add_settings_options(p, SERVER)
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.set_defaults(func=run)


def build_server(settings: Settings) -> Server:
    """The server ``settings`` describe: standalone or a cluster node (``mode``)."""
    from bitchat.app import build_server as build

    return build(settings)


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


def raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one: every connection is a
    descriptor, and the common default of 1,024 is a low ceiling for a chat server
    (``max_connections`` stays below whatever limit there is)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(args: argparse.Namespace) -> int:
    try:
        loaded = settings_from_args(args)
    except ConfigError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    if args.print_config:
        print_config(loaded, SERVER)
        return 0
    if args.config:
        log.info("settings from %s", args.config)
    if not args.no_uvloop:
        install_uvloop()
    raise_open_file_limit()
    try:
        server = build_server(loaded.settings)
        asyncio.run(serve(server))
    except (OSError, BitchatError) as exc:
        log.error("cannot start the server: %s", exc)
        return 1
    return 0
