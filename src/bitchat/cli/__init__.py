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


COMMANDS = {
    "server": "server_cmd",
    "client": "client_cmd",
    "router": "router_cmd",
    "bench": "bench_cmd",
    "webhooks": "webhooks_cmd",
}
"""Each command and the module that defines it (its options and what it runs)."""


def _named_command(argv: list[str]) -> str | None:
    """The command ``argv`` names, if it names one (the first word that is one)."""
    for word in argv:
        if word in COMMANDS:
            return word
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, given the ``argv`` it is for, of the command
    it names only: a server then never loads the client's, the bench's or the JWT
    library's modules (megabytes of resident memory it would keep)."""
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
    named = None if argv is None else _named_command(argv)
    for command, name in COMMANDS.items():
        if named is not None and command != named:
            continue
        try:
            module = __import__(f"bitchat.cli.{name}", fromlist=["add_parser"])
        except ImportError:
            if name == "server_cmd":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
