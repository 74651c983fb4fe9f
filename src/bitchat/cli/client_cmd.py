"""``bitchat client``: the interactive IM client (the seed's client example).

On a terminal it shows the prompt ``bitchat> ``; with stdin from a pipe or a
file it runs the lines as commands and prints the same output, so it can be
scripted; it then exits with status 1 if any command failed (0 otherwise).
``--router`` asks a cluster router which server to use (and asks again after
every disconnect). ``--host``/``--port`` name the server to connect to; the
client's settings (timeouts, heartbeat, reconnect delays) come from its options,
the ``BITCHAT_<NAME>`` environment variables and ``--config``, as the server's do.

The device id it logs in with is ``--device`` (a setting: also ``BITCHAT_DEVICE``
and the config file's ``device``); without it, the one kept for the server and
user in ``devices.json`` of the user's config folder (:mod:`bitchat.cli.devices`),
else the one the server names at the first login, kept there for the next run.

``--jwt TOKEN`` (also ``BITCHAT_JWT``, the config file's ``jwt``) logs in with a
JWT the product's backend signed before the first command, printing what
``-jwt TOKEN`` prints; a script whose login at start fails exits with status 1.

The client says what happens to its connection in status lines of its own
(``Connection lost; reconnecting...``), so the library's log records below
ERROR are not shown unless ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import sys
from collections.abc import Callable
from typing import Any

from bitchat.cli.devices import DEVICE_ID, FILE_NAME, DeviceStore, config_dir
from bitchat.cli.options import add_settings_options, print_config, settings_from_args
from bitchat.cli.sanitize import visible_lines
from bitchat.client import Resolver
from bitchat.errors import ConfigError
from bitchat.settings import CLIENT, Settings, show


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "client",
        help="run the interactive chat client",
        description="Connect to a bitchat server and chat: -lo name password, -lu, "
        "-pc userId message, ... (type help at the prompt).",
    )
    p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8864, help="server port (default 8864)")
    p.add_argument(
        "--router",
        metavar="HOST:PORT",
        default=None,
        help="ask this cluster router for a server instead of --host/--port",
    )
    p.add_argument(
        "--serializer",
        choices=["json", "msgpack"],
        default="json",
        help="body encoding on the wire (default json)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, verifying the server's certificate (system CAs by default)",
    )
    p.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=None,
        help="PEM file of the CA (or self-signed certificate) to trust; implies --tls",
    )
    add_settings_options(p, CLIENT)
    p.set_defaults(func=run)


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client's TLS context, or None for plain TCP."""
    if not (args.tls or args.tls_ca):
        return None
    return ssl.create_default_context(cafile=args.tls_ca)


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now: under the prompt, prompt_toolkit's
    ``patch_stdout`` replaces it, so log lines go above the prompt too. Control
    characters are escaped, line breaks kept (:func:`visible_lines`)."""

    def write(self, text: str) -> int:
        # A log record may quote the server (an error message): shown, not obeyed.
        return sys.stderr.write(visible_lines(text))

    def flush(self) -> None:
        sys.stderr.flush()


def server_name(args: argparse.Namespace) -> str:
    """The server the device ids are kept for: the router's address names a cluster."""
    if args.router:
        return f"router {args.router}"
    host = f"[{args.host}]" if ":" in args.host else args.host
    return f"{host}:{args.port}"


def _quiet_logging(level: str) -> None:
    # The client prints connection changes as status lines; the library's warnings
    # (a router with no server, a failed reconnect) would repeat them, timestamped.
    if level != "debug":
        logging.getLogger().setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(_CurrentStderr())


async def main(
    args: argparse.Namespace,
    *,
    interactive: bool | None = None,
    router_resolver: Callable[..., Resolver] | None = None,
    settings: Settings | None = None,
) -> int:
    from bitchat.cli.repl import Repl, stdin_lines
    from bitchat.im.client import IMClient

    settings = settings or Settings()
    resolve = None
    if args.router:
        assert router_resolver is not None
        host, port = parse_address(args.router)
        resolve = router_resolver(host, port, settings=settings)
    im = IMClient(
        args.host,
        args.port,
        settings,
        serializer=args.serializer,
        resolve=resolve,
        ssl=tls_context(args),
    )
    repl = Repl(
        im,
        out=lambda line: print(line, flush=True),
        via=f"router {args.router}" if args.router else None,
        device=settings.device,
        devices=DeviceStore(config_dir() / FILE_NAME, server_name(args)),
    )
    # Connect in the background: the prompt is usable at once; a command waits
    # for an attempt under way, and fails at once while the server is unreachable.
    connecting = asyncio.get_running_loop().create_task(im.connect(None))
    try:
        if interactive is None:
            interactive = sys.stdin.isatty()
        if settings.jwt:
            await repl.execute(f"-jwt {settings.jwt}")
        if interactive:
            await repl.run_interactive()
        else:
            await repl.run_lines(stdin_lines())
    finally:
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        await im.close()
    # A script learns whether every command worked; at a prompt, the user saw.
    return 1 if repl.failures and not interactive else 0


def run(args: argparse.Namespace) -> int:
    resolver: Callable[..., Resolver] | None = None
    try:
        loaded = settings_from_args(args)
    except ConfigError as exc:
        print(f"bitchat client: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print_config(loaded, CLIENT)
        return 0
    device = loaded.settings.device
    if device is not None and not DEVICE_ID.fullmatch(device):
        where = loaded.origins.get("device", "device")
        print(
            f"bitchat client: {where}: expected letters, digits and -_.: only, got {show(device)}",
            file=sys.stderr,
        )
        return 2
    token = loaded.settings.jwt
    if token and token.split() != [token]:
        where = loaded.origins.get("jwt", "jwt")
        print(f"bitchat client: {where}: expected a JWT (one word, no spaces)", file=sys.stderr)
        return 2
    try:
        tls_context(args)
    except (OSError, ssl.SSLError) as exc:
        print(f"bitchat client: --tls-ca: {exc}", file=sys.stderr)
        return 2
    if args.router:
        try:
            parse_address(args.router)
        except argparse.ArgumentTypeError as exc:
            print(f"bitchat client: --router: {exc}", file=sys.stderr)
            return 2
        try:
            from bitchat.cluster.discovery import router_resolver
        except ImportError as exc:
            print(f"bitchat client: cluster support is not available: {exc}", file=sys.stderr)
            return 2
        resolver = router_resolver
    _quiet_logging(args.log_level)
    try:
        return asyncio.run(main(args, router_resolver=resolver, settings=loaded.settings))
    except KeyboardInterrupt:  # Ctrl-C while a command runs (at the prompt it is bye)
        print("bye bye!", flush=True)
        return 130
