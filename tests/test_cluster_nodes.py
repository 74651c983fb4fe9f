"""Cluster nodes in this process, on real Redis and PostgreSQL: cross-node delivery,
the cluster-wide online list and presence, the router, and surviving Redis or
PostgreSQL outages (our own redis-server; a TCP proxy in front of PostgreSQL).

The multi-process scenarios (kill -9, fail-over, restart) are in
``test_cluster_processes.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from bitchat import RequestError, Server, codes
from bitchat.cluster.connections import RedisConnectionCenter
from bitchat.cluster.discovery import router_resolver, where_to
from bitchat.cluster.registry import Keys, NodeIdInUse, NodeInfo, live_nodes
from bitchat.cluster.router import Router, build_router
from bitchat.im.client import IMClient
from bitchat.im.packets import Presence, TypingEvent
from cluster_support import (  # noqa: F401 (fixtures)
    REDIS_URL,
    WAIT,
    Inbox,
    RedisServer,
    TcpProxy,
    cluster_settings,
    eventually,
    node_maker,
    own_redis_fixture,
    pg_dsn_fixture,
    pg_host_port,
    proxied_dsn,
    redis_prefix_fixture,
    terminate_backends,
)

MakeNode = Callable[..., Awaitable[Server]]
MakeClient = Callable[..., Awaitable[IMClient]]


@pytest.fixture
async def make_node(redis_prefix: str, pg_dsn: str) -> AsyncIterator[MakeNode]:
    async with node_maker(redis_prefix, pg_dsn) as make:
        yield make


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[IMClient] = []

    async def make(server: Server, name: str, password: str = "pw") -> IMClient:
        im = IMClient("127.0.0.1", server.address[1], cluster_settings())
        clients.append(im)
        await im.connect(WAIT)
        await im.login(name, password)
        return im

    yield make
    for im in clients:
        await im.close()


def center(server: Server) -> RedisConnectionCenter:
    c = server.data["cluster"]
    assert isinstance(c, RedisConnectionCenter)
    return c


async def online_names(im: IMClient) -> list[str]:
    return sorted(u.name for u in await im.online_users())


async def test_cross_node_p2p_group_and_devices(
    make_node: MakeNode, make_client: MakeClient
) -> None:
    n1, n2 = await make_node(1), await make_node(2)
    alice = await make_client(n1, "alice")
    bob = await make_client(n2, "bob")
    bob_phone = await make_client(n1, "bob")  # bob on both nodes
    alice_phone = await make_client(n2, "alice")
    inbox = {c: Inbox(c) for c in (alice, bob, bob_phone, alice_phone)}
    assert alice.user is not None and bob.user is not None

    ack = await alice.send_p2p(bob.user.id, "hi bob")
    got = await inbox[bob].wait("hi bob")  # node 2, forwarded
    await inbox[bob_phone].wait("hi bob")  # node 1, pushed locally
    await inbox[alice_phone].wait("hi bob")  # the sender's other device, on node 2
    assert got.msg_id == ack.msg_id and got.sender_name == "alice"

    await bob.send_p2p(alice.user.id, "hi alice")
    await inbox[alice].wait("hi alice")

    carol = await make_client(n2, "carol")
    inbox[carol] = Inbox(carol)
    g = await alice.create_group("team")
    await bob.join_group(g.group_id)
    await carol.join_group(g.group_id)
    await carol.send_group(g.group_id, "hello team")
    for c in (alice, bob, bob_phone, alice_phone):
        await inbox[c].wait("hello team")
    # Message ids carry the node id of the node that issued them.
    assert (inbox[alice].got[-1].msg_id >> 12) & 1023 == 2
    members = await alice.group_members(g.group_id)
    assert all(m["online"] for m in members) and len(members) == 3
    assert center(n1).forwarded >= 1 and center(n2).received >= 1


async def test_online_list_is_cluster_wide(make_node: MakeNode, make_client: MakeClient) -> None:
    n1, n2 = await make_node(1), await make_node(2)
    alice = await make_client(n1, "alice")
    bob = await make_client(n2, "bob")
    assert await online_names(alice) == ["alice", "bob"]
    assert await online_names(bob) == ["alice", "bob"]
    bob2 = await make_client(n1, "bob")
    assert await center(n1).locate([bob.user.id]) == {2: {bob.user.id}}  # type: ignore[union-attr]
    await bob.logout()
    assert await online_names(alice) == ["alice", "bob"]  # still on node 1
    await bob2.close()  # a disconnect: detached when the server sees it close
    await eventually(lambda: _names_are(alice, ["alice"]), WAIT, "bob going offline")
    assert not await center(n2).is_online(bob.user.id if bob.user else 0)


async def _names_are(im: IMClient, names: list[str]) -> bool:
    return await online_names(im) == names


async def test_presence_crosses_nodes(make_node: MakeNode, make_client: MakeClient) -> None:
    n1, n2 = await make_node(1), await make_node(2)
    alice = await make_client(n1, "alice")
    seen: asyncio.Queue[Presence] = asyncio.Queue()
    alice.on_presence(seen.put_nowait)
    await alice.online_users(watch=True)
    bob = await make_client(n2, "bob")
    p = await asyncio.wait_for(seen.get(), WAIT)
    assert (p.name, p.online) == ("bob", True)
    await bob.logout()
    p = await asyncio.wait_for(seen.get(), WAIT)
    assert (p.name, p.online) == ("bob", False)


async def test_a_duplicate_node_id_is_refused(make_node: MakeNode) -> None:
    await make_node(3)
    with pytest.raises(NodeIdInUse, match="node id 3 is already used by a live node"):
        await make_node(3)


async def test_router_and_resolver(make_node: MakeNode, redis_prefix: str) -> None:
    settings = cluster_settings(redis_prefix=redis_prefix)
    router = build_router("127.0.0.1", 0, settings, redis_url=REDIS_URL)
    async with router:
        host, port = router.address
        with pytest.raises(RequestError) as err:
            await where_to(host, port, settings)
        assert err.value.code == codes.NO_SERVER
        n1 = await make_node(1)
        n2 = await make_node(2)
        answer = await where_to(host, port, settings)
        assert (answer.host, answer.port) in {
            ("127.0.0.1", n1.address[1]),
            ("127.0.0.1", n2.address[1]),
        }
        # A burst of clients is spread although the published loads lag behind.
        picks = [(await where_to(host, port, settings)).node_id for _ in range(4)]
        assert sorted(picks) in ([1, 1, 2, 2], [1, 2, 2, 2], [1, 1, 1, 2])
        # avoid is honoured while another node is alive.
        assert (await where_to(host, port, settings, avoid=[1])).node_id == 2
        resolve = router_resolver(host, port, settings)
        first = await resolve()
        second = await resolve()  # asked again at once: the first one failed us
        assert first != second
        im = IMClient(settings=settings, resolve=router_resolver(host, port, settings))
        await im.connect(WAIT)
        try:
            await im.login("alice", "pw")
            assert im.client.port in (n1.address[1], n2.address[1])
        finally:
            await im.close()


async def test_a_stopping_node_leaves_the_registry_before_it_drains(
    make_node: MakeNode, make_client: MakeClient, redis_prefix: str
) -> None:
    n1 = await make_node(1)
    await make_client(n1, "alice")
    keys = Keys(redis_prefix)
    redis = center(n1).redis
    seen: list[tuple[list[int], int]] = []

    async def while_stopping(server: Server) -> None:
        # Runs after the node's own stopping hook, before connections are closed.
        seen.append(([n.node_id for n in await live_nodes(redis, keys)], len(server.sessions)))

    n1.on_stopping.append(while_stopping)
    await n1.stop()
    assert seen == [([], 1)]  # out of the registry while alice is still connected


async def test_ids_of_dead_nodes_are_pruned_by_the_live_ones(
    make_node: MakeNode, redis_prefix: str
) -> None:
    """An id in the nodes set whose node key expired (a node killed with kill -9)
    is dropped by a node starting, by every heartbeat and by a node stopping."""
    redis = aioredis.Redis.from_url(REDIS_URL)
    nodes = Keys(redis_prefix).nodes
    try:
        await redis.sadd(nodes, "76")
        n1 = await make_node(1)
        assert set(await redis.smembers(nodes)) == {b"1"}  # the claim pruned it
        await redis.sadd(nodes, "77")
        # No router reads the registry here: node 1's heartbeat prunes it.
        await eventually(
            lambda: _members_are(redis, nodes, {b"1"}), WAIT, "the dead id being pruned"
        )
        await redis.sadd(nodes, "78")
        await n1.stop()
        assert set(await redis.smembers(nodes)) == set()  # nothing left behind
    finally:
        await redis.aclose()


async def _members_are(redis: Any, key: str, expected: set[bytes]) -> bool:
    return set(await redis.smembers(key)) == expected


def test_router_policies() -> None:
    def node(i: int, conns: int, beat: int = 1) -> NodeInfo:
        return NodeInfo(i, "h", 8000 + i, conns, 0, True, beat)

    r = Router(REDIS_URL, cluster_settings())
    nodes = [node(1, 5), node(2, 3), node(3, 4)]
    assert [r.choose(nodes).node_id for _ in range(4)] == [2, 2, 3, 1]
    # A fresh heartbeat replaces the router's own count.
    assert r.choose([node(1, 5, 2), node(2, 0, 2), node(3, 4, 2)]).node_id == 2
    assert r.choose(nodes, avoid=[2, 3]).node_id == 1
    assert r.choose([node(1, 0)], avoid=[1]).node_id == 1  # nothing else alive
    with pytest.raises(RequestError) as err:
        r.choose([])
    assert err.value.code == codes.NO_SERVER

    rr = Router(REDIS_URL, cluster_settings(router_policy="round_robin"))
    assert [rr.choose(nodes).node_id for _ in range(5)] == [1, 2, 3, 1, 2]
    with pytest.raises(Exception, match="unknown router policy"):
        Router(REDIS_URL, cluster_settings(router_policy="random"))


async def test_nodes_survive_a_redis_restart(
    make_node: MakeNode, make_client: MakeClient, own_redis: RedisServer
) -> None:
    n1 = await make_node(1, redis_url=own_redis.url)
    n2 = await make_node(2, redis_url=own_redis.url)
    alice = await make_client(n1, "alice")
    bob = await make_client(n2, "bob")
    inbox = Inbox(bob)
    assert bob.user is not None
    await alice.send_p2p(bob.user.id, "before")
    await inbox.wait("before")

    own_redis.stop()
    await center(n1).health.wait(False, WAIT)
    await center(n2).health.wait(False, WAIT)
    # Work that needs Redis is refused with a clear Error, nothing half-done.
    with pytest.raises(RequestError) as err:
        await alice.online_users()
    assert err.value.code == codes.UNAVAILABLE
    carol = IMClient("127.0.0.1", n1.address[1], cluster_settings())
    await carol.connect(WAIT)
    try:
        with pytest.raises(RequestError) as err:
            await carol.login("carol", "pw")
        assert err.value.code == codes.UNAVAILABLE
    finally:
        await carol.close()
    # A message is still stored (PostgreSQL is up): acked, and not lost.
    ack = await alice.send_p2p(bob.user.id, "during")
    assert ack.msg_id

    await own_redis.start()  # an empty Redis: every registration must be made again
    await center(n1).health.wait(True, WAIT)
    await center(n2).health.wait(True, WAIT)
    got = await inbox.wait("during")
    assert got.msg_id == ack.msg_id
    await eventually(lambda: _names_are(alice, ["alice", "bob"]), WAIT, "online list back")
    carol = await make_client(n1, "carol")
    await carol.send_p2p(bob.user.id, "after")
    await inbox.wait("after")


async def test_a_node_survives_postgres_outages(
    make_node: MakeNode, make_client: MakeClient, pg_dsn: str
) -> None:
    proxy = TcpProxy(*pg_host_port(pg_dsn))
    await proxy.start()
    try:
        n1 = await make_node(1, dsn=proxied_dsn(pg_dsn, proxy.port))
        n2 = await make_node(2)
        alice = await make_client(n1, "alice")
        bob = await make_client(n2, "bob")
        inbox = Inbox(bob)
        assert bob.user is not None

        # Connections cut by the server: retried on fresh ones, no error seen.
        assert await terminate_backends(pg_dsn, "bitchat-node-1") >= 1
        await alice.send_p2p(bob.user.id, "after terminate")
        await inbox.wait("after terminate")

        # PostgreSQL unreachable: sends and logins fail with ``unavailable``.
        await proxy.cut()
        with pytest.raises(RequestError) as err:
            await alice.send_p2p(bob.user.id, "refused", retries=0)
        assert err.value.code == codes.UNAVAILABLE
        other = IMClient("127.0.0.1", n1.address[1], cluster_settings())
        await other.connect(WAIT)
        try:
            with pytest.raises(RequestError) as err:
                await other.login("dave", "pw")
            assert err.value.code == codes.UNAVAILABLE
        finally:
            await other.close()
        db = n1.data["im"].users.db
        assert not db.health.up

        await proxy.restore()
        await db.health.wait(True, WAIT)
        await alice.send_p2p(bob.user.id, "back")
        await inbox.wait("back")
        assert "refused" not in [m.text for m in inbox.got]
    finally:
        await proxy.close()


async def test_typing_crosses_nodes(make_node: MakeNode, make_client: MakeClient) -> None:
    n1, n2 = await make_node(1), await make_node(2)
    alice = await make_client(n1, "alice")
    bob = await make_client(n2, "bob")
    carol = await make_client(n2, "carol")
    assert alice.user is not None and bob.user is not None
    seen: dict[IMClient, asyncio.Queue[TypingEvent]] = {}
    for im in (alice, bob, carol):
        seen[im] = asyncio.Queue()
        im.on_typing(seen[im].put_nowait)

    await alice.typing(to=bob.user.id)  # node 1 -> node 2
    e = await asyncio.wait_for(seen[bob].get(), WAIT)
    assert (e.user_id, e.name, e.to, e.typing) == (alice.user.id, "alice", bob.user.id, True)
    assert e.expires_in == n1.settings.typing_timeout

    g = await alice.create_group("team")
    await bob.join_group(g.group_id)
    await carol.join_group(g.group_id)
    await bob.typing(group_id=g.group_id)  # node 2 -> node 1, and to carol on node 2
    for im in (alice, carol):
        e = await asyncio.wait_for(seen[im].get(), WAIT)
        assert (e.user_id, e.group_id, e.typing) == (bob.user.id, g.group_id, True)
    await bob.close()  # the stop of a disconnect crosses too
    e = await asyncio.wait_for(seen[alice].get(), WAIT)
    assert (e.user_id, e.group_id, e.typing) == (bob.user.id, g.group_id, False)


async def test_a_burst_of_logouts_waits_for_redis_connections(
    make_node: MakeNode, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """More commands at once than the Redis pool holds (here 3 connections, 24
    users leaving together, each detach asks Redis): they wait for a connection
    instead of failing, so the node never takes Redis for down."""
    node = await make_node(1, redis_max_connections=3)
    assert center(node).redis.connection_pool.max_connections == 3
    watcher = await make_client(node, "watcher")
    leaving = await asyncio.gather(*(make_client(node, f"user{i}") for i in range(24)))
    assert len(await online_names(watcher)) == 25
    await asyncio.gather(*(im.close() for im in leaving))
    await eventually(lambda: _names_are(watcher, ["watcher"]), WAIT, "the 24 going offline")
    assert "Redis is unavailable" not in caplog.text
    assert "failed" not in caplog.text
