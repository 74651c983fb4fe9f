"""The cluster as it runs: ``bitchat server --cluster`` and ``bitchat router`` processes
on real Redis and PostgreSQL, clients over TCP, nodes killed with ``kill -9``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bitchat import RequestError, codes
from bitchat.cluster.discovery import router_resolver, where_to
from bitchat.cluster.registry import Keys, live_nodes
from bitchat.im.client import IMClient
from cluster_support import (  # noqa: F401 (fixtures)
    NODE_TTL,
    REDIS_URL,
    WAIT,
    Inbox,
    ProcessCluster,
    cluster_settings,
    eventually,
    pg_dsn_fixture,
    redis_prefix_fixture,
)


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


async def node_ids(prefix: str) -> list[int]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        return [n.node_id for n in await live_nodes(client, Keys(prefix)) if n.ready]
    finally:
        await client.aclose()


async def test_cross_node_chat_and_online_list(
    cluster: ProcessCluster, clients: list[IMClient]
) -> None:
    await asyncio.gather(cluster.node(1), cluster.node(2), cluster.node(3))
    alice = await connect(clients, "alice", port=cluster.port_of(1))
    bob = await connect(clients, "bob", port=cluster.port_of(2))
    carol = await connect(clients, "carol", port=cluster.port_of(3))
    boxes = {im: Inbox(im) for im in (alice, bob, carol)}
    assert alice.user and bob.user and carol.user

    for im in (alice, bob, carol):
        assert sorted(u.name for u in await im.online_users()) == ["alice", "bob", "carol"]

    await alice.send_p2p(bob.user.id, "alice to bob")
    await boxes[bob].wait("alice to bob")
    await carol.send_p2p(alice.user.id, "carol to alice")
    await boxes[alice].wait("carol to alice")

    g = await bob.create_group("all")
    await alice.join_group(g.group_id)
    await carol.join_group(g.group_id)
    await alice.send_group(g.group_id, "to everyone")
    for im in (bob, carol):
        await boxes[im].wait("to everyone")
    page = await carol.history(group_id=g.group_id)
    assert [m["text"] for m in page.messages] == ["to everyone"]

    await bob.logout()
    assert sorted(u.name for u in await carol.online_users()) == ["alice", "carol"]


async def test_kill9_router_clients_fail_over(
    cluster: ProcessCluster,
    redis_prefix: str,
    clients: list[IMClient],
) -> None:
    await asyncio.gather(cluster.node(1), cluster.node(2))
    _, router = await cluster.router()
    # Least connections spreads the router's clients over both nodes.
    alice = await connect(clients, "alice", router=router)
    bob = await connect(clients, "bob", router=router)
    assert {alice.client.port, bob.client.port} == {cluster.port_of(1), cluster.port_of(2)}
    assert alice.user and bob.user
    victim = 1 if alice.client.port == cluster.port_of(1) else 2
    survivor = 3 - victim
    inbox = Inbox(alice)
    reconnected = asyncio.Event()
    alice.client.on_connected.append(lambda _c: _set(reconnected))

    cluster.nodes[victim][0].kill9()
    # Bob keeps talking while alice's node is dead and she moves.
    acks = [await bob.send_p2p(alice.user.id, f"meanwhile {i}") for i in range(3)]
    await asyncio.wait_for(reconnected.wait(), WAIT)
    assert alice.client.port == cluster.port_of(survivor)
    for i in range(3):
        got = await inbox.wait(f"meanwhile {i}")
        assert got.msg_id == acks[i].msg_id
    # The dead node and its users drop out within the TTL.
    await eventually(
        lambda: _equals(node_ids(redis_prefix), [survivor]),
        NODE_TTL + WAIT,
        "the killed node dropping out of the registry",
    )
    names = sorted(u.name for u in await bob.online_users())
    assert names == ["alice", "bob"]
    bob_inbox = Inbox(bob)
    await alice.send_p2p(bob.user.id, "still here")
    await bob_inbox.wait("still here")


async def _set(event: asyncio.Event) -> None:
    event.set()


async def _equals(aw: object, expected: object) -> bool:
    return await aw == expected  # type: ignore[misc]


async def test_message_to_a_user_on_a_dead_node_comes_at_next_login(
    cluster: ProcessCluster, clients: list[IMClient]
) -> None:
    await asyncio.gather(cluster.node(1), cluster.node(2))
    alice = await connect(clients, "alice", port=cluster.port_of(1))
    bob = await connect(clients, "bob", port=cluster.port_of(2), reconnect=False)
    assert alice.user and bob.user
    cluster.nodes[2][0].kill9()
    # Bob's entries still look alive until the TTL: the forward is lost in transit.
    ack = await alice.send_p2p(bob.user.id, "while you were gone")
    assert not ack.duplicate
    await bob.close()
    again = IMClient("127.0.0.1", cluster.port_of(1), cluster_settings())
    clients.append(again)
    inbox = Inbox(again)  # before the login: its sync may come in the LoginOk's read
    await again.connect(WAIT)
    await again.login("bob", "pw")
    got = await inbox.wait("while you were gone")
    assert got.msg_id == ack.msg_id


async def test_a_restarted_node_rejoins(
    cluster: ProcessCluster,
    redis_prefix: str,
    clients: list[IMClient],
) -> None:
    await asyncio.gather(cluster.node(1), cluster.node(2))
    _, router = await cluster.router()
    alice = await connect(clients, "alice", port=cluster.port_of(1))
    assert alice.user
    port2 = cluster.port_of(2)
    cluster.nodes[2][0].kill9()
    # Same id, same port: it waits for the dead instance's registration to expire.
    restarted = await cluster.node(2, port2, wait=False)
    await restarted.wait_line(restarted.expect("node 2 announced at"), NODE_TTL + WAIT)
    assert "waiting up to" in restarted.output
    assert await node_ids(redis_prefix) == [1, 2]
    bob = await connect(clients, "bob", router=router)  # the emptier node: the new one
    assert bob.client.port == port2 and bob.user
    answer = await where_to("127.0.0.1", router, cluster_settings(), avoid=[1])
    assert (answer.node_id, answer.port) == (2, port2)
    bob_inbox = Inbox(bob)
    await alice.send_p2p(bob.user.id, "welcome back")
    await bob_inbox.wait("welcome back")
    # Its message ids go on from where the dead instance left off.
    ack = await bob.send_p2p(alice.user.id, "thanks")
    assert (ack.msg_id >> 12) & 1023 == 2


async def test_router_without_a_live_node(cluster: ProcessCluster) -> None:
    _, router = await cluster.router()
    settings = cluster_settings()
    with pytest.raises(RequestError) as err:
        await where_to("127.0.0.1", router, settings)
    assert err.value.code == codes.NO_SERVER
    assert "no bitchat server is alive" in err.value.message
    # A client keeps asking (with backoff) and does not connect anywhere meanwhile.
    im = IMClient(settings=settings, resolve=router_resolver("127.0.0.1", router, settings))
    with pytest.raises(TimeoutError):
        await im.connect(0.5)
    await im.close()
    # Once a node is up, the same resolver finds it.
    node = await cluster.node(1)
    assert node.proc is not None
    im = IMClient(settings=settings, resolve=router_resolver("127.0.0.1", router, settings))
    await im.connect(WAIT)
    assert im.client.port == cluster.port_of(1)
    await im.close()


async def test_a_duplicate_node_id_is_refused(cluster: ProcessCluster) -> None:
    await cluster.node(1)
    twin = await cluster.node(1, wait=False)
    rc = await twin.wait_exit(NODE_TTL + WAIT)
    assert rc == 1
    assert "node id 1 is already used by a live node" in twin.output
    assert "give every node its own --node-id" in twin.output
