"""The state of a backing service (Redis, PostgreSQL) as a node sees it.

A node never hides an outage: the first failure is logged as an error with
what was being done, work that needs the service is refused with
:class:`~bitchat.errors.ServiceUnavailable` (code ``unavailable``) meanwhile,
and the recovery is logged with the outage's length. Tests wait on the
transitions with :meth:`Health.wait` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time


class Health:
    """Up or down, with logged transitions and awaitable changes."""

    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name = name
        self.log = log
        self.down_since: float | None = None
        self.last_error = ""
        self.outages = 0
        """How many times the service went down (tests and metrics read it)."""
        self._waiters: list[tuple[bool, asyncio.Future[None]]] = []

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, exc: BaseException, doing: str) -> None:
        """A call failed: log the outage once, at its start."""
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.down_since is not None:
            self.log.debug("%s still unavailable (%s): %s", self.name, doing, self.last_error)
            return
        self.down_since = time.monotonic()
        self.outages += 1
        self.log.error(
            "%s is unavailable (%s while %s); refusing work that needs it and reconnecting",
            self.name,
            self.last_error,
            doing,
        )
        self._notify(False)

    def ok(self) -> bool:
        """A call succeeded; True if this ends an outage (logged)."""
        if self.down_since is None:
            return False
        self.log.warning(
            "%s is available again after %.1fs", self.name, time.monotonic() - self.down_since
        )
        self.down_since = None
        self._notify(True)
        return True

    async def wait(self, up: bool, timeout: float) -> None:
        """Wait until the service is up (or down); TimeoutError after ``timeout``."""
        if self.up is up:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (up, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _notify(self, up: bool) -> None:
        for state, fut in list(self._waiters):
            if state is up and not fut.done():
                fut.set_result(None)


class Counter:
    """A count of events that code can wait on (``await c.wait(n, timeout)``)."""

    def __init__(self) -> None:
        self.value = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def bump(self) -> None:
        self.value += 1
        for entry in list(self._waiters):
            if self.value >= entry[0]:
                self._waiters.remove(entry)
                if not entry[1].done():
                    entry[1].set_result(None)

    async def wait(self, at_least: int, timeout: float) -> None:
        """Wait until the count reaches ``at_least``; TimeoutError after ``timeout``."""
        if self.value >= at_least:
            return
        entry = (at_least, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(entry[1], timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)


class Backoff:
    """Exponential delays with full jitter, for reconnect loops."""

    def __init__(self, initial: float = 0.05, maximum: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def delay(self) -> float:
        d = random.uniform(self._next / 2, self._next)
        self._next = min(self._next * 2, self.maximum)
        return d
