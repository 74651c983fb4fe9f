"""The webhook outbox in PostgreSQL, shared by the nodes (see :mod:`bitchat.im.outbox`).

Each node's dispatcher claims rows with ``FOR UPDATE SKIP LOCKED``: nodes share
the work, and a row one node is claiming is skipped by the others, not waited for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from bitchat.cluster.pg import PgDatabase, write_outbox
from bitchat.im import sql
from bitchat.im.outbox import Claimed, OutboxStore
from bitchat.webhooks import OutboxRow


class PgOutboxStore(OutboxStore):
    """The outbox in the cluster's database, through the node's pool."""

    def __init__(self, db: PgDatabase) -> None:
        self.db = db
        self._open = False

    async def start(self) -> None:
        await self.db.open()
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self.db.close()

    async def _query(self, doing: str, query: str, **params: Any) -> list[Sequence[Any]]:
        text, args = sql.render(query, sql.Dialect.POSTGRES, params)

        async def q(con: asyncpg.Connection) -> list[Sequence[Any]]:
            return list(await con.fetch(text, *args))

        # Each statement is idempotent (a claim taken twice is a lease renewed; an
        # outcome recorded twice is the same outcome), so a dropped connection is retried.
        return await self.db.run(doing, q)

    async def claim(
        self, endpoints: Sequence[str], now: float, lease_until: float, limit: int
    ) -> list[Claimed]:
        rows = await self._query(
            "claiming webhook deliveries",
            sql.OUTBOX_CLAIM_POSTGRES,
            endpoints=list(endpoints),
            now=now,
            lease=lease_until,
            limit=limit,
        )
        return sorted((Claimed(*r) for r in rows), key=lambda c: c.id)

    async def enqueue(self, events: Sequence[OutboxRow]) -> None:
        async def q(con: asyncpg.Connection) -> None:
            await write_outbox(con, events)

        await self.db.run("writing webhook events", q, retry=False)
