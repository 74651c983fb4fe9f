"""Last seen (issue 11, item 6): written when a user's last connection anywhere closes
(and at login), shown for offline users in member lists and Presence pushes, hidden
by the user's own switch; the schema change in both stores, upgraded from databases
written by schema version 2."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bitchat import Server
from bitchat.cluster import pg
from bitchat.cluster.pg import PgDatabase, PgMessageCenter, PgUserCenter
from bitchat.im import sqlite as store
from bitchat.im.centers import UserCenter
from bitchat.im.client import IMClient
from bitchat.im.packets import Presence
from bitchat.im.service import IMService
from bitchat.im.sqlite import SqliteMessageCenter, SqliteUserCenter
from cluster_support import (  # noqa: F401 (fixtures)
    REDIS_URL,
    cluster_settings,
    eventually,
    node_maker,
    pg_dsn_fixture,
    redis_prefix_fixture,
)
from conftest import WAIT
from im_helpers import clients_of, im_server
from test_identity_names import HASHER, OLD_MESSAGES, PG_V1, SQLITE_V1, old_password_hash


def im_of(server: Server) -> IMService:
    im = server.data["im"]
    assert isinstance(im, IMService)
    return im


def now_ms() -> int:
    return int(time.time() * 1000)


async def stored(users: UserCenter, user_id: int) -> int | None:
    """The last seen the store holds for the user (as the user themself sees it)."""
    return (await users.last_seen([user_id], user_id)).get(user_id)


async def settled(server: Server, user_id: int, sessions: int) -> None:
    """Wait until the server holds ``sessions`` of the user and its logouts are done."""
    im = im_of(server)

    async def there() -> bool:
        return len(im.connections.local_sessions(user_id)) == sessions

    await eventually(there, WAIT, f"{sessions} sessions of user {user_id}")
    if im._tasks:
        await asyncio.wait(list(im._tasks), timeout=WAIT)


async def offline_presence(seen: asyncio.Queue[Presence], user_id: int) -> Presence:
    while True:
        p = await asyncio.wait_for(seen.get(), WAIT)
        if p.user_id == user_id and not p.online:
            return p


def member(members: list[dict[str, Any]], user_id: int) -> dict[str, Any]:
    [m] = [m for m in members if m["id"] == user_id]
    return m


async def test_last_seen_is_written_when_the_last_connection_closes(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        users = im_of(server).users
        houyi = await clients.login("houyi")
        group = await houyi.create_group("moon")
        phone = await clients.login("gris")
        await phone.join_group(group.group_id)
        assert phone.user is not None
        gris = phone.user.id
        seen: asyncio.Queue[Presence] = asyncio.Queue()
        houyi.on_presence(seen.put_nowait)
        await houyi.online_users(watch=True)
        laptop = await clients.login("gris")
        at_login = await stored(users, gris)
        assert at_login is not None  # set at login

        await phone.close()  # gris is still online on the laptop
        await settled(server, gris, 1)
        assert await stored(users, gris) == at_login
        m = member(await houyi.group_members(group.group_id), gris)
        assert (m["online"], m["last_seen"]) == (True, None)
        assert seen.empty()

        before = now_ms()
        await laptop.logout()
        p = await offline_presence(seen, gris)
        assert p.last_seen >= before
        assert await stored(users, gris) == p.last_seen
        m = member(await houyi.group_members(group.group_id), gris)
        assert (m["online"], m["last_seen"]) == (False, p.last_seen)


async def test_a_user_hides_last_seen_and_it_stays_hidden_after_a_restart(
    tmp_path: Path,
) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        group = await houyi.create_group("moon")
        gris_im = await clients.connect()
        ok = await gris_im.login("gris", "secret")
        assert ok.show_last_seen
        await gris_im.join_group(group.group_id)
        await gris_im.set_show_last_seen(False)
        gris = ok.user_id
        change = await clients.login("chang-e")
        assert change.user is not None
        change_id = change.user.id
        seen: asyncio.Queue[Presence] = asyncio.Queue()
        houyi.on_presence(seen.put_nowait)
        await houyi.online_users(watch=True)
        await gris_im.logout()
        assert (await offline_presence(seen, gris)).last_seen == 0
        assert member(await houyi.group_members(group.group_id), gris)["last_seen"] is None
        # The user themself still has it.
        assert await stored(im_of(server).users, gris) is not None
        before_stop = now_ms()
    # chang-e was online when the server stopped: last seen then.

    async with im_server(tmp_path) as server, clients_of(server) as clients:
        users = im_of(server).users
        change_seen = await stored(users, change_id)
        assert change_seen is not None and change_seen >= before_stop
        houyi = await clients.login("houyi")
        gris_im = await clients.connect()
        ok = await gris_im.login("gris", "secret")
        assert not ok.show_last_seen  # the switch survived the restart
        await gris_im.close()
        await settled(server, gris, 0)
        assert member(await houyi.group_members(group.group_id), gris)["last_seen"] is None
        gris_im = await clients.login("gris")
        await gris_im.set_show_last_seen(True)
        await gris_im.logout()
        await settled(server, gris, 0)
        shown = member(await houyi.group_members(group.group_id), gris)["last_seen"]
        assert shown is not None and shown == await stored(users, gris)


# -- a cluster: offline means offline on every node ----------------------------------------


MakeNode = Callable[[int], Awaitable[Server]]


@pytest.fixture
async def nodes(redis_prefix: str, pg_dsn: str) -> AsyncIterator[MakeNode]:
    async with node_maker(redis_prefix, pg_dsn) as make:
        yield make


async def test_a_user_online_on_another_node_is_not_last_seen(
    nodes: MakeNode,
) -> None:
    n1, n2 = await nodes(1), await nodes(2)
    opened: list[IMClient] = []

    async def login(server: Server, name: str) -> IMClient:
        im = IMClient("127.0.0.1", server.address[1], cluster_settings())
        opened.append(im)
        await im.connect(WAIT)
        await im.login(name, "pw")
        return im

    try:
        alice = await login(n1, "alice")
        group = await alice.create_group("moon")
        bob_a = await login(n1, "bob")
        await bob_a.join_group(group.group_id)
        assert bob_a.user is not None
        bob = bob_a.user.id
        seen: asyncio.Queue[Presence] = asyncio.Queue()
        alice.on_presence(seen.put_nowait)
        await alice.online_users(watch=True)
        bob_b = await login(n2, "bob")
        users = im_of(n1).users
        at_login = await stored(users, bob)
        assert at_login is not None

        await bob_a.close()  # bob is still online on node 2
        await settled(n1, bob, 0)
        assert await stored(users, bob) == at_login
        m = member(await alice.group_members(group.group_id), bob)
        assert (m["online"], m["last_seen"]) == (True, None)

        before = now_ms()
        await bob_b.logout()  # the last one: node 2 writes it, node 1's watcher hears it
        p = await offline_presence(seen, bob)
        assert p.last_seen >= before
        assert await stored(users, bob) == p.last_seen
        m = member(await alice.group_members(group.group_id), bob)
        assert (m["online"], m["last_seen"]) == (False, p.last_seen)
    finally:
        for im in opened:
            await im.close()


# -- upgrading a database written by schema version 2 ---------------------------------------

SQLITE_V2 = SQLITE_V1.replace(
    "INSERT INTO schema_version VALUES (1);", "INSERT INTO schema_version VALUES (2);"
) + (
    "ALTER TABLE users ADD COLUMN name_key TEXT;\n"
    "ALTER TABLE users ADD COLUMN name_shape TEXT;\n"
    "CREATE UNIQUE INDEX users_key_unique ON users(name_key);\n"
    "CREATE UNIQUE INDEX users_shape_unique ON users(name_shape);\n"
)
"""Schema version 2 as that version created it: version 1, then its step."""

PG_V2 = [
    s.replace("VALUES (1)", "VALUES (2)") if s.startswith("INSERT INTO schema_version") else s
    for s in PG_V1
] + [
    "ALTER TABLE users ADD COLUMN name_key TEXT NOT NULL, ADD COLUMN name_shape TEXT NOT NULL",
    "CREATE UNIQUE INDEX users_key_unique ON users(name_key)",
    "CREATE UNIQUE INDEX users_shape_unique ON users(name_shape)",
]

V2_USERS = [("houyi", "houyi"), ("gris", "gris")]  # name, its key and shape


def write_sqlite_v2(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(SQLITE_V2)
        digest = old_password_hash()
        db.executemany(
            "INSERT INTO users (name, name_key, name_shape, password_hash, created_at) "
            "VALUES (?, ?, ?, ?, 0)",
            [(n, k, k, digest) for n, k in V2_USERS],
        )
        db.executemany(
            "INSERT INTO messages (id, kind, conv, sender_id, sender_name, to_id, text, ts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            OLD_MESSAGES[:1],
        )
        db.execute("INSERT INTO pending VALUES (1, ?)", (OLD_MESSAGES[0][0],))
        db.commit()
    finally:
        db.close()


async def check_upgraded_v2(users: UserCenter, messages: Any) -> None:
    found = await users.get_users([1, 2])
    assert [found[i].name for i in (1, 2)] == ["houyi", "gris"]
    for user_id, (name, _) in enumerate(V2_USERS, start=1):
        assert (await users.authenticate(name, "pw", False)).id == user_id
    assert [m.text for m in await messages.history(1, 2, 0, 0, 10)] == ["hello,houyi"]
    await messages.start_device(1, 101)  # a new device of the user gets what was pending
    assert await messages.count_pending(1, 101) == 1
    # Nobody was seen yet, everyone shows it; the new columns work.
    assert await users.last_seen([1, 2], 1) == {}
    assert await users.show_last_seen(2)
    await users.touch_last_seen([1, 2], 5000)
    await users.touch_last_seen([2], 4000)  # an earlier time does not win
    await users.set_show_last_seen(2, False)
    assert await users.last_seen([1, 2], 1) == {1: 5000}
    assert await users.last_seen([1, 2], 2) == {1: 5000, 2: 5000}
    assert not await users.show_last_seen(2)


async def test_sqlite_upgrades_a_version_2_database(tmp_path: Path) -> None:
    path = tmp_path / "bitchat.db"
    write_sqlite_v2(path)
    users = SqliteUserCenter(str(path), HASHER)
    messages = SqliteMessageCenter(str(path))
    await users.start()
    await messages.start()
    try:
        [(version,)] = await users.db.execute_fetchall("SELECT version FROM schema_version")
        assert version == len(store.MIGRATIONS)
        await check_upgraded_v2(users, messages)
    finally:
        await messages.close()
        await users.close()


async def test_postgresql_upgrades_a_version_2_database(pg_dsn: str) -> None:
    con = await asyncpg.connect(pg_dsn)
    try:
        for statement in PG_V2:
            await con.execute(statement)
        digest = old_password_hash()
        for name, key in V2_USERS:
            await con.execute(
                "INSERT INTO users (name, name_key, name_shape, password_hash, created_at) "
                "VALUES ($1, $2, $2, $3, 0)",
                name,
                key,
                digest,
            )
        await con.executemany(
            "INSERT INTO messages (id, kind, conv, sender_id, sender_name, to_id, text, ts) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            OLD_MESSAGES[:1],
        )
        await con.execute("INSERT INTO pending VALUES (1, $1)", OLD_MESSAGES[0][0])
    finally:
        await con.close()

    db = PgDatabase(pg_dsn, cluster_settings())
    users = PgUserCenter(db, HASHER)
    messages = PgMessageCenter(db)
    await users.start()
    await messages.start()
    try:
        con = await asyncpg.connect(pg_dsn)
        try:
            version = await con.fetchval("SELECT version FROM schema_version")
            assert version == len(pg.MIGRATIONS)
        finally:
            await con.close()
        await check_upgraded_v2(users, messages)
    finally:
        await messages.close()
        await users.close()
