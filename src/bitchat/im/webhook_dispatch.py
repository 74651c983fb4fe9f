"""The webhook dispatcher: a background task of each server that delivers the outbox.

It claims due rows (:class:`~bitchat.im.outbox.OutboxStore`), at most as many
as it has free delivery slots (``webhook_concurrency``), POSTs each with httpx,
and records the outcome: a 2xx answer deletes the row; anything else (another
status, a refused connection, ``webhook_timeout``) counts a failure and sets
the next try after an exponential backoff with jitter (``webhook_backoff_base``
doubling up to ``webhook_backoff_max``); the ``webhook_max_attempts``-th
failure makes the row a dead letter. A claimed row is leased for twice
``webhook_timeout``: if its node dies before recording the outcome, it is
claimed again after that and delivered again (at least once: the event id lets
the receiver drop the repeat).

Order: a row is not claimed while an earlier row of the same endpoint and order
key (the conversation, the group, the user) is pending, so one endpoint gets
the events of one conversation one after the other, in commit order, even
across retries and nodes. A dead letter no longer holds back the rows after it.

It wakes when this server commits outbox rows (:attr:`Outbox.wake
<bitchat.webhooks.Outbox.wake>`) or a delivery ends, and otherwise looks every
``webhook_poll_interval`` (retries coming due, other nodes' events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from bitchat.errors import ServiceUnavailable
from bitchat.im.outbox import Claimed, OutboxStore
from bitchat.webhooks import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SIGNATURE_HEADER,
    USER_OFFLINE,
    USER_ONLINE,
    Endpoint,
    Outbox,
    sign,
)

if TYPE_CHECKING:
    from bitchat.metrics import Metrics
    from bitchat.settings import Settings

log = logging.getLogger("bitchat.webhooks")

_ERROR_LENGTH = 500
"""Characters of a failure's description kept with the row."""


def backoff(attempts: int, base: float, maximum: float) -> float:
    """Seconds before the next try after ``attempts`` failures: ``base`` doubling per
    failure up to ``maximum``, its second half random (so endpoints that failed
    together are not all retried at once)."""
    delay = min(maximum, base * 2.0 ** min(attempts - 1, 60))
    return delay / 2 + random.uniform(0, delay / 2)


