"""What a server lets in and keeps: connection slots and the budget for unsent bytes.

Both are plain bookkeeping, without asyncio, so their rules are tested directly:

- :class:`ConnectionSlots` caps the connections open at once, in total and per
  remote address. At the total cap a newcomer may take the slot of the oldest
  connection that has not logged in (a slow-loris peer holds slots only until
  then); one address at its own cap is refused.
- :class:`WriteBudget` adds up what every connection has written and the peer has
  not yet read. Over the budget, the connections holding the most are named for
  shedding until a quarter of it is free: a slow consumer loses its connection,
  not its messages (they wait in the store for its next sync), and one reader
  that reads nothing cannot take the server's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")


class ConnectionSlots(Generic[K]):
    """Open connections by remote address, with a total and a per-address cap."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.count = 0
        self.by_address: dict[str, int] = {}

    def acquire(self, address: str, evict: Callable[[], bool] | None = None) -> str | None:
        """Take a slot for ``address``; None if taken, else why it is refused.

        ``evict`` is asked to drop a connection to make room at the total cap; it
        returns True when it dropped one (whose slot is then released by its close).
        """
        n = self.by_address.get(address, 0)
        if n >= self.per_address:
            return f"{n} connections from {address} already (max_connections_per_address)"
        if self.count >= self.total and (evict is None or not evict()):
            return f"{self.count} connections open already (max_connections)"
        self.by_address[address] = n + 1
        self.count += 1
        return None

    def release(self, address: str) -> None:
        n = self.by_address.get(address, 0)
        if n <= 1:
            self.by_address.pop(address, None)
        else:
            self.by_address[address] = n - 1
        if n:
            self.count -= 1


class WriteBudget(Generic[K]):
    """Unsent bytes per connection (keys are the connections' links) and in total."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        """0: no budget."""
        self.total = 0
        self.sizes: dict[K, int] = {}

    def update(self, key: K, size: int) -> bool:
        """Record ``key``'s unsent bytes now; True if the total is over the budget."""
        old = self.sizes.pop(key, 0)
        if size:
            self.sizes[key] = size
        self.total += size - old
        return 0 < self.limit < self.total

    def remove(self, key: K) -> None:
        self.total -= self.sizes.pop(key, 0)

    def over(self) -> list[K]:
        """The connections to shed, most unsent first, until a quarter of the budget
        is free again (empty while within it)."""
        if not 0 < self.limit < self.total:
            return []
        goal = self.limit * 3 // 4
        left = self.total
        shed: list[K] = []
        for key, size in sorted(self.sizes.items(), key=lambda kv: kv[1], reverse=True):
            if left <= goal:
                break
            shed.append(key)
            left -= size
        return shed


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_memory() -> bool:
    """Hand freed heap memory back to the operating system (glibc's ``malloc_trim``).

    After a burst (connections shed with megabytes unsent, a storm of password
    hashes) the allocator keeps the freed pages for reuse; the process would keep
    its peak size for good. False where the C library has no such call.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
