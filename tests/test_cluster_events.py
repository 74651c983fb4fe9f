"""Events (typing, read states, receipts) across two connection centers on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis

from bitchat.cluster.connections import RedisConnectionCenter
from bitchat.cluster.registry import Keys
from bitchat.im.packets import ReadState, Receipt, TypingEvent
from bitchat.protocol.packets import Packet
from cluster_support import (  # noqa: F401 (fixtures)
    REDIS_URL,
    WAIT,
    cluster_settings,
    redis_prefix_fixture,
)

_next_id = iter(range(1, 1 << 30))


class Seat:
    """What a center needs of a logged-in session: its id, user, and pushes."""

    def __init__(self, user_id: int, session_id: int = 0) -> None:
        self.id = session_id or next(_next_id)
        self.user_id = user_id
        self.closed = False
        self.got: asyncio.Queue[Packet] = asyncio.Queue()

    def push(self, packet: Packet) -> None:
        self.got.put_nowait(packet)

    async def next(self) -> Packet:
        return await asyncio.wait_for(self.got.get(), WAIT)


@pytest.fixture
async def two_centers(redis_prefix: str) -> AsyncIterator[list[RedisConnectionCenter]]:
    settings = cluster_settings(redis_prefix=redis_prefix)
    centers = [RedisConnectionCenter(REDIS_URL, settings, n) for n in (1, 2)]
    for c in centers:
        await c.start()
        await c.wait_subscribed(WAIT)
    yield centers
    for c in centers:
        await c.close()


async def _attach(center: RedisConnectionCenter, seat: Seat) -> Seat:
    await center.attach(seat.user_id, seat)  # type: ignore[arg-type]
    return seat


async def test_events_cross_nodes_and_exclude_only_locally(
    two_centers: list[RedisConnectionCenter], redis_prefix: str
) -> None:
    one, two = two_centers
    here = await _attach(one, Seat(10))
    here_too = await _attach(one, Seat(10))
    # On the other node, a session that happens to have the excluded id: not excluded.
    there = await _attach(two, Seat(10, session_id=here.id))
    other = await _attach(two, Seat(11))

    state = ReadState(peer_id=11, read_seq=4, unread=2)
    one.deliver_event(state, [10], exclude_session=here.id)
    assert here.got.empty()  # local pushes are made at once: none to the excluded one
    assert await here_too.next() == state
    assert await there.next() == state

    receipt = Receipt("read", 10, "ten", 4, group_id=3)
    two.deliver_event(receipt, [10, 11])
    assert await here.next() == receipt
    assert await here_too.next() == receipt
    assert await there.next() == receipt
    # The channel keeps its order: had the read state reached user 11, it came first.
    assert await other.next() == receipt

    # Typing goes the same way.
    typing = TypingEvent(11, "eleven", to=10, typing=True, expires_in=5.0)
    two.deliver_typing(typing, [10])
    assert await here.next() == typing
    assert await here_too.next() == typing

    # From a node that sends typing field by field (before events), and what no
    # node can decode: the first is pushed, the rest dropped.
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        channel = Keys(redis_prefix).typing
        old: list[Any] = [9, 11, "eleven", 10, 0, False, 0.0, [10]]
        await client.publish(channel, msgpack.packb([9, 9999, {}, [10]]))
        await client.publish(channel, msgpack.packb([9, ReadState.TYPE, {"unread": "x"}, [10]]))
        await client.publish(channel, b"\xc1 not msgpack")
        await client.publish(channel, msgpack.packb(old))
    finally:
        await client.aclose()
    assert await here.next() == TypingEvent(11, "eleven", to=10, typing=False)
    assert here.got.empty()