class WebhookDispatcher:
    """Delivers the outbox of one server to ``outbox``'s endpoints."""

    def __init__(
        self,
        settings: Settings,
        store: OutboxStore,
        outbox: Outbox,
        metrics: Metrics | None = None,
        version: str = "",
    ) -> None:
        self.settings = settings
        self.store = store
        self.outbox = outbox
        self.metrics = metrics
        self._endpoints: dict[str, Endpoint] = {e.url: e for e in outbox.endpoints}
        self._urls = list(self._endpoints)
        self._agent = f"bitchat/{version}" if version else "bitchat"
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._closing = False
        self.on_outcome: Callable[[Claimed, str], None] | None = None
        """Called once a delivery's outcome is recorded, with the row and how it went:
        ``delivered``, ``failed`` (to be tried again) or ``dead``."""

    @property
    def lease(self) -> float:
        """How long a claimed row stays claimed: twice a delivery's longest time."""
        return 2 * self.settings.webhook_timeout

    async def start(self) -> None:
        await self.store.start()
        s = self.settings
        self._client = httpx.AsyncClient(
            timeout=s.webhook_timeout,
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=s.webhook_concurrency,
                max_keepalive_connections=s.webhook_concurrency,
            ),
            headers={"User-Agent": self._agent},
            trust_env=False,  # a proxy from the environment is not the endpoint's choice
        )
        self._closing = False
        self.outbox.wake = self.wake
        self._task = asyncio.get_running_loop().create_task(self._run())
        log.info("webhooks: delivering to %s", ", ".join(self._urls))

    def wake(self) -> None:
        """Look for due rows now (rows were committed, or a delivery ended)."""
        self._wake.set()

    async def close(self) -> None:
        """Stop claiming; deliveries under way get ``shutdown_grace`` to finish (an
        unfinished one is claimed again after its lease)."""
        self._closing = True
        self.outbox.wake = None
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        pending = list(self._inflight) + list(self._writes)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.settings.shutdown_grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self.store.close()

    # -- events without a transaction of their own --------------------------------------------

    def presence(self, user_id: int, name: str, online: bool) -> None:
        """``user.online`` / ``user.offline``: written to the outbox (in the background;
        a store that is down loses it, with a warning)."""
        event = USER_ONLINE if online else USER_OFFLINE
        rows = self.outbox.rows(event, f"u:{user_id}", {"user_id": user_id, "name": name})
        if not rows or self._closing:
            return

        async def write() -> None:
            try:
                await self.store.enqueue(rows)
            except ServiceUnavailable as exc:
                log.warning("webhooks: %s of user %d not written: %s", event, user_id, exc)
                return
            self.wake()

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    # -- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        s = self.settings
        while not self._closing:
            self._wake.clear()
            free = s.webhook_concurrency - len(self._inflight)
            claimed: list[Claimed] = []
            if free > 0:
                now = time.time()
                try:
                    claimed = await self.store.claim(
                        self._urls, now, now + self.lease, min(free, s.webhook_batch)
                    )
                except ServiceUnavailable as exc:
                    log.warning("webhooks: cannot read the outbox: %s", exc)
                except Exception:  # a bug: log it, keep delivering
                    log.exception("webhooks: claiming deliveries failed")
            for row in claimed:
                task = asyncio.get_running_loop().create_task(self._deliver(row))
                self._inflight.add(task)
                task.add_done_callback(self._delivered)
            if claimed and len(claimed) == min(free, s.webhook_batch):
                continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), s.webhook_poll_interval)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()  # a slot is free, and the next event of its key may go

    async def _deliver(self, row: Claimed) -> None:
        endpoint = self._endpoints[row.endpoint]
        body = row.body.encode()
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: row.event_id,
            EVENT_TYPE_HEADER: row.type,
            SIGNATURE_HEADER: sign(endpoint.secret, body),
        }
        error = ""
        assert self._client is not None
        try:
            # httpx's timeout bounds each step; this bounds the whole (a peer trickling
            # its answer byte by byte), so a delivery ends well within its lease.
            async with asyncio.timeout(self.settings.webhook_timeout):
                # Streamed and not read: what an endpoint answers beyond its status is
                # ignored.
                async with self._client.stream(
                    "POST", row.endpoint, content=body, headers=headers
                ) as response:
                    if not 200 <= response.status_code < 300:
                        error = f"HTTP {response.status_code}"
        except TimeoutError:
            error = f"no answer within {self.settings.webhook_timeout:g}s"
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # a bug: the row counts a failure, the dispatcher goes on
            log.exception("webhooks: delivering %s failed", row.event_id)
            error = f"{type(exc).__name__}: {exc}"
        await self._record(row, error[:_ERROR_LENGTH])

    async def _record(self, row: Claimed, error: str) -> None:
        s = self.settings
        attempts = row.attempts + 1
        try:
            if not error:
                await self.store.delivered(row.id)
                self._count(row, "delivered")
            elif attempts >= s.webhook_max_attempts:
                await self.store.dead(row.id, attempts, time.time(), error)
                self._count(row, "dead")
                log.warning(
                    "webhooks: %s %s to %s failed %d times (%s): a dead letter",
                    row.type,
                    row.event_id,
                    row.endpoint,
                    attempts,
                    error,
                )
            else:
                wait = backoff(attempts, s.webhook_backoff_base, s.webhook_backoff_max)
                await self.store.retry(row.id, attempts, time.time() + wait, error)
                self._count(row, "failed")
                log.info(
                    "webhooks: %s to %s failed (%s); try %d in %.1fs",
                    row.event_id,
                    row.endpoint,
                    error,
                    attempts + 1,
                    wait,
                )
        except ServiceUnavailable as exc:
            # Its lease runs out and it is claimed again: delivered twice at worst.
            log.warning("webhooks: cannot record the delivery of %s: %s", row.event_id, exc)

    def _count(self, row: Claimed, result: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(result).inc()
        if self.on_outcome is not None:
            self.on_outcome(row, result)
