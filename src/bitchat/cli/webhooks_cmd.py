"""``bitchat webhooks``: the dead letters of the webhook outbox, and replaying them.

It reads the server's own settings (the same ``--config`` file, environment and
options), so it opens the database the server writes: the standalone SQLite file
in ``data_dir``, or the cluster's PostgreSQL (``--cluster --pg DSN``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import sys
from typing import Any

from bitchat.cli.options import add_settings_options, print_config, settings_from_args
from bitchat.errors import BitchatError, ConfigError
from bitchat.im.outbox import OutboxStore
from bitchat.settings import SERVER, Settings

log = logging.getLogger("bitchat.cli")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "webhooks",
        help="list or replay webhook dead letters",
        description="The webhook deliveries that failed webhook_max_attempts times (dead "
        "letters), and replaying them. Takes the server's settings, to open its database.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    dead = actions.add_parser("dead", help="list the dead letters, oldest first")
    dead.add_argument("--limit", type=int, default=1000, help="most to list (default 1000)")
    dead.add_argument("--json", action="store_true", help="one JSON object a line")
    add_settings_options(dead, SERVER)
    replay = actions.add_parser(
        "replay", help="make dead letters pending again (delivered as new events)"
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=int, help="the dead letter's id (see `dead`)")
    which.add_argument("--all", action="store_true", help="every dead letter")
    add_settings_options(replay, SERVER)
    p.set_defaults(func=run)


def store_for(settings: Settings) -> OutboxStore:
    """The outbox of the database ``settings`` name."""
    if settings.mode == "cluster":
        from bitchat.cluster.outbox import PgOutboxStore
        from bitchat.cluster.pg import PgDatabase

        assert settings.pg_dsn  # validated: cluster mode has one
        return PgOutboxStore(PgDatabase(settings.pg_dsn, settings, "bitchat-webhooks"))
    from bitchat.im.sqlite_outbox import SqliteOutboxStore

    return SqliteOutboxStore(settings.db_path)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    store = store_for(settings)
    await store.start()
    try:
        if args.action == "dead":
            letters = await store.dead_letters(args.limit)
            for d in letters:
                if args.json:
                    print(json.dumps(d.to_dict(), ensure_ascii=False))
                else:
                    print(
                        f"{d.id}\t{d.type}\t{d.event_id}\t{d.endpoint}\t{d.attempts} attempts"
                        f"\tdied {_when(d.died_at)}\t{d.last_error}"
                    )
            if not args.json:
                print(f"{len(letters)} dead letter(s)", file=sys.stderr)
        else:
            n = await store.replay(0 if args.all else args.id)
            print(f"{n} dead letter(s) pending again")
            if not args.all and n == 0:
                return 1
    finally:
        await store.close()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        loaded = settings_from_args(args)
    except ConfigError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    if args.print_config:
        print_config(loaded, SERVER)
        return 0
    try:
        return asyncio.run(_run(loaded.settings, args))
    except BitchatError as exc:
        log.error("%s", exc)
        return 1
