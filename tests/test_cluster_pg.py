"""The PostgreSQL centers on a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from bitchat import RequestError, ServiceUnavailable, codes
from bitchat.cluster.pg import MIGRATIONS, PgDatabase, PgMessageCenter, PgUserCenter
from bitchat.im.centers import Message, conversation
from bitchat.im.ids import IdGenerator, node_of
from bitchat.im.passwords import hasher_for
from cluster_support import (
    WAIT,
    TcpProxy,
    cluster_settings,
    pg_dsn_fixture,  # noqa: F401 (fixtures)
    pg_host_port,
    proxied_dsn,
    terminate_backends,
)


def _db(dsn: str, name: str = "bitchat-test") -> PgDatabase:
    return PgDatabase(dsn, cluster_settings(), application_name=name)


@pytest.fixture
async def centers(pg_dsn: str):
    db = _db(pg_dsn)
    users = PgUserCenter(db, hasher_for(cluster_settings()))
    messages = PgMessageCenter(db, batch_max=64)
    await users.start()
    await messages.start()
    yield users, messages
    await messages.close()
    await users.close()


def _msg(
    ids: IdGenerator, sender: int, to: int, text: str, cid: str = "", kind: str = "p2p"
) -> Message:
    return Message(ids.next(), kind, sender, f"user{sender}", to, text, 1, cid)


async def test_migrations_run_once_when_nodes_start_together(pg_dsn: str) -> None:
    dbs = [_db(pg_dsn, f"node-{i}") for i in range(3)]
    await asyncio.gather(*(db.open() for db in dbs))
    try:
        async with dbs[0].connection() as con:
            assert await con.fetchval("SELECT version FROM schema_version") == len(MIGRATIONS)
            assert await con.fetchval("SELECT count(*) FROM schema_version") == 1
    finally:
        for db in dbs:
            await db.close()
    # Opening again (a restarted node) finds the schema current.
    again = _db(pg_dsn)
    await again.open()
    await again.close()


async def test_users_tokens_and_groups(centers) -> None:
    users, _ = centers
    alice = await users.register("alice", "secret")
    with pytest.raises(RequestError) as err:
        await users.register("alice", "other")
    assert err.value.code == codes.NAME_TAKEN
    assert await users.authenticate("alice", "secret", False) == alice
    with pytest.raises(RequestError) as err:
        await users.authenticate("alice", "wrong", True)
    assert err.value.code == codes.LOGIN_FAILED
    with pytest.raises(RequestError):
        await users.authenticate("nobody", "x", False)
    bob = await users.authenticate("bob", "pw", True)  # auto-registered
    assert bob.id != alice.id and users.known_user(bob.id) == bob

    token = await users.issue_token(alice.id, 60)
    assert await users.check_token(token) == (alice, 0)  # a token without a device
    phone, new = await users.device(alice.id, "phone", 4)
    assert new and await users.device(alice.id, "phone", 4) == (phone, False)
    assert await users.device_name(alice.id, phone) == "phone"
    assert await users.device_name(bob.id, phone) is None  # not bob's
    on_phone = await users.issue_token(alice.id, 60, phone)
    assert await users.check_token(on_phone) == (alice, phone)
    await users.revoke_token(token)
    assert await users.check_token(token) is None
    expired = await users.issue_token(alice.id, -1)
    assert await users.check_token(expired) is None
    assert await users.get_users([alice.id, bob.id, 999]) == {alice.id: alice, bob.id: bob}

    g = await users.create_group(alice.id, "friends")
    assert (g.name, g.owner_id, g.members) == ("friends", alice.id, 1)
    assert (await users.join_group(g.id, bob.id, 2)).members == 2
    assert (await users.join_group(g.id, bob.id, 2)).members == 2  # twice is harmless
    carol = await users.register("carol", "pw")
    with pytest.raises(RequestError) as err:
        await users.join_group(g.id, carol.id, 2)
    assert err.value.code == codes.GROUP_FULL
    with pytest.raises(RequestError) as err:
        await users.join_group(12345, carol.id, 2)
    assert err.value.code == codes.NOT_FOUND
    assert await users.group_members(g.id) == sorted([alice.id, bob.id])
    assert [x.id for x in await users.user_groups(bob.id)] == [g.id]
    await users.leave_group(g.id, bob.id)
    with pytest.raises(RequestError) as err:
        await users.leave_group(g.id, bob.id)
    assert err.value.code == codes.NOT_MEMBER
    assert (await users.get_group(g.id)).members == 1
    assert await users.get_group(999) is None


async def test_member_caches_follow_changes_on_other_nodes(pg_dsn: str) -> None:
    hasher = hasher_for(cluster_settings())
    a = PgUserCenter(_db(pg_dsn, "node-a"), hasher)
    b = PgUserCenter(_db(pg_dsn, "node-b"), hasher)
    await a.start()
    await b.start()
    try:
        owner = await a.register("owner", "pw")
        joiner = await a.register("joiner", "pw")
        g = await a.create_group(owner.id, "g")
        assert a.known_members(g.id) is None  # not read yet
        assert await a.group_members(g.id) == [owner.id]
        assert a.known_members(g.id) == [owner.id]  # cached: group sends skip the database
        assert a.known_members(999) is None and await a.group_members(999) == []
        assert a.known_members(999) is None  # an unknown group is never cached

        heard = a.invalidations.value
        await b.join_group(g.id, joiner.id, 10)  # on the other node
        await a.invalidations.wait(heard + 1, WAIT)  # its NOTIFY, sent at commit
        assert a.known_members(g.id) is None
        assert await a.group_members(g.id) == sorted([owner.id, joiner.id])
        heard = a.invalidations.value
        await b.leave_group(g.id, joiner.id)
        await a.invalidations.wait(heard + 1, WAIT)
        assert await a.group_members(g.id) == [owner.id]
        # This node's own changes apply at once.
        await a.join_group(g.id, joiner.id, 10)
        assert a.known_members(g.id) is None
        assert await a.group_members(g.id) == sorted([owner.id, joiner.id])

        # Without its listening connection a node caches nothing, until it is back.
        losses, listens = a.listener_losses.value, a.listens.value
        assert await terminate_backends(pg_dsn, "node-a") >= 1
        await a.listener_losses.wait(losses + 1, WAIT)
        await a.listens.wait(listens + 1, WAIT)  # listening again, with an empty cache
        assert a.known_members(g.id) is None
        assert await a.group_members(g.id) == sorted([owner.id, joiner.id])
        assert a.known_members(g.id) == sorted([owner.id, joiner.id])
    finally:
        await b.close()
        await a.close()


async def test_concurrent_joins_keep_the_group_size(centers) -> None:
    users, _ = centers
    owner = await users.register("owner", "pw")
    joiners = [await users.register(f"j{i}", "pw") for i in range(6)]
    g = await users.create_group(owner.id, "small")
    results = await asyncio.gather(
        *(users.join_group(g.id, u.id, 4) for u in joiners), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, RequestError)]
    assert len(refused) == 3 and all(r.code == codes.GROUP_FULL for r in refused)
    assert len(await users.group_members(g.id)) == 4


async def test_store_pending_ack_history(centers) -> None:
    users, messages = centers
    alice = await users.register("alice", "pw")
    bob = await users.register("bob", "pw")
    phone, _ = await users.device(bob.id, "phone", 4)
    ids = IdGenerator(7)
    sent = [_msg(ids, alice.id, bob.id, f"m{i}", cid=f"c{i}") for i in range(20)]
    # Stores are plain calls resolved by group commit, in call order.
    results = await asyncio.gather(*(messages.store(m, [bob.id]) for m in sent))
    assert [r[0].id for r in results] == [m.id for m in sent]
    assert [r[0].seq for r in results] == list(range(1, 21))
    assert not any(dup for _, dup in results)
    assert await messages.count_pending(bob.id, phone) == 20
    page = await messages.pending(bob.id, phone, 0, 8)
    assert [m.text for m in page] == [f"m{i}" for i in range(8)]
    rest = await messages.pending(bob.id, phone, page[-1].id, 100)
    assert [m.text for m in rest] == [f"m{i}" for i in range(8, 20)]
    await messages.ack(bob.id, phone, [(conversation("p2p", alice.id, bob.id), 15)])
    assert await messages.count_pending(bob.id, phone) == 5
    hist = await messages.history(bob.id, alice.id, 0, 0, 5)
    assert [m.text for m in hist] == ["m19", "m18", "m17", "m16", "m15"]
    older = await messages.history(alice.id, bob.id, 0, hist[-1].id, 100)
    assert older[0].text == "m14" and len(older) == 15
    assert await messages.last_id(7) == sent[-1].id
    assert await messages.last_id(8) == 0
    assert node_of(await messages.last_id(7)) == 7


async def test_retry_with_same_client_id_is_not_stored_twice(centers) -> None:
    _, messages = centers
    ids = IdGenerator(1)
    first = _msg(ids, 1, 2, "hello", cid="same")
    retry = _msg(ids, 1, 2, "hello", cid="same")
    # Both in one batch, and again in a later one.
    r1, r2 = await asyncio.gather(messages.store(first, [2]), messages.store(retry, [2]))
    assert r1 == (first, False)
    assert r2[1] is True and r2[0].id == first.id
    r3 = await messages.store(_msg(ids, 1, 2, "hello", cid="same"), [2])
    assert r3[1] is True and r3[0].id == first.id
    assert len(await messages.history(1, 2, 0, 0, 10)) == 1
    # The same message again (its first commit reply was lost): stored, not a duplicate.
    again = await messages.store(first, [2])
    assert again == (first, False)
    # Messages without a client id are never deduplicated.
    a = await messages.store(_msg(ids, 1, 2, "x"), [2])
    b = await messages.store(_msg(ids, 1, 2, "x"), [2])
    assert not a[1] and not b[1] and a[0].id != b[0].id


async def test_a_dropped_connection_is_retried(pg_dsn: str) -> None:
    db = _db(pg_dsn, "bitchat-victim")
    users = PgUserCenter(db, hasher_for(cluster_settings()))
    messages = PgMessageCenter(db)
    await users.start()
    await messages.start()
    try:
        alice = await users.register("alice", "pw")
        assert await terminate_backends(pg_dsn, "bitchat-victim") >= 1
        # Reads and batch writes get a fresh connection: no error reaches the caller.
        assert await users.get_user(alice.id) == alice
        assert await users.authenticate("alice", "pw", False) == alice
        assert await terminate_backends(pg_dsn, "bitchat-victim") >= 1
        _, dup = await messages.store(_msg(IdGenerator(1), alice.id, 5, "hi"), [5])
        assert not dup and len(await messages.history(5, alice.id, 0, 0, 10)) == 1
        assert db.health.up
    finally:
        await messages.close()
        await users.close()


async def test_postgres_down_refuses_work_then_recovers(pg_dsn: str) -> None:
    proxy = TcpProxy(*pg_host_port(pg_dsn))
    await proxy.start()
    db = _db(proxied_dsn(pg_dsn, proxy.port))
    users = PgUserCenter(db, hasher_for(cluster_settings()))
    messages = PgMessageCenter(db)
    await users.start()
    await messages.start()
    try:
        alice = await users.register("alice", "pw")
        bob = await users.register("bob", "pw")
        laptop, _ = await users.device(bob.id, "laptop", 4)
        await proxy.cut()
        with pytest.raises(ServiceUnavailable) as err:
            await messages.store(_msg(IdGenerator(1), alice.id, bob.id, "lost?"), [bob.id])
        assert err.value.code == codes.UNAVAILABLE
        assert not db.health.up
        with pytest.raises(ServiceUnavailable):
            await users.check_token("whatever")
        await proxy.restore()
        await db.health.wait(True, WAIT)  # the background probe reconnects
        await messages.store(_msg(IdGenerator(1), alice.id, bob.id, "after"), [bob.id])
        assert [m.text for m in await messages.pending(bob.id, laptop, 0, 10)] == ["after"]
    finally:
        await messages.close()
        await users.close()
        await proxy.close()


async def test_unreachable_at_start_is_a_clear_error() -> None:
    db = PgDatabase("postgresql://postgres@127.0.0.1:1/nothing", cluster_settings())
    with pytest.raises(ServiceUnavailable, match="cannot use PostgreSQL at"):
        await db.open()


async def test_errors_never_leak_driver_exceptions(centers) -> None:
    users, _ = centers

    async def bad(con: asyncpg.Connection) -> None:
        await con.execute("SELECT * FROM no_such_table")

    with pytest.raises(ServiceUnavailable):
        await users.db.run("a broken query", bad)
