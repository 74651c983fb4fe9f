"""Failed password logins slow down further attempts, per account and per address.

Every password login first asks the throttle (:meth:`LoginThrottle.attempt`).
Each account (its :func:`~bitchat.im.names.name_key`, whether it exists or not)
and each remote address (an IPv6 /64, since one host holds a whole one) has a
count of failures. The first ``login_free_attempts`` (``login_address_free_attempts``
for an address) go at once; after that, each attempt must wait ``login_delay``,
doubling with each further failure, up to ``login_max_delay`` for an account and
``login_address_max_delay`` for an address. An attempt that comes too early is
refused with ``login_throttled`` and the seconds to wait, without its password
being checked (so it costs no hash). A count is forgotten
``login_failure_window`` after its last failure.

It is a delay, never a lock-out: once the wait is over, the right password
works. The owner on another address waits at most ``login_max_delay`` however
many addresses attack; an attacker's own address soon waits far longer
(``login_address_max_delay``), and its refused attempts do not count against
the account, so it cannot keep the account's slot taken.

An admitted attempt counts as a failure from the start (attempts under way
count, so many connections at once gain nothing) until :meth:`~LoginThrottle.forgive`
says it was not a wrong password (it succeeded, or failed for another reason).
So that a burst of right passwords from one address (a NAT, a restart) is not
taken for guessing, a server checks at most ``login_address_concurrency`` of one
address's logins at once (:meth:`~LoginThrottle.turn`); the others wait their
turn, which also keeps one address from filling the hashing queue.

Two backends: :class:`MemoryLoginThrottle` (standalone, bounded by
``login_throttle_max_entries``) and :class:`bitchat.cluster.throttle.RedisLoginThrottle`,
which shares the counts between the nodes of a cluster; the composition root
picks one.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import ipaddress
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from bitchat.errors import RequestError, codes
from bitchat.settings import Settings


@dataclass(frozen=True, slots=True)
class Rule:
    """When one kind of counter (accounts or addresses) makes attempts wait."""

    free: int
    """Failures before any wait."""
    base: float
    """The first wait, in seconds (0: never wait)."""
    cap: float
    """The longest wait."""

    def delay(self, failures: int) -> float:
        """Seconds the next attempt waits after ``failures`` failures."""
        if failures < self.free or self.base <= 0:
            return 0.0
        # Past 2**60 the float is as good as infinite; the cap applies anyway.
        return min(self.cap, self.base * 2.0 ** min(failures - self.free, 60))


def rules(settings: Settings) -> tuple[Rule, Rule]:
    """The (account, address) rules ``settings`` name."""
    base = settings.login_delay
    return (
        Rule(settings.login_free_attempts, base, settings.login_max_delay),
        Rule(settings.login_address_free_attempts, base, settings.login_address_max_delay),
    )


def remote_address(remote: str) -> str:
    """The address a session's ``remote`` (``host:port``) counts failures under: the
    IPv4 address, or the /64 network of an IPv6 one."""
    host, sep, port = remote.rpartition(":")  # "::1:5555" too: an IPv6 address, a port
    if not sep or not port.isdigit():
        host = remote
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host or remote
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def throttled(wait: float) -> RequestError:
    """The refusal of an attempt that came ``wait`` seconds too early."""
    seconds = math.ceil(wait * 10) / 10
    return RequestError(codes.LOGIN_THROTTLED, f"too many failed logins: retry in {seconds:g} s")


@dataclass(slots=True)
class _Turns:
    semaphore: asyncio.Semaphore
    users: int = 0
    """Logins holding or waiting for a turn."""


class LoginThrottle(abc.ABC):
    """Counts of failed logins per account and per address (see the module)."""

    def __init__(self, settings: Settings) -> None:
        self.account_rule, self.address_rule = rules(settings)
        self.window = settings.login_failure_window
        self.concurrency = settings.login_address_concurrency
        self._turns: dict[str, _Turns] = {}

    @contextlib.asynccontextmanager
    async def turn(self, address: str) -> AsyncIterator[None]:
        """Hold one of ``address``'s turns on this server while its login is checked."""
        turns = self._turns.get(address)
        if turns is None:
            turns = self._turns[address] = _Turns(asyncio.Semaphore(self.concurrency))
        turns.users += 1
        try:
            async with turns.semaphore:
                yield
        finally:
            turns.users -= 1
            if turns.users == 0:
                del self._turns[address]

    @property
    def enabled(self) -> bool:
        return self.account_rule.base > 0

    @abc.abstractmethod
    async def attempt(self, account: str, address: str) -> float:
        """0 if a login to ``account`` from ``address`` may go ahead now (it counts as
        failed until forgiven); else the seconds it must wait (nothing is counted)."""

    @abc.abstractmethod
    async def forgive(self, account: str, address: str) -> None:
        """An admitted attempt was no wrong password: it does not count."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


@dataclass(slots=True)
class _Count:
    failures: int = 0
    next_at: float = 0.0
    """When the next attempt may go ahead (the clock's time)."""
    last: float = 0.0
    """The last change: the count is forgotten a window after it."""


class MemoryLoginThrottle(LoginThrottle):
    """The counts in this process (a standalone server), oldest forgotten first.

    ``clock`` is a monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(settings)
        self.clock = clock
        self.max_entries = settings.login_throttle_max_entries
        # Least recently changed first: expired ones and the oldest leave from the front.
        self._counts: collections.OrderedDict[str, _Count] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    async def attempt(self, account: str, address: str) -> float:
        return self.attempt_now(account, address)

    async def forgive(self, account: str, address: str) -> None:
        self.forgive_now(account, address)

    def attempt_now(self, account: str, address: str) -> float:
        """:meth:`attempt`, without awaiting (all of it happens at once)."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        self._forget(now)
        keys = self._keys(account, address)
        wait = 0.0
        for key, _ in keys:
            count = self._counts.get(key)
            if count is not None:
                wait = max(wait, count.next_at - now)
        if wait > 0:
            return wait
        for key, rule in keys:
            count = self._counts.pop(key, None) or _Count()
            count.failures += 1
            count.next_at = now + rule.delay(count.failures)
            count.last = now
            self._counts[key] = count
        while len(self._counts) > self.max_entries:
            self._counts.popitem(last=False)
        return 0.0

    def forgive_now(self, account: str, address: str) -> None:
        now = self.clock()
        for key, rule in self._keys(account, address):
            count = self._counts.get(key)
            if count is None:
                continue
            count.failures = max(0, count.failures - 1)
            count.next_at = now + rule.delay(count.failures)
            if count.failures == 0:
                del self._counts[key]

    def _keys(self, account: str, address: str) -> tuple[tuple[str, Rule], tuple[str, Rule]]:
        return ("a:" + account, self.account_rule), ("ip:" + address, self.address_rule)

    def _forget(self, now: float) -> None:
        counts = self._counts
        while counts:
            key, count = next(iter(counts.items()))
            if now - count.last < self.window:
                break
            del counts[key]
