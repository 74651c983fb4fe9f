"""The webhook outbox in the standalone SQLite database (see :mod:`bitchat.im.outbox`)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite

from bitchat.errors import ServiceUnavailable
from bitchat.im import sql
from bitchat.im.outbox import Claimed, OutboxStore
from bitchat.im.sqlite import open_db
from bitchat.webhooks import OutboxRow


class SqliteOutboxStore(OutboxStore):
    """The outbox in the standalone database (a connection of its own)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def start(self) -> None:
        self._db = await open_db(self.path)  # creates and migrates, as the stores do

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _query(self, doing: str, query: str, **params: Any) -> list[Sequence[Any]]:
        if self._db is None:
            raise ServiceUnavailable("the webhook outbox is not open")
        text, args = sql.render(query, sql.Dialect.SQLITE, params)
        try:
            return list(await self._db.execute_fetchall(text, args))
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"database error {doing}: {exc}") from exc

    async def claim(
        self, endpoints: Sequence[str], now: float, lease_until: float, limit: int
    ) -> list[Claimed]:
        rows = await self._query(
            "claiming webhook deliveries",
            sql.OUTBOX_CLAIM_SQLITE,
            endpoints=json.dumps(list(endpoints)),
            now=now,
            lease=lease_until,
            limit=limit,
        )
        return sorted((Claimed(*r) for r in rows), key=lambda c: c.id)

    async def enqueue(self, events: Sequence[OutboxRow]) -> None:
        if self._db is None:
            raise ServiceUnavailable("the webhook outbox is not open")
        if not events:
            return
        # One statement: the rows of one event are written all or none.
        values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(events))
        try:
            await self._db.execute(
                "INSERT INTO webhook_outbox (event_id, endpoint, type, order_key, body, "
                f"created_at) VALUES {values}",
                [v for row in events for v in row],
            )
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"database error writing webhook events: {exc}") from exc
