"""The webhook outbox as the dispatcher sees it: claim due rows, record outcomes.

The stores write the rows with their events (:mod:`bitchat.webhooks`); an
:class:`OutboxStore` is the dispatcher's side of the same table, one per
dialect: ``SqliteOutboxStore`` in :mod:`bitchat.im.sqlite_outbox`,
``PgOutboxStore`` in :mod:`bitchat.cluster.outbox`. Both run the queries of :mod:`bitchat.im.sql`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bitchat.im import sql
from bitchat.webhooks import OutboxRow


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row claimed for delivery (leased: no other claim takes it meanwhile)."""

    id: int
    event_id: str
    endpoint: str
    type: str
    body: str
    attempts: int
    """Failed deliveries so far."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event an endpoint never took (``webhook_max_attempts`` failures)."""

    id: int
    event_id: str
    endpoint: str
    type: str
    attempts: int
    last_error: str
    created_at: float
    died_at: float
    body: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_id": self.event_id,
            "endpoint": self.endpoint,
            "type": self.type,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "died_at": self.died_at,
        }


class OutboxStore(abc.ABC):
    """The outbox table, for the dispatcher and ``bitchat webhooks``."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open what the store needs."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close it."""

    @abc.abstractmethod
    async def _query(self, doing: str, query: str, **params: Any) -> list[Sequence[Any]]:
        """The rows of ``query`` (a statement of :mod:`bitchat.im.sql`)."""

    @abc.abstractmethod
    async def claim(
        self, endpoints: Sequence[str], now: float, lease_until: float, limit: int
    ) -> list[Claimed]:
        """Up to ``limit`` rows due at ``now`` for ``endpoints``, none with an earlier
        row of its endpoint and order key pending; each leased until ``lease_until``."""

    @abc.abstractmethod
    async def enqueue(self, events: Sequence[OutboxRow]) -> None:
        """Write rows of an event that has no transaction of its own (presence)."""

    async def delivered(self, row_id: int) -> None:
        await self._query("recording a webhook delivery", sql.OUTBOX_DELIVERED, id=row_id)

    async def retry(self, row_id: int, attempts: int, next_at: float, error: str) -> None:
        await self._query(
            "recording a failed webhook delivery",
            sql.OUTBOX_RETRY,
            id=row_id,
            attempts=attempts,
            next_at=next_at,
            error=error,
        )

    async def dead(self, row_id: int, attempts: int, now: float, error: str) -> None:
        await self._query(
            "recording a dead letter",
            sql.OUTBOX_DEAD,
            id=row_id,
            attempts=attempts,
            next_at=now,
            error=error,
        )

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        rows = await self._query("listing dead letters", sql.OUTBOX_DEAD_LETTERS, limit=limit)
        return [
            DeadLetter(
                int(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                int(r[4]),
                str(r[5]),
                float(r[6]),
                float(r[7]),
                str(r[8]),
            )
            for r in rows
        ]

    async def replay(self, row_id: int = 0) -> int:
        """Dead letter ``row_id`` (0: every one) pending again, as if new; how many."""
        return len(await self._query("replaying dead letters", sql.OUTBOX_REPLAY, id=row_id))

    async def pending(self) -> int:
        """Rows not delivered yet (nor dead)."""
        rows = await self._query("counting webhook deliveries", sql.OUTBOX_PENDING)
        return int(rows[0][0])
