"""A node dies under load and every message it acked still reaches the recipients who
stay online on another node, within seconds, without logging in again.

Real processes (two ``bitchat server --cluster`` nodes and a router) on real Redis and
PostgreSQL; the dying node is killed with ``kill -9``. Three ways an acked message
could be stranded, one test each: the ack leaving before the cross-node forward (the
ack waits for the publish), the sender's retry on the surviving node being answered
``duplicate`` (the stored message is pushed again), and a node that stored and acked
but could not forward (the survivors re-sync their users when it leaves the registry).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import msgpack
import pytest
import redis.asyncio as aioredis

from bitchat.cluster.discovery import router_resolver
from bitchat.cluster.registry import Keys
from bitchat.errors import ConnectionClosed, RequestTimeout
from bitchat.im.client import IMClient
from bitchat.im.packets import SendAck
from cluster_support import (  # noqa: F401 (fixtures)
    NODE_TTL,
    REDIS_URL,
    WAIT,
    Inbox,
    ProcessCluster,
    TcpProxy,
    cluster_settings,
    pg_dsn_fixture,
    redis_prefix_fixture,
)

BURST = 300
IN_FLIGHT = 16
KILL_AFTER = 100
"""Acks the sender has before node 1 is killed (the rest of the burst is in flight or
still to come)."""
ARRIVAL = NODE_TTL + 6.0
"""How long an acked message may take to reach its online recipient after the kill:
the dead node drops out of the registry within NODE_TTL and a heartbeat, then the
survivor re-sends; generous for a busy machine, and far from "at the next login"."""


@pytest.fixture
async def cluster(redis_prefix: str, pg_dsn: str) -> AsyncIterator[ProcessCluster]:
    c = ProcessCluster(REDIS_URL, redis_prefix, pg_dsn)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[IMClient]]:
    made: list[IMClient] = []
    yield made
    for im in made:
        await im.close()


async def connect(
    clients: list[IMClient],
    name: str,
    *,
    port: int | None = None,
    router: int | None = None,
    reconnect: bool = True,
) -> IMClient:
    settings = cluster_settings()
    if router is not None:
        im = IMClient(settings=settings, resolve=router_resolver("127.0.0.1", router, settings))
    else:
        assert port is not None
        im = IMClient("127.0.0.1", port, settings, reconnect=reconnect)
    clients.append(im)
    await im.connect(WAIT)
    await im.login(name, "pw")
    return im


async def test_every_acked_message_reaches_the_online_recipient_when_a_node_is_killed(
    cluster: ProcessCluster, clients: list[IMClient]
) -> None:
    await asyncio.gather(cluster.node(1), cluster.node(2))
    _, router = await cluster.router()
    # The recipient stays on node 2 for good: without reconnecting, a message it gets
    # can only come live, never from a login's sync.
    recipient = await connect(clients, "recipient", port=cluster.port_of(2), reconnect=False)
    inbox = Inbox(recipient)
    sender = await connect(clients, "sender", router=router)  # the emptier node: 1
    assert sender.client.port == cluster.port_of(1) and recipient.user is not None
    to = recipient.user.id

    acks: dict[str, SendAck] = {}
    failed: list[str] = []
    enough = asyncio.Event()
    window = asyncio.Semaphore(IN_FLIGHT)

    async def send(i: int) -> None:
        text = f"burst {i}"
        async with window:
            try:
                acks[text] = await sender.send_p2p(to, text, retries=5, timeout=WAIT)
            except (ConnectionClosed, RequestTimeout):
                failed.append(text)  # never acked: it may or may not arrive
        if len(acks) >= KILL_AFTER:
            enough.set()

    started = time.monotonic()
    burst = [asyncio.ensure_future(send(i)) for i in range(BURST)]
    await asyncio.wait_for(enough.wait(), WAIT)
    cluster.nodes[1][0].kill9()
    killed = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*burst), 2 * WAIT)
    assert sender.client.port == cluster.port_of(2)  # moved, and retried there

    assert len(acks) >= KILL_AFTER and len(acks) + len(failed) == BURST
    deadline = killed + ARRIVAL
    for text, ack in sorted(acks.items(), key=lambda kv: kv[1].msg_id):
        got = await inbox.wait(text, max(deadline - time.monotonic(), 0.1))
        assert got.msg_id == ack.msg_id, text
    assert recipient.client.connected  # the same connection all along
    assert len({m.msg_id for m in inbox.got}) == len(inbox.got)  # each shown once
    print(
        f"\n{len(acks)} acked ({sum(a.duplicate for a in acks.values())} as duplicates), "
        f"{len(failed)} not; all arrived {time.monotonic() - killed:.2f}s after the kill "
        f"({killed - started:.2f}s into the burst)"
    )


async def test_the_ack_leaves_after_the_forward_is_published(
    cluster: ProcessCluster, clients: list[IMClient], redis_prefix: str
) -> None:
    await asyncio.gather(cluster.node(1), cluster.node(2))
    recipient = await connect(clients, "recipient", port=cluster.port_of(2))
    sender = await connect(clients, "sender", port=cluster.port_of(1))
    assert recipient.user is not None
    spy = aioredis.Redis.from_url(REDIS_URL)
    pubsub = spy.pubsub()
    try:
        await pubsub.subscribe(Keys(redis_prefix).inbox(2))
        assert (await pubsub.get_message(timeout=WAIT))["type"] == "subscribe"  # type: ignore[index]
        for i in range(20):
            ack = await sender.send_p2p(recipient.user.id, f"ordered {i}")
            # Redis answers the PING after every message it published before it: had
            # node 1 published after the ack, the pong could come first.
            await pubsub.ping()
            forwarded: list[int] = []
            for _ in range(100):
                msg = await pubsub.get_message(timeout=WAIT)
                assert msg is not None, "no pong"
                if msg["type"] == "pong":
                    break
                forwarded += [row[0] for row, _users in msgpack.unpackb(msg["data"])]
            assert ack.msg_id in forwarded, i
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await spy.aclose()


async def test_what_a_node_acked_but_could_not_forward_comes_when_it_leaves(
    cluster: ProcessCluster, clients: list[IMClient]
) -> None:
    parts = urlsplit(REDIS_URL)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.start()
    try:
        proxied = f"redis://127.0.0.1:{proxy.port}{parts.path}"
        await asyncio.gather(cluster.node(1, redis_url=proxied), cluster.node(2))
        recipient = await connect(clients, "recipient", port=cluster.port_of(2), reconnect=False)
        inbox = Inbox(recipient)
        sender = await connect(clients, "sender", port=cluster.port_of(1), reconnect=False)
        assert recipient.user is not None
        await sender.send_p2p(recipient.user.id, "across")
        await inbox.wait("across")

        # Node 1 loses Redis: it still stores (PostgreSQL) and acks, cannot forward.
        await proxy.cut()
        acks = [await sender.send_p2p(recipient.user.id, f"stranded {i}") for i in range(3)]
        cluster.nodes[1][0].kill9()
        # Node 1's registration runs out; node 2 sees it gone and re-sends from the store.
        for i, ack in enumerate(acks):
            got = await inbox.wait(f"stranded {i}", ARRIVAL)
            assert got.msg_id == ack.msg_id
        assert recipient.client.connected
        node2 = cluster.nodes[2][0]
        assert "node(s) 1 left the registry" in node2.output
    finally:
        await proxy.close()
