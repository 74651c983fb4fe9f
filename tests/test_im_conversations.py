"""Conversations and their sequence numbers: every message gets its conversation's
next seq (gapless, in commit order) in both stores, standalone and across nodes;
a retry keeps its seq, a refused row takes none, History pages by seq; and both
stores upgrade a database written by schema version 3."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bitchat import RequestError, Server
from bitchat.cluster import pg
from bitchat.cluster.pg import PgDatabase, PgMessageCenter
from bitchat.im import sql
from bitchat.im import sqlite as store
from bitchat.im.centers import Message, MessageCenter
from bitchat.im.client import IMClient
from bitchat.im.sqlite import SqliteMessageCenter
from cluster_support import (  # noqa: F401 (fixtures)
    REDIS_URL,
    cluster_settings,
    node_maker,
    pg_dsn_fixture,
    redis_prefix_fixture,
)
from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server
from test_im_last_seen import PG_V2, SQLITE_V2

# -- standalone, over real sockets ---------------------------------------------------------


async def test_each_conversation_numbers_its_messages(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        alice = await clients.login("alice")
        bob = await clients.login("bob")
        carol = await clients.login("carol")
        assert alice.user and bob.user and carol.user
        inbox = Inbox(bob)
        a_b = [(await alice.send_p2p(bob.user.id, f"ab{i}")).seq for i in range(3)]
        b_a = (await bob.send_p2p(alice.user.id, "ba")).seq  # the same conversation
        a_c = [(await alice.send_p2p(carol.user.id, f"ac{i}")).seq for i in range(2)]
        g = await alice.create_group("team")
        await bob.join_group(g.group_id)
        grp = [(await bob.send_group(g.group_id, f"g{i}")).seq for i in range(2)]
        assert (a_b, b_a, a_c, grp) == ([1, 2, 3], 4, [1, 2], [1, 2])
        pushed = await inbox.wait_for(3)  # bob's own group sends are not pushed to him
        assert [(m.text, m.seq) for m in pushed] == [("ab0", 1), ("ab1", 2), ("ab2", 3)]

        # A retry (same client_msg_id) is stored once and keeps its seq; no gap after.
        first = await alice.send_p2p(bob.user.id, "once", client_msg_id="retry-1")
        again = await alice.send_p2p(bob.user.id, "once", client_msg_id="retry-1")
        assert again.duplicate and (again.msg_id, again.seq) == (first.msg_id, first.seq) == (
            first.msg_id,
            5,
        )
        assert (await alice.send_p2p(bob.user.id, "next")).seq == 6

        # History by seq: newest first, page on with the last seq; after_seq catches up.
        page = await bob.history(peer_id=alice.user.id, limit=4, before_seq=6)
        assert [m["seq"] for m in page.messages] == [5, 4, 3, 2] and page.more
        page = await bob.history(peer_id=alice.user.id, limit=4, before_seq=2)
        assert [m["seq"] for m in page.messages] == [1] and not page.more
        page = await bob.history(peer_id=alice.user.id, limit=3, after_seq=2)
        assert [m["seq"] for m in page.messages] == [3, 4, 5] and page.more
        assert [m.text for m in page.chat_messages()] == ["ab2", "ba", "once"]
        newest = await bob.history(peer_id=alice.user.id, limit=2)  # by id, as before
        assert [m["seq"] for m in newest.messages] == [6, 5]
        older = await bob.history(
            peer_id=alice.user.id, limit=2, before=newest.messages[-1]["msg_id"]
        )
        assert [m["seq"] for m in older.messages] == [4, 3]
        group_page = await alice.history(group_id=g.group_id, before_seq=0, after_seq=0)
        assert [m["seq"] for m in group_page.messages] == [2, 1]


# -- a refused row takes no number -----------------------------------------------------------


def _msg(msg_id: int, text: str, to: int = 2) -> Message:
    return Message(msg_id, "p2p", 1, "alice", to, text, 1000 + msg_id)


async def _refused_row_keeps_the_sequence(messages: MessageCenter, bad_text: str) -> None:
    # Queued in one loop iteration: one batch, which the bad row makes go row by row.
    batch = [_msg(1, "a"), _msg(2, bad_text), _msg(3, "b"), _msg(4, "other", to=3)]
    outcomes = await asyncio.gather(
        *(messages.store(m, [m.to]) for m in batch), return_exceptions=True
    )
    assert isinstance(outcomes[1], RequestError)
    seqs = [o[0].seq for o in outcomes if isinstance(o, tuple)]
    assert seqs == [1, 2, 1]
    stored, dup = await messages.store(_msg(5, "c"), [2])
    assert (stored.seq, dup) == (3, False)
    history = await messages.history(1, 2, 0, 0, 10)
    assert [(m.text, m.seq) for m in history] == [("c", 3), ("b", 2), ("a", 1)]


async def test_sqlite_refused_row_takes_no_seq(tmp_path: Path) -> None:
    messages = SqliteMessageCenter(str(tmp_path / "m.db"))
    await messages.start()
    try:
        await _refused_row_keeps_the_sequence(messages, "\ud800")  # does not encode
    finally:
        await messages.close()


async def test_postgresql_refused_row_takes_no_seq(pg_dsn: str) -> None:
    db = PgDatabase(pg_dsn, cluster_settings())
    messages = PgMessageCenter(db)
    await messages.start()
    try:
        await _refused_row_keeps_the_sequence(messages, "nul\x00")  # PostgreSQL refuses
    finally:
        await messages.close()


# -- two nodes on real PostgreSQL and Redis --------------------------------------------------

MakeNode = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_node(redis_prefix: str, pg_dsn: str) -> AsyncIterator[MakeNode]:
    async with node_maker(redis_prefix, pg_dsn) as make:
        yield make


async def test_two_nodes_number_one_group_without_gaps(make_node: MakeNode) -> None:
    n1, n2 = await make_node(1), await make_node(2)
    clients: list[IMClient] = []
    try:
        for i, node in enumerate((n1, n2, n1, n2)):
            im = IMClient("127.0.0.1", node.address[1], cluster_settings())
            clients.append(im)
            await im.connect(WAIT)
            await im.login(f"user{i}", "pw")
        g = await clients[0].create_group("busy")
        for im in clients[1:]:
            await im.join_group(g.group_id)
        watcher = Inbox(clients[0])  # on node 1: gets the others' 3 x 25 messages

        each = 25
        acks = await asyncio.wait_for(
            asyncio.gather(
                *(
                    im.send_group(g.group_id, f"{i}-{k}")
                    for i, im in enumerate(clients)
                    for k in range(each)
                )
            ),
            WAIT,
        )
        total = each * len(clients)
        assert sorted(a.seq for a in acks) == list(range(1, total + 1))
        assert len({a.msg_id for a in acks}) == total
        pushed = await watcher.wait_for(total - each)
        by_id = {a.msg_id: a.seq for a in acks}
        assert all(m.seq == by_id[m.msg_id] for m in pushed)  # forwarded with its seq

        # after_seq 0 is unset: the first is asked with before_seq, the rest caught up.
        caught_up = (await clients[1].history(group_id=g.group_id, before_seq=2)).messages
        while True:
            after = caught_up[-1]["seq"]
            page = await clients[1].history(group_id=g.group_id, limit=40, after_seq=after)
            caught_up += page.messages
            if not page.more:
                break
        assert [m["seq"] for m in caught_up] == list(range(1, total + 1))
        assert {m["msg_id"]: m["seq"] for m in caught_up} == by_id

        # A retry through the other node is the same message with the same seq.
        assert clients[0].user is not None
        first = await clients[1].send_p2p(clients[0].user.id, "hi", client_msg_id="r-1")
        other = IMClient("127.0.0.1", n1.address[1], cluster_settings())
        clients.append(other)
        await other.connect(WAIT)
        await other.login("user1", "pw")
        again = await other.send_p2p(clients[0].user.id, "hi", client_msg_id="r-1")
        assert (first.seq, again.duplicate, again.seq, again.msg_id) == (1, True, 1, first.msg_id)
        assert (await other.send_p2p(clients[0].user.id, "next")).seq == 2
    finally:
        for im in clients:
            await im.close()


# -- upgrading a database written by schema version 3 ---------------------------------------

SQLITE_V3 = SQLITE_V2.replace(
    "INSERT INTO schema_version VALUES (2);", "INSERT INTO schema_version VALUES (3);"
) + (
    "ALTER TABLE users ADD COLUMN last_seen INTEGER;\n"
    "ALTER TABLE users ADD COLUMN show_last_seen INTEGER NOT NULL DEFAULT 1;\n"
)
"""Schema version 3 as that version created it: version 2, then its step."""

PG_V3 = [
    s.replace("VALUES (2)", "VALUES (3)") if s.startswith("INSERT INTO schema_version") else s
    for s in PG_V2
] + [
    "ALTER TABLE users ADD COLUMN last_seen BIGINT, "
    "ADD COLUMN show_last_seen BOOLEAN NOT NULL DEFAULT TRUE",
]

V3_MESSAGES = [  # id, kind, conv, sender, sender name, to, text, ts: not in id order
    (50, "p2p", "p:1:2", 1, "a", 2, "p3", 5),
    (20, "group", "g:7", 2, "b", 7, "g1", 2),
    (10, "p2p", "p:1:2", 2, "b", 1, "p1", 1),
    (60, "p2p", "p:1:3", 3, "c", 1, "q1", 6),
    (40, "group", "g:7", 1, "a", 7, "g2", 4),
    (30, "p2p", "p:1:2", 1, "a", 2, "p2", 3),
]
V3_PENDING = [(2, 50), (1, 10), (1, 60), (3, 40)]
V3_SEQS = {10: 1, 30: 2, 50: 3, 20: 1, 40: 2, 60: 1}
V3_USERS = [(1, "a"), (2, "b"), (3, "c")]
V3_MEMBERS = [(7, 1), (7, 2), (7, 3)]  # group 7, owned by user 1
# After the upgrade, a new device of each user gets every message from the first one
# that was pending for the user in each conversation (its own ones after it too).
V3_CAUGHT_UP = {1: [10, 30, 50, 60], 2: [50], 3: [40]}


async def check_upgraded_v3(messages: MessageCenter, rows: list[Any], convs: list[Any]) -> None:
    assert {int(r[0]): int(r[1]) for r in rows} == V3_SEQS
    assert sorted((str(c), int(n)) for c, n in convs) == [("g:7", 2), ("p:1:2", 3), ("p:1:3", 1)]
    for user, expected in V3_CAUGHT_UP.items():
        device = 100 + user
        await messages.start_device(user, device)
        assert [m.id for m in await messages.pending(user, device, 0, 10)] == expected
        assert await messages.count_pending(user, device) == len(expected)
        assert set(expected) >= {m for u, m in V3_PENDING if u == user}
    assert [m.seq for m in await messages.history(2, 1, 0, 0, 10)] == [3, 2, 1]
    assert [m.text for m in await messages.history(1, 0, 7, 0, 10, before_seq=2)] == ["g1"]
    new = [
        Message(70, "p2p", 2, "b", 1, "p4", 7),
        Message(80, "group", 3, "c", 7, "g3", 8),
        Message(90, "p2p", 2, "b", 3, "r1", 9),
    ]
    stored = await asyncio.gather(*(messages.store(m, [1]) for m in new))
    assert [m.seq for m, _ in stored] == [4, 3, 1]


async def test_sqlite_upgrades_a_version_3_database(tmp_path: Path) -> None:
    path = tmp_path / "bitchat.db"
    db = sqlite3.connect(path)
    try:
        db.executescript(SQLITE_V3)
        db.executemany(
            "INSERT INTO messages (id, kind, conv, sender_id, sender_name, to_id, text, ts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            V3_MESSAGES,
        )
        db.executemany("INSERT INTO pending VALUES (?, ?)", V3_PENDING)
        db.executemany(
            "INSERT INTO users (id, name, name_key, name_shape, password_hash, created_at) "
            "VALUES (?, ?, ?, ?, 'x', 0)",
            [(i, n, n, n) for i, n in V3_USERS],
        )
        db.execute("INSERT INTO groups VALUES (7, 'moon', 1, 0)")
        db.executemany("INSERT INTO group_members VALUES (?, ?, 0)", V3_MEMBERS)
        db.commit()
    finally:
        db.close()
    messages = SqliteMessageCenter(str(path))
    await messages.start()
    try:
        rows = await messages.db.execute_fetchall("SELECT id, seq FROM messages")
        convs = await messages.db.execute_fetchall("SELECT conv, last_seq FROM conversations")
        [(version,)] = await messages.db.execute_fetchall("SELECT version FROM schema_version")
        assert version == len(store.MIGRATIONS) == sql.SCHEMA_VERSION
        await check_upgraded_v3(messages, list(rows), list(convs))
    finally:
        await messages.close()


async def test_postgresql_upgrades_a_version_3_database(pg_dsn: str) -> None:
    con = await asyncpg.connect(pg_dsn)
    try:
        for statement in PG_V3:
            await con.execute(statement)
        await con.executemany(
            "INSERT INTO messages (id, kind, conv, sender_id, sender_name, to_id, text, ts) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            V3_MESSAGES,
        )
        await con.executemany("INSERT INTO pending VALUES ($1, $2)", V3_PENDING)
        await con.executemany(
            "INSERT INTO users (id, name, name_key, name_shape, password_hash, created_at) "
            "VALUES ($1, $2, $2, $2, 'x', 0)",
            V3_USERS,
        )
        await con.execute("INSERT INTO groups VALUES (7, 'moon', 1, 0)")
        await con.executemany("INSERT INTO group_members VALUES ($1, $2, 0)", V3_MEMBERS)
    finally:
        await con.close()
    messages = PgMessageCenter(PgDatabase(pg_dsn, cluster_settings()))
    await messages.start()
    try:
        con = await asyncpg.connect(pg_dsn)
        try:
            assert await con.fetchval("SELECT version FROM schema_version") == len(pg.MIGRATIONS)
            assert len(pg.MIGRATIONS) == sql.SCHEMA_VERSION
            rows = list(await con.fetch("SELECT id, seq FROM messages"))
            convs = list(await con.fetch("SELECT conv, last_seq FROM conversations"))
        finally:
            await con.close()
        await check_upgraded_v3(messages, rows, convs)
    finally:
        await messages.close()
