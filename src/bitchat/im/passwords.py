"""Password hashing (argon2id) and login tokens.

Hashing is deliberately slow and takes memory (19 MiB a hash at the production
cost), so it runs off the event loop on a small pool of threads of its own
(:class:`Passwords`): as many hashes at once as there are cores
(``password_hash_concurrency``); the rest wait their turn, so a storm of logins
costs time, not a hash's memory on each thread of a large pool.

When the pool goes idle it hands that memory back to the system. glibc's
allocator keeps it otherwise: a hash's block lands on top of its thread's
arena, which ``malloc_trim`` (:func:`bitchat.admission.release_memory`) does not
shrink, and the dynamic mmap threshold keeps later blocks there too. So each
pool thread trims its own arena (the trim threshold is lowered for one free),
then ``malloc_trim`` does the rest. While a burst lasts, the blocks are reused
as they are (a fresh mapping per hash would cost half a hash again in page
faults).

The cost comes from :class:`~bitchat.Settings` (``password_hash_time_cost``,
``password_hash_memory_kib``); a stored hash carries its own parameters, so
verifying an old hash works whatever the current cost is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import functools
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from bitchat.admission import release_memory

if TYPE_CHECKING:
    from bitchat.settings import Settings

T = TypeVar("T")

log = logging.getLogger("bitchat.im")


@functools.lru_cache(maxsize=8)
def make_hasher(time_cost: int = 2, memory_kib: int = 19 * 1024) -> PasswordHasher:
    """An argon2id hasher; the defaults are OWASP's baseline (19 MiB, 2 passes, 1 lane)."""
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)


def hasher_for(settings: Settings) -> PasswordHasher:
    return make_hasher(settings.password_hash_time_cost, settings.password_hash_memory_kib)


def _verify(hasher: PasswordHasher, stored: str, password: str) -> bool:
    try:
        return hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has ``mallopt``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


_M_TRIM_THRESHOLD = -1
_trimming = threading.Lock()  # the threshold is the process's: one thread at a time


def _trim_own_arena(keep: int) -> None:
    """Hand the free top of the calling thread's malloc arena back to the system.

    glibc trims a thread's arena only when a free of 64 KiB or more finds its top
    above the trim threshold: the threshold is 0 for one such free, then
    ``keep`` (what glibc's dynamic threshold would be: twice a hash's block).
    """
    libc = _libc()
    if libc is None:
        return
    with _trimming:
        libc.mallopt(_M_TRIM_THRESHOLD, 0)
        try:
            libc.free(libc.malloc(256 * 1024))
        finally:
            libc.mallopt(_M_TRIM_THRESHOLD, keep)


class Passwords:
    """Hashes and checks passwords on a pool of ``concurrency`` threads (0: one per
    core), and gives the memory back once no hash is running."""

    def __init__(self, hasher: PasswordHasher | None = None, concurrency: int = 0) -> None:
        self.hasher = hasher or make_hasher()
        self.concurrency = concurrency or os.cpu_count() or 1
        self._keep = 2 * (self.hasher.memory_cost + 1024) * 1024
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._barrier: threading.Barrier | None = None
        self._busy = 0
        self.trims = 0
        """Times the pool went idle and handed memory back (for tests)."""

    @classmethod
    def for_settings(cls, settings: Settings) -> Passwords:
        return cls(hasher_for(settings), settings.password_hash_concurrency)

    async def hash(self, password: str) -> str:
        return await self._run(self.hasher.hash, password)

    async def verify(self, stored: str, password: str) -> bool:
        return await self._run(_verify, self.hasher, stored, password)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        pool = self._pool
        if pool is None:
            pool = self._pool = concurrent.futures.ThreadPoolExecutor(
                self.concurrency, thread_name_prefix="bitchat-hash"
            )
            # Start every thread now (each waits for the others), so that each one
            # can be reached when trimming.
            self._on_every_thread(pool, None)
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        finally:
            self._busy -= 1
            if self._busy == 0 and self._pool is pool:
                # The end of a burst: each thread trims its arena, then malloc_trim
                # (a fraction of a millisecond on the pool, next to a hash's tens).
                self.trims += 1
                self._on_every_thread(pool, self._keep)
                pool.submit(release_memory)

    def _on_every_thread(
        self, pool: concurrent.futures.ThreadPoolExecutor, keep: int | None
    ) -> None:
        """Run one job on each thread of ``pool`` (they meet at a barrier, so no thread
        takes two); with ``keep``, each trims its arena."""
        barrier = self._barrier = threading.Barrier(self.concurrency, timeout=2.0)

        def job() -> None:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:  # a thread stayed busy: trim next time
                return
            if keep is not None:
                _trim_own_arena(keep)

        for _ in range(self.concurrency):
            pool.submit(job)

    def close(self) -> None:
        """Stop the threads (a hash under way finishes; its caller is gone)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if self._barrier is not None:
            self._barrier.abort()  # no thread waits for a job that was cancelled


_default: Passwords | None = None


def _shared() -> Passwords:
    global _default
    if _default is None:
        _default = Passwords()
    return _default


async def hash_password(password: str) -> str:
    """Hash at the production cost, on a pool of the process (for tools that have
    no server's :class:`Passwords`)."""
    return await _shared().hash(password)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What is stored of a token: a leaked table does not log anyone in."""
    return hashlib.sha256(token.encode()).hexdigest()
