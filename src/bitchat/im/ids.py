"""Message ids: 64-bit, time-ordered, with the node id inside (snowflake-style).

Layout: 41 bits of milliseconds since 2025-01-01 UTC, 10 bits of node id,
12 bits of sequence. A node issues at most 4096 ids per millisecond; beyond
that, and when the clock steps back, it borrows from the next millisecond so
ids never repeat and never go down.
"""

from __future__ import annotations

import time

EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
NODE_BITS = 10
SEQ_BITS = 12
MAX_NODE = (1 << NODE_BITS) - 1
_SEQ_MASK = (1 << SEQ_BITS) - 1


class IdGenerator:
    def __init__(self, node_id: int = 0, last_id: int = 0) -> None:
        if not 0 <= node_id <= MAX_NODE:
            raise ValueError(f"node id must be 0..{MAX_NODE}, got {node_id}")
        self.node_id = node_id
        self._node = node_id << SEQ_BITS
        self._ms = last_id >> (NODE_BITS + SEQ_BITS)
        self._seq = last_id & _SEQ_MASK

    def next(self, now_ms: int | None = None) -> int:
        """The next id; ``now_ms`` is the current Unix time in ms if the caller has it."""
        ms = (int(time.time() * 1000) if now_ms is None else now_ms) - EPOCH_MS
        if ms > self._ms:
            self._ms = ms
            self._seq = 0
        else:
            self._seq += 1
            if self._seq > _SEQ_MASK:
                self._ms += 1
                self._seq = 0
        return (self._ms << (NODE_BITS + SEQ_BITS)) | self._node | self._seq


def timestamp_ms(msg_id: int) -> int:
    """The Unix time in milliseconds an id was issued at."""
    return (msg_id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS


def node_of(msg_id: int) -> int:
    return (msg_id >> SEQ_BITS) & MAX_NODE


def id_at(unix_ms: int) -> int:
    """The smallest id of that millisecond: where something that is not a message (a
    group join) sorts among messages."""
    return max(0, unix_ms - EPOCH_MS) << (NODE_BITS + SEQ_BITS)
