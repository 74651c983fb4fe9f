"""The sync model on a real PostgreSQL (a fresh database per test): devices and their
cursors, read positions, the conversation list, receipts, and the upgrade of a
version-4 database whose pending rows become read positions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from bitchat.cluster.pg import MIGRATIONS, PgDatabase, PgMessageCenter, PgUserCenter
from bitchat.im.centers import Message, User, conversation
from bitchat.im.ids import IdGenerator
from bitchat.im.passwords import hasher_for, new_token, token_digest
from bitchat.im.sql import SCHEMA_VERSION
from cluster_support import cluster_settings, pg_dsn_fixture  # noqa: F401 (fixtures)

Centers = tuple[PgUserCenter, PgMessageCenter]


@pytest.fixture
async def centers(pg_dsn: str) -> AsyncIterator[Centers]:
    async with _centers(pg_dsn) as c:
        yield c


class _centers:
    def __init__(self, dsn: str, **settings: Any) -> None:
        db = PgDatabase(dsn, cluster_settings(**settings), application_name="bitchat-sync")
        self.users = PgUserCenter(db, hasher_for(cluster_settings()))
        self.messages = PgMessageCenter(db, batch_max=64)

    async def __aenter__(self) -> Centers:
        await self.users.start()
        await self.messages.start()
        return self.users, self.messages

    async def __aexit__(self, *exc: object) -> None:
        await self.messages.close()
        await self.users.close()


ids = IdGenerator(3)


def _p2p(sender: User, to: User, text: str, device: int = 0, mid: int = 0) -> Message:
    mid = mid or ids.next()
    return Message(mid, "p2p", sender.id, sender.name, to.id, text, 1, device=device)


def _earlier(gen: IdGenerator) -> int:
    """An id of ten seconds ago: below the id of a join made now."""
    return gen.next(int(time.time() * 1000) - 10_000)


def _group(sender: User, group_id: int, text: str, device: int = 0) -> Message:
    return Message(ids.next(), "group", sender.id, sender.name, group_id, text, 1, device=device)


async def _send(messages: PgMessageCenter, *msgs: Message) -> list[Message]:
    """Stored in one batch (the calls queue before the writer runs), in call order."""
    futs = [messages.store(m, []) for m in msgs]
    return [m for m, _ in await asyncio.gather(*futs)]


async def _texts(messages: PgMessageCenter, user: User, device: int) -> list[str]:
    return [m.text for m in await messages.pending(user.id, device, 0, 1000)]


async def _new_device(users: PgUserCenter, user: User, name: str, most: int = 32) -> int:
    device, new = await users.device(user.id, name, most)
    assert new
    return device


async def test_cursors_per_device(centers: Centers) -> None:
    users, messages = centers
    alice, bob, carol = [await users.register(n, "pw") for n in ("alice", "bob", "carol")]
    a1 = await _new_device(users, alice, "a1")
    a2 = await _new_device(users, alice, "a2")
    b1 = await _new_device(users, bob, "b1")
    b2 = await _new_device(users, bob, "b2")
    sent = await _send(messages, *(_p2p(alice, bob, f"m{i}", a1) for i in range(1, 6)))
    assert [m.seq for m in sent] == [1, 2, 3, 4, 5]
    ab = conversation("p2p", alice.id, bob.id)

    assert await _texts(messages, bob, b1) == ["m1", "m2", "m3", "m4", "m5"]
    assert await _texts(messages, bob, b2) == ["m1", "m2", "m3", "m4", "m5"]
    # Never back to the device it came from; to the sender's other devices, yes.
    assert await _texts(messages, alice, a1) == []
    assert await _texts(messages, alice, a2) == ["m1", "m2", "m3", "m4", "m5"]
    # A device new now starts at the read position, which sending moved.
    assert await _texts(messages, alice, await _new_device(users, alice, "a3")) == []

    await messages.ack(bob.id, b1, [(ab, 3)])
    assert await _texts(messages, bob, b1) == ["m4", "m5"]
    assert await messages.count_pending(bob.id, b1) == 2
    assert await messages.count_pending(bob.id, b2) == 5  # its own cursor
    await messages.ack(bob.id, b1, [(ab, 1)])  # never back
    assert await messages.count_pending(bob.id, b1) == 2
    # Acks of one batch on one cursor: the largest wins, whatever the order.
    await asyncio.gather(
        messages.ack(bob.id, b2, [(ab, 4), (ab, 2)]), messages.ack(bob.id, b2, [(ab, 1)])
    )
    assert await _texts(messages, bob, b2) == ["m5"]
    # Paging by id.
    page = await messages.pending(bob.id, b1, 0, 1)
    assert [m.text for m in page] == ["m4"]
    assert [m.text for m in await messages.pending(bob.id, b1, page[0].id, 10)] == ["m5"]
    assert page[0].device == a1

    # A conversation that came after the device: all of it (a cursor from 0).
    await _send(messages, _p2p(carol, bob, "c1"), _p2p(carol, bob, "c2"))
    assert await _texts(messages, bob, b1) == ["m4", "m5", "c1", "c2"]
    await messages.ack(bob.id, b1, [(ab, 5), (conversation("p2p", bob.id, carol.id), 1)])
    assert await _texts(messages, bob, b1) == ["c2"]


async def test_sending_moves_the_senders_read_position(centers: Centers) -> None:
    users, messages = centers
    alice, bob, carol = [await users.register(n, "pw") for n in ("alice", "bob", "carol")]
    g = await users.create_group(alice.id, "g")
    await users.join_group(g.id, bob.id, 10)
    await users.join_group(g.id, carol.id, 10)
    # One batch, both sides: each one's read position is at their last message in it.
    await _send(
        messages,
        _p2p(alice, bob, "1"),
        _p2p(bob, alice, "2"),
        _p2p(alice, bob, "3"),
        _p2p(bob, alice, "4"),
        _p2p(bob, alice, "5"),
        _group(alice, g.id, "g1"),
        _group(bob, g.id, "g2"),
        _group(alice, g.id, "g3"),
        _p2p(carol, carol, "self"),
    )

    async def reads(user: User) -> dict[tuple[int, int], tuple[int, int]]:
        return {
            (c.peer_id, c.group_id): (c.read_seq, c.unread)
            for c in await messages.conversations(user.id, 0, 50)
        }

    assert await reads(alice) == {(bob.id, 0): (3, 2), (0, g.id): (3, 0)}
    assert await reads(bob) == {(alice.id, 0): (5, 0), (0, g.id): (2, 1)}
    assert await reads(carol) == {(carol.id, 0): (1, 0), (0, g.id): (0, 3)}
    # A later batch: the old last_seq plus the place in the batch.
    await _send(messages, _p2p(alice, bob, "6"), _p2p(alice, bob, "7"), _p2p(bob, alice, "8"))
    assert (await reads(alice))[(bob.id, 0)] == (7, 1)
    assert (await reads(bob))[(alice.id, 0)] == (8, 0)
    await _send(messages, _group(carol, g.id, "g4"))
    assert (await reads(carol))[(0, g.id)] == (4, 0)


async def test_a_new_device_starts_at_the_read_position(centers: Centers) -> None:
    users, messages = centers
    alice, bob = [await users.register(n, "pw") for n in ("alice", "bob")]
    b1 = await _new_device(users, bob, "b1")
    await _send(messages, *(_p2p(alice, bob, f"m{i}") for i in range(1, 5)))
    g = await users.create_group(alice.id, "g")
    await _send(messages, *(_group(alice, g.id, f"g{i}") for i in range(1, 4)))
    assert await messages.mark_read(bob.id, conversation("p2p", alice.id, bob.id), 2) == (
        2,
        4,
        [alice.id],
    )
    b2 = await _new_device(users, bob, "b2")
    assert await _texts(messages, bob, b2) == ["m3", "m4"]
    # start_device again (the service's call) moves nothing.
    await messages.start_device(bob.id, b2)
    assert await _texts(messages, bob, b2) == ["m3", "m4"]

    # A join: no history pushed, to the devices there before it or after it.
    await users.join_group(g.id, bob.id, 10)
    b3 = await _new_device(users, bob, "b3")
    assert await _texts(messages, bob, b1) == ["m1", "m2", "m3", "m4"]
    assert await _texts(messages, bob, b3) == ["m3", "m4"]
    await _send(messages, _group(alice, g.id, "g4"))
    for device in (b1, b2, b3):
        assert (await _texts(messages, bob, device))[-1:] == ["g4"]
    # Leaving and joining again: still from the new join.
    await messages.ack(bob.id, b1, [(conversation("group", 0, g.id), 4)])
    await users.leave_group(g.id, bob.id)
    await _send(messages, _group(alice, g.id, "g5"))
    await users.join_group(g.id, bob.id, 10)
    await _send(messages, _group(alice, g.id, "g6"))
    assert [t for t in await _texts(messages, bob, b1) if t.startswith("g")] == ["g6"]
    assert [t for t in await _texts(messages, bob, b2) if t.startswith("g")] == ["g6"]


async def test_conversations_order_paging_and_unread(centers: Centers) -> None:
    users, messages = centers
    alice, bob, carol = [await users.register(n, "pw") for n in ("alice", "bob", "carol")]
    b1 = await _new_device(users, bob, "b1")
    past = IdGenerator(4)
    await _send(
        messages,
        _p2p(alice, bob, "hi bob", mid=_earlier(past)),
        _p2p(alice, bob, "again", mid=_earlier(past)),
    )
    quiet = await users.create_group(alice.id, "quiet")  # joined, no message
    await _send(messages, _p2p(carol, alice, "hi alice"))
    busy = await users.create_group(carol.id, "busy")
    await users.join_group(busy.id, alice.id, 10)
    await _send(messages, _group(carol, busy.id, "news"))

    convs = await messages.conversations(alice.id, 0, 50)
    assert [(c.kind, c.name) for c in convs] == [
        ("group", "busy"),
        ("p2p", "carol"),
        ("group", "quiet"),
        ("p2p", "bob"),
    ]
    activity = [c.activity for c in convs]
    assert activity == sorted(activity, reverse=True) and len(set(activity)) == 4
    by_name = {c.name: c for c in convs}
    assert by_name["busy"].last_message is not None
    assert by_name["busy"].last_message.text == "news"
    assert by_name["busy"].activity == by_name["busy"].last_message.id
    # Joined after the message: a read position at the end at the join, so "news"
    # (after it) is unread.
    assert (by_name["busy"].last_seq, by_name["busy"].unread) == (1, 1)
    assert by_name["quiet"].last_message is None and by_name["quiet"].last_seq == 0
    assert by_name["quiet"].group_id == quiet.id
    carol_conv = by_name["carol"]
    assert (carol_conv.peer_id, carol_conv.group_id, carol_conv.unread) == (carol.id, 0, 1)
    bob_conv = by_name["bob"]
    assert (bob_conv.last_seq, bob_conv.read_seq, bob_conv.unread) == (2, 2, 0)
    assert (bob_conv.peer_read_seq, bob_conv.peer_delivered_seq) == (0, 0)
    assert bob_conv.to_dict()["last_message"]["text"] == "again"

    # Bob has the first on a device, then reads both.
    ab = conversation("p2p", alice.id, bob.id)
    await messages.ack(bob.id, b1, [(ab, 1)])
    bob_conv = (await messages.conversations(alice.id, 0, 50))[-1]
    assert (bob_conv.peer_read_seq, bob_conv.peer_delivered_seq) == (0, 1)
    await messages.mark_read(bob.id, ab, 0)
    bob_conv = (await messages.conversations(alice.id, 0, 50))[-1]
    assert (bob_conv.peer_read_seq, bob_conv.peer_delivered_seq) == (2, 2)
    mine = (await messages.conversations(bob.id, 0, 50))[0]
    assert (mine.name, mine.read_seq, mine.unread, mine.peer_read_seq) == ("alice", 2, 0, 2)

    # Pages: before = the last activity of the page before.
    first = await messages.conversations(alice.id, 0, 3)
    assert [c.name for c in first] == ["busy", "carol", "quiet"]
    second = await messages.conversations(alice.id, first[-1].activity, 3)
    assert [c.name for c in second] == ["bob"]
    assert await messages.conversations(alice.id, second[-1].activity, 3) == []
    # A new message brings its conversation to the top.
    await _send(messages, _p2p(bob, alice, "back"))
    top = (await messages.conversations(alice.id, 0, 1))[0]
    assert (top.name, top.unread) == ("bob", 1)


async def test_mark_read(pg_dsn: str) -> None:
    async with _centers(pg_dsn, max_group_size=2) as (users, messages):
        alice, bob, carol, dave = [
            await users.register(n, "pw") for n in ("alice", "bob", "carol", "dave")
        ]
        ab = conversation("p2p", alice.id, bob.id)
        await _send(messages, *(_p2p(alice, bob, f"m{i}") for i in range(1, 5)))
        assert await messages.mark_read(bob.id, ab, 2) == (2, 4, [alice.id])
        assert await messages.mark_read(bob.id, ab, 1) == (2, 4, [])  # never back
        assert await messages.mark_read(bob.id, ab, 2) == (2, 4, [])  # nothing new read
        assert await messages.mark_read(bob.id, ab, 99) == (4, 4, [alice.id])  # up to the end
        assert await messages.mark_read(alice.id, ab, 0) == (4, 4, [])  # her own: read
        assert await messages.mark_read(carol.id, ab, 0) == (0, 0, [])  # not hers
        assert await messages.mark_read(bob.id, conversation("p2p", bob.id, dave.id), 0) == (
            0,
            0,
            [],
        )

        g = await users.create_group(alice.id, "g")
        frank = await users.register("frank", "pw")
        for u in (bob, carol, dave, frank):
            await users.join_group(g.id, u.id, 10)
        gc = conversation("group", 0, g.id)
        await _send(
            messages,
            _group(alice, g.id, "1"),
            _group(bob, g.id, "2"),
            _group(carol, g.id, "3"),
            _group(bob, g.id, "4"),
            _group(dave, g.id, "5"),
        )
        assert await messages.mark_read(alice.id, gc, 3) == (3, 5, [bob.id, carol.id])
        # Distinct, never the reader.
        assert await messages.mark_read(carol.id, gc, 0) == (5, 5, [bob.id, dave.id])
        assert await messages.mark_read(alice.id, gc, 0) == (5, 5, [bob.id, dave.id])
        # At most max_group_size (2) of them.
        assert await messages.mark_read(frank.id, gc, 0) == (5, 5, [alice.id, bob.id])
        outsider = await users.register("erin", "pw")
        assert await messages.mark_read(outsider.id, gc, 0) == (0, 0, [])
        assert await messages.mark_read(alice.id, conversation("group", 0, 999), 0) == (0, 0, [])


async def test_group_receipts(centers: Centers) -> None:
    users, messages = centers
    alice, bob, carol, dave = [
        await users.register(n, "pw") for n in ("alice", "bob", "carol", "dave")
    ]
    g = await users.create_group(alice.id, "g")
    for u in (bob, carol, dave):
        await users.join_group(g.id, u.id, 10)
    devices = {u.id: await _new_device(users, u, "d") for u in (bob, carol, dave)}
    gc = conversation("group", 0, g.id)
    await _send(messages, *(_group(alice, g.id, f"{i}") for i in range(1, 4)))
    assert await messages.receipts(g.id, 2) == []
    await messages.ack(bob.id, devices[bob.id], [(gc, 2)])
    await messages.mark_read(carol.id, gc, 3)
    assert await messages.receipts(g.id, 2) == [(bob.id, False), (carol.id, True)]
    assert await messages.receipts(g.id, 3) == [(carol.id, True)]
    assert await messages.receipts(g.id, 1) == [(bob.id, False), (carol.id, True)]
    # The sender is never among them, even when someone else sent the message.
    await _send(messages, _group(bob, g.id, "4"))
    await messages.ack(dave.id, devices[dave.id], [(gc, 4)])
    await messages.mark_read(alice.id, gc, 4)
    assert await messages.receipts(g.id, 4) == [(alice.id, True), (dave.id, False)]
    # One who joined after a message never had it.
    erin = await users.register("erin", "pw")
    await users.join_group(g.id, erin.id, 10)
    assert erin.id not in [u for u, _ in await messages.receipts(g.id, 4)]
    assert await messages.receipts(g.id, 99) == []


async def test_device_cap_forgets_the_one_seen_longest_ago(centers: Centers) -> None:
    users, messages = centers
    alice, bob = [await users.register(n, "pw") for n in ("alice", "bob")]
    d1 = await _new_device(users, alice, "d1", 2)
    d2 = await _new_device(users, alice, "d2", 2)
    other = await _new_device(users, bob, "d1", 2)  # another user's devices do not count
    assert await users.device(alice.id, "d1", 2) == (d1, False)  # seen again: d2 is oldest
    await _send(messages, _p2p(bob, alice, "x"))
    t1 = await users.issue_token(alice.id, 60, d1)
    t2 = await users.issue_token(alice.id, 60, d2)
    await messages.ack(alice.id, d2, [(conversation("p2p", alice.id, bob.id), 1)])
    d3 = await _new_device(users, alice, "d3", 2)
    assert await users.device_name(alice.id, d2) is None
    assert await users.device_name(alice.id, d1) == "d1"
    assert await users.device_name(alice.id, d3) == "d3"
    assert await users.check_token(t2) is None  # its tokens went with it
    assert await users.check_token(t1) == (alice, d1)
    async with users.db.connection() as con:
        assert await con.fetchval("SELECT count(*) FROM cursors WHERE device = $1", d2) == 0
    # Back under the same name: a new device, from the read position again.
    d2_again, new = await users.device(alice.id, "d2", 2)
    assert new and d2_again not in (d1, d2, d3)
    assert await _texts(messages, alice, d2_again) == ["x"]
    assert await users.device_name(bob.id, other) == "d1"


async def test_devices_registered_at_once_keep_the_cap(centers: Centers) -> None:
    users, _ = centers
    alice = await users.register("alice", "pw")
    results = await asyncio.gather(*(users.device(alice.id, f"d{i % 4}", 3) for i in range(12)))
    assert sum(new for _, new in results) >= 4  # each name once at least
    async with users.db.connection() as con:
        assert await con.fetchval("SELECT count(*) FROM devices WHERE user_id = $1", alice.id) <= 3
        names = await con.fetch("SELECT name FROM devices WHERE user_id = $1", alice.id)
    assert len({r[0] for r in names}) == len(names)


# -- the upgrade from version 4 --------------------------------------------------------------


async def _version_4(dsn: str) -> None:
    """The schema as it was at version 4 (the migrations then, under the same rules)."""
    con = await asyncpg.connect(dsn)
    try:
        async with con.transaction():
            await con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            await con.execute("INSERT INTO schema_version VALUES (4)")
            for script in MIGRATIONS[:4]:
                if isinstance(script, str):
                    await con.execute(script)
                else:
                    await script(con)
    finally:
        await con.close()


async def test_upgrade_turns_pending_rows_into_read_positions(pg_dsn: str) -> None:
    await _version_4(pg_dsn)
    con = await asyncpg.connect(pg_dsn)
    now = time.time()
    rows: list[tuple[int, str, str, int, int, int]] = []  # id, kind, conv, sender, to, seq
    try:
        for uid, name in ((1, "alice"), (2, "bob"), (3, "carol")):
            await con.execute(
                "INSERT INTO users (id, name, password_hash, created_at, name_key, name_shape) "
                "VALUES ($1, $2, 'x', $3, $2, $2)",
                uid,
                name,
                now,
            )
        token = new_token()
        await con.execute("INSERT INTO tokens VALUES ($1, 2, $2)", token_digest(token), now + 3600)
        await con.execute("INSERT INTO groups VALUES (7, 'g', 1, $1), (8, 'quiet', 1, $1)", now)
        await con.execute(
            "INSERT INTO group_members VALUES (7, 1, $1), (7, 2, $1), (7, 3, $1), (8, 1, $1)",
            now - 60,
        )
        plan = [
            ("p2p", 1, 2),  # ab 1
            ("p2p", 2, 1),  # ab 2
            ("p2p", 1, 2),  # ab 3
            ("p2p", 3, 1),  # ac 1
            ("group", 1, 7),  # g 1
            ("p2p", 1, 2),  # ab 4
            ("group", 2, 7),  # g 2
            ("p2p", 3, 1),  # ac 2
            ("group", 1, 7),  # g 3
            ("p2p", 1, 2),  # ab 5
            ("group", 3, 7),  # g 4
        ]
        gen = IdGenerator(2)
        seqs: dict[str, int] = {}
        for kind, sender, to in plan:
            conv = conversation(kind, sender, to)
            seqs[conv] = seqs.get(conv, 0) + 1
            rows.append((gen.next(), kind, conv, sender, to, seqs[conv]))
        await con.executemany(
            "INSERT INTO messages (id, kind, conv, sender_id, sender_name, to_id, text, ts, seq) "
            "VALUES ($1, $2, $3, $4, 'someone', $5, $3 || '#' || $6::bigint, 1, $6)",
            rows,
        )
        await con.execute(
            "INSERT INTO conversations SELECT conv, max(seq) FROM messages GROUP BY conv"
        )
        by = {(conv, seq): mid for mid, _, conv, _, _, seq in rows}
        ab, ac, g = conversation("p2p", 1, 2), conversation("p2p", 1, 3), "g:7"
        pending = {
            2: [by[(ab, 3)], by[(ab, 4)], by[(ab, 5)], by[(g, 3)], by[(g, 4)]],
            1: [by[(ac, 1)], by[(ac, 2)], by[(g, 4)]],
            3: [],  # carol had everything
        }
        await con.executemany(
            "INSERT INTO pending VALUES ($1, $2)",
            [(u, m) for u, ms in pending.items() for m in ms],
        )
    finally:
        await con.close()

    async with _centers(pg_dsn) as (users, messages):
        async with users.db.connection() as c:
            assert (
                await c.fetchval("SELECT version FROM schema_version")
                == len(MIGRATIONS)
                == SCHEMA_VERSION
            )
            assert await c.fetchval("SELECT to_regclass('pending')") is None
            stored = await c.fetch("SELECT id, conv, seq, device FROM messages ORDER BY id")
            assert [(r[0], r[1], r[2]) for r in stored] == [
                (m, c_, s) for m, _, c_, _, _, s in rows
            ]
            assert {r[3] for r in stored} == {0}
            conv_rows = {
                r["conv"]: r
                for r in await c.fetch("SELECT conv, lo, hi, last_id, last_seq FROM conversations")
            }
        assert (conv_rows[ab]["lo"], conv_rows[ab]["hi"]) == (1, 2)
        assert (conv_rows[g]["lo"], conv_rows[g]["hi"]) == (None, None)
        assert conv_rows[ab]["last_id"] == max(m for m, _, c_, *_ in rows if c_ == ab)
        # A token from before devices: its device is 0 (a new one at the next login).
        found = await users.check_token(token)
        assert found is not None and found[1] == 0

        for uid, want in pending.items():
            user = await users.get_user(uid)
            assert user is not None
            device = await _new_device(users, user, "first")
            got = await messages.pending(uid, device, 0, 100)
            assert [m.id for m in got] == sorted(want), user.name
            assert await messages.count_pending(uid, device) == len(want)
            # Unread in the list: exactly what was pending.
            unread = {
                conversation(c.kind, uid, c.peer_id or c.group_id): c.unread
                for c in await messages.conversations(uid, 0, 50)
            }
            counts = {k: n for k, n in unread.items() if n}
            expected: dict[str, int] = {}
            for mid in want:
                conv = next(c_ for m, _, c_, *_ in rows if m == mid)
                expected[conv] = expected.get(conv, 0) + 1
            assert counts == expected, user.name
        # Every message is still in history.
        hist = await messages.history(1, 2, 0, 0, 100)
        assert sorted(m.id for m in hist) == sorted(m for m, _, c_, *_ in rows if c_ == ab)
        assert len(await messages.history(1, 0, 7, 0, 100)) == 4
        quiet = [c for c in await messages.conversations(1, 0, 50) if c.group_id == 8]
        assert quiet and quiet[0].activity > 0 and quiet[0].last_message is None
        # And the store goes on numbering where it was.
        alice = await users.get_user(1)
        bob = await users.get_user(2)
        assert alice is not None and bob is not None
        (m,) = await _send(messages, _p2p(alice, bob, "after"))
        assert m.seq == 6


async def test_two_nodes_writing_one_conversation_keep_read_positions(pg_dsn: str) -> None:
    async with _centers(pg_dsn) as (users, one), _centers(pg_dsn) as (_, two):
        alice, bob, carol = [await users.register(n, "pw") for n in ("alice", "bob", "carol")]
        g = await users.create_group(alice.id, "g")
        await users.join_group(g.id, bob.id, 10)
        await users.join_group(g.id, carol.id, 10)
        bobs = [await _new_device(users, bob, f"b{i}") for i in range(4)]
        ab = conversation("p2p", alice.id, bob.id)
        gc = conversation("group", 0, g.id)
        node_a, node_b = IdGenerator(11), IdGenerator(12)

        async def sends(messages: PgMessageCenter, gen: IdGenerator, me: User, peer: User) -> None:
            for round_ in range(10):
                batch = []
                for i in range(8):
                    text = f"{me.name}-{round_}-{i}"
                    mid = gen.next()
                    batch.append(Message(mid, "p2p", me.id, me.name, peer.id, text, 1))
                    if i % 3 == 0:
                        batch.append(Message(gen.next(), "group", me.id, me.name, g.id, text, 1))
                await _send(messages, *batch)

        async def acks(messages: PgMessageCenter, order: list[int]) -> None:
            # Both nodes move the same cursors, in opposite orders, many times.
            for seq in range(1, 41):
                await messages.ack(bob.id, bobs[0], [(gc, seq), (ab, seq)][:: order[seq % 2]])
                await messages.ack(bob.id, bobs[1], [(ab, seq), (gc, seq)][:: order[seq % 2]])

        await asyncio.wait_for(
            asyncio.gather(
                sends(one, node_a, alice, bob),
                sends(two, node_b, bob, alice),
                acks(one, [1, -1]),
                acks(two, [-1, 1]),
            ),
            60,
        )
        history = await one.history(alice.id, bob.id, 0, 0, 1000)
        assert sorted(m.seq for m in history) == list(range(1, 161))
        last_of = {u.id: max(m.seq for m in history if m.sender_id == u.id) for u in (alice, bob)}
        group = await one.history(alice.id, 0, g.id, 0, 1000)
        last_in_group = {
            u.id: max(m.seq for m in group if m.sender_id == u.id) for u in (alice, bob)
        }
        for me, peer in ((alice, bob), (bob, alice)):
            convs = {(c.peer_id, c.group_id): c for c in await two.conversations(me.id, 0, 10)}
            p2p = convs[(peer.id, 0)]
            assert (p2p.read_seq, p2p.peer_read_seq) == (last_of[me.id], last_of[peer.id])
            assert convs[(0, g.id)].read_seq == last_in_group[me.id]
        async with users.db.connection() as con:
            cursors = await con.fetch(
                "SELECT device, conv, seq FROM cursors WHERE user_id = $1 AND device = ANY($2)",
                bob.id,
                bobs[:2],
            )
        assert sorted(tuple(r) for r in cursors) == sorted(
            (d, c, 40) for d in bobs[:2] for c in (ab, gc)
        )
