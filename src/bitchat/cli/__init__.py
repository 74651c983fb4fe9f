"""The ``bitchat`` command: server, client, router, bench, webhooks."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from bitchat import __version__

Command = Callable[[argparse.Namespace], int]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitchat", description="bitchat: an instant-messaging server, client and framework."
    )
    parser.add_argument("--version", action="version", version=f"bitchat {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from bitchat.cli import server_cmd

    server_cmd.add_parser(sub)
    for name in ("client_cmd", "router_cmd", "bench_cmd", "webhooks_cmd"):
        try:
            module = __import__(f"bitchat.cli.{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
