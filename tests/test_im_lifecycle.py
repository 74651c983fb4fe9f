"""Messages that live, through real sockets in both modes: edits, recalls, reactions,
delete for me, replies, mentions and typed messages; a device that was away catches
up on the events; refusals change nothing; a recalled text leaves the SQLite file and
its WAL; the upgrade of a database of the previous schema version in both stores."""

from __future__ import annotations

import asyncio
import runpy
import sqlite3
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bitchat import RequestError, codes
from bitchat.cluster import pg
from bitchat.cluster.pg import PgDatabase, PgMessageCenter
from bitchat.im import sql
from bitchat.im import sqlite as store
from bitchat.im.client import IMClient
from bitchat.im.lifecycle import mentioned_names
from bitchat.im.packets import ChatMessage, Hidden
from bitchat.im.sqlite import SqliteMessageCenter
from cluster_support import (
    cluster_settings,
    pg_dsn_fixture,  # noqa: F401 (fixture)
    pg_schema_at,
    redis_prefix_fixture,  # noqa: F401 (fixture)
)
from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server
from test_im_sync import (  # noqa: F401 (_cluster_services: fixture)
    MODES,
    Deployment,
    Pushes,
    _cluster_services,
    conversations,
    deployment,
    uid,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "poll.py"


async def refused(code: str, call: Awaitable[Any]) -> RequestError:
    with pytest.raises(RequestError) as info:
        await call
    assert info.value.code == code, info.value
    return info.value


class Events:
    """The events (edit, recall, react/unreact) an IMClient gets, in order."""

    def __init__(self, im: IMClient) -> None:
        self.got: list[ChatMessage] = []
        self._changed = asyncio.Event()
        im.on_edit(self._add)
        im.on_recall(self._add)
        im.on_reaction(self._add)

    def _add(self, m: ChatMessage) -> None:
        self.got.append(m)
        self._changed.set()

    async def wait_for(self, n: int) -> list[ChatMessage]:
        async def arrived() -> None:
            while len(self.got) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(arrived(), WAIT)
        return self.got[:n]


def by_id(page: list[ChatMessage]) -> dict[int, ChatMessage]:
    return {m.msg_id: m for m in page if not m.op}


async def history_of(im: IMClient, peer_id: int = 0, group_id: int = 0) -> dict[int, ChatMessage]:
    return by_id((await im.history(peer_id=peer_id, group_id=group_id)).chat_messages())


@pytest.mark.parametrize("mode", MODES)
async def test_a_device_away_gets_the_edit_the_recall_and_the_reaction(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path, max_versions_per_message=2) as d:
        alice = await d.login(0, "alice", "a1")
        phone = await d.login(1, "bob", "phone")
        laptop = await d.login(0, "bob", "laptop")
        bob = uid(phone)
        inbox = Inbox(laptop)
        first = await alice.send_p2p(bob, "helo bob")
        second = await alice.send_p2p(bob, "a secret")
        assert [m.text for m in await inbox.wait_for(2)] == ["helo bob", "a secret"]
        await laptop.online_users()  # its acks are in
        await laptop.close()
        live = Events(phone)

        edit = await alice.edit(first.msg_id, "hello bob")
        recall = await alice.recall(second.msg_id)
        react = await phone.react(first.msg_id, "👍")
        assert edit.seq == 3 and recall.seq == 4 and react.seq == 5
        # The device online sees the other side's two events live (its own is acked).
        got = await live.wait_for(2)
        assert [(m.op, m.target, m.text) for m in got] == [
            ("edit", first.msg_id, "hello bob"),
            ("recall", second.msg_id, ""),
        ]
        assert got[0].edited_at > 0

        back = await d.connect(0, "laptop")
        away = Events(back)
        await back.login("bob", "secret")
        events = await away.wait_for(3)
        assert [(m.op, m.target) for m in events] == [
            ("edit", first.msg_id),
            ("recall", second.msg_id),
            ("react", first.msg_id),
        ]
        assert events[0].text == "hello bob" and events[2].emoji == "👍"
        assert events[2].sender_id == bob
        # History has the messages as they are now.
        page = await history_of(back, peer_id=uid(alice))
        assert page[first.msg_id].text == "hello bob" and page[first.msg_id].edited_at > 0
        assert page[first.msg_id].reactions == {"👍": [bob]}
        assert page[second.msg_id].recalled and page[second.msg_id].text == ""
        await alice.edit(first.msg_id, "hello bob!")
        await alice.edit(first.msg_id, "hello bob")
        # Only the sender reads the earlier texts (at most max_versions_per_message).
        assert [v["text"] for v in await alice.versions(first.msg_id)] == [
            "hello bob",
            "hello bob!",
        ]
        await refused(codes.FORBIDDEN, back.versions(first.msg_id))
        assert await alice.versions(second.msg_id) == []  # a recall erases them
        if mode == "cluster":  # PostgreSQL: the text cleared in the rows
            con = await asyncpg.connect(request.node.services[0])
            try:
                rows = await con.fetch(
                    "SELECT text, recalled FROM messages WHERE id = $1 OR target = $1",
                    second.msg_id,
                )
                assert sorted((r["text"], r["recalled"]) for r in rows) == [("", 0), ("", 1)]
                assert not await con.fetchval(
                    "SELECT count(*) FROM message_versions WHERE msg_id = $1", second.msg_id
                )
            finally:
                await con.close()
        assert await alice.reactions(first.msg_id) == [
            {"emoji": "👍", "users": [{"id": bob, "name": "bob"}]}
        ]
        await phone.unreact(first.msg_id, "👍")
        assert (await history_of(alice, peer_id=bob))[first.msg_id].reactions == {}


@pytest.mark.parametrize("mode", MODES)
async def test_refusals_each_have_a_code_and_change_nothing(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path, max_reactions_per_message=2) as d:
        alice = await d.login(0, "alice", "a1")
        bob = await d.login(1, "bob", "b1")
        carol = await d.login(0, "carol", "c1")
        sent = await alice.send_p2p(uid(bob), "mine")
        await refused(codes.FORBIDDEN, bob.edit(sent.msg_id, "yours now"))
        await refused(codes.FORBIDDEN, bob.recall(sent.msg_id))
        await refused(codes.NOT_MEMBER, carol.react(sent.msg_id, "👀"))
        await refused(codes.NOT_MEMBER, carol.edit(sent.msg_id, "x"))
        await refused(codes.NOT_MEMBER, carol.reactions(sent.msg_id))
        await refused(codes.NOT_MEMBER, carol.delete_for_me([sent.msg_id]))
        await refused(codes.NOT_FOUND, alice.edit(sent.msg_id + 12345, "x"))
        await refused(codes.INVALID_PACKET, alice.edit(sent.msg_id, ""))
        await refused(codes.INVALID_PACKET, bob.react(sent.msg_id, "a b"))
        await bob.react(sent.msg_id, "1")
        await bob.react(sent.msg_id, "2")
        await refused(codes.TOO_MANY_REACTIONS, bob.react(sent.msg_id, "3"))
        await alice.react(sent.msg_id, "2")  # one already there is no new one
        # Replies and types.
        other = await carol.send_p2p(uid(bob), "elsewhere")
        await refused(codes.NOT_FOUND, bob.send_p2p(uid(alice), "re", reply_to=other.msg_id))
        await refused(codes.BAD_TYPE, bob.send_p2p(uid(alice), "?", type="poll"))
        await refused(
            codes.BAD_FIELDS, bob.send_p2p(uid(alice), "f", type="file", fields={"size": "big"})
        )
        await refused(codes.BAD_FIELDS, bob.send_p2p(uid(alice), "t", fields={"x": 1}))
        page = await history_of(alice, peer_id=uid(bob))
        assert [m.text for m in page.values()] == ["mine"]
        assert page[sent.msg_id].reactions == {"1": [uid(bob)], "2": [uid(bob), uid(alice)]}
        await refused(
            codes.BAD_FIELDS,
            bob.send_p2p(
                uid(alice), "f", type="file", fields={"file_id": "x" * 5000, "name": "a", "size": 1}
            ),
        )
        await alice.block(uid(bob))
        await refused(codes.BLOCKED, bob.react(sent.msg_id, "1"))
        await refused(codes.BLOCKED, alice.edit(sent.msg_id, "blocked"))
        await alice.block(uid(bob), False)
        await alice.recall(sent.msg_id)
        await refused(codes.RECALLED, alice.recall(sent.msg_id))
        await refused(codes.RECALLED, alice.edit(sent.msg_id, "back"))
        await refused(codes.RECALLED, bob.react(sent.msg_id, "1"))


@pytest.mark.parametrize("mode", MODES)
async def test_unread_counts_messages_not_events(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        alice = await d.login(0, "alice", "a1")
        bob = await d.login(1, "bob", "b1")
        one = await alice.send_p2p(uid(bob), "one")
        await alice.edit(one.msg_id, "one!")
        await alice.react(one.msg_id, "🎉")
        two = await alice.send_p2p(uid(bob), "two")
        await alice.recall(two.msg_id)
        three = await alice.send_p2p(uid(bob), "three")
        await alice.react(three.msg_id, "👀")
        entry = (await conversations(bob))[0]
        assert (entry["last_seq"], entry["unread"]) == (7, 3)
        assert entry["last_message"]["msg_id"] == three.msg_id  # a message, not an event
        assert (await conversations(alice))[0]["unread"] == 0  # sending reads
        state = await bob.mark_read(peer_id=uid(alice), seq=one.seq)
        assert state.unread == 2
        state = await bob.mark_read(peer_id=uid(alice), seq=3)  # the react event
        assert state.unread == 2
        page = await history_of(bob, peer_id=uid(alice))
        assert [page[m.msg_id].no for m in (one, two, three)] == [1, 2, 3]
        g = (await alice.create_group("sun")).group_id
        await bob.join_group(g)
        said = await alice.send_group(g, "hey")
        await alice.edit(said.msg_id, "hey!")
        entry = next(c for c in await conversations(bob) if c["group_id"] == g)
        assert entry["unread"] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_windows_come_from_the_settings(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path, edit_window=0, recall_window=0) as d:
        alice = await d.login(0, "alice", "a1")
        bob = await d.login(1, "bob", "b1")
        sent = await alice.send_p2p(uid(bob), "too late")
        await refused(codes.WINDOW_PASSED, alice.edit(sent.msg_id, "fixed"))
        await refused(codes.WINDOW_PASSED, alice.recall(sent.msg_id))
        assert (await history_of(bob, peer_id=uid(alice)))[sent.msg_id].text == "too late"


@pytest.mark.parametrize("mode", MODES)
async def test_groups_replies_mentions_and_admin_recall(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path, recall_window=0) as d:
        owner = await d.login(0, "owner", "o1")
        ann = await d.login(1, "ann", "n1")
        ben = await d.login(0, "ben", "b1")
        g = (await owner.create_group("moon")).group_id
        for im in (ann, ben):
            await im.join_group(g)
        inbox = Inbox(ben)
        said = await ann.send_group(g, "lunch, @ben and @nobody?")
        reply = await owner.send_group(g, "yes", reply_to=said.msg_id)
        got = await inbox.wait_for(2)
        assert got[0].mentions == [uid(ben)]
        assert got[1].reply == {
            "msg_id": said.msg_id,
            "sender_id": uid(ann),
            "sender_name": "ann",
            "snippet": "lunch, @ben and @nobody?",
            "recalled": False,
        }
        entry = next(c for c in await conversations(ben) if c["group_id"] == g)
        assert entry["mentions"] == 1
        await ben.mark_read(group_id=g)
        entry = next(c for c in await conversations(ben) if c["group_id"] == g)
        assert entry["mentions"] == 0
        # A member cannot recall another's message (nor their own after the window);
        # the owner can, any time.
        await refused(codes.FORBIDDEN, ben.recall(said.msg_id))
        await refused(codes.WINDOW_PASSED, ann.recall(said.msg_id))
        await owner.mute(g, uid(ben), 60)
        await refused(codes.MUTED, ben.react(said.msg_id, "🙂"))
        await owner.mute(g, uid(ben), 0)
        # A member who joins later does not see (nor touch) what came before.
        late = await d.login(1, "late", "l1")
        await late.join_group(g)
        await refused(codes.NOT_FOUND, late.react(said.msg_id, "🙂"))
        await owner.recall(said.msg_id)
        page = await history_of(ben, group_id=g)
        assert page[said.msg_id].recalled and page[said.msg_id].text == ""
        assert page[reply.msg_id].reply is not None
        assert page[reply.msg_id].reply["recalled"] and page[reply.msg_id].reply["snippet"] == ""


@pytest.mark.parametrize("mode", MODES)
async def test_delete_for_me_hides_on_the_users_devices_only(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        alice = await d.login(0, "alice", "a1")
        phone = await d.login(1, "bob", "phone")
        laptop = await d.login(0, "bob", "laptop")
        hidden = Pushes(laptop, Hidden)
        one = await alice.send_p2p(uid(phone), "keep")
        two = await alice.send_p2p(uid(phone), "forget")
        await phone.delete_for_me([two.msg_id])
        assert (await hidden.until(lambda p: True)).msg_ids == [two.msg_id]
        assert list(await history_of(laptop, peer_id=uid(alice))) == [one.msg_id]
        entry = (await conversations(laptop))[0]
        assert entry["last_message"]["msg_id"] == one.msg_id  # not the hidden one
        assert set(await history_of(alice, peer_id=uid(phone))) == {one.msg_id, two.msg_id}
        # A new device is told at its login, and is not pushed the hidden message.
        tablet = await d.connect(1, "tablet")
        told = Pushes(tablet, Hidden)
        inbox = Inbox(tablet)
        await tablet.login("bob", "secret")
        assert (await told.until(lambda p: True)).msg_ids == [two.msg_id]
        three = await alice.send_p2p(uid(phone), "after")
        got = await inbox.wait_for(2)
        assert [m.msg_id for m in got] == [one.msg_id, three.msg_id]


async def test_a_recalled_text_is_gone_from_the_database_file_and_its_wal(
    tmp_path: Path,
) -> None:
    secret = "the launch code is 8143-ZEBRA-pancake"
    async with im_server(tmp_path) as server, clients_of(server) as c:
        alice = await c.login("alice")
        bob = await c.login("bob")
        sent = await alice.send_p2p(uid(bob), secret)
        await alice.edit(sent.msg_id, secret + " (v2)")
        files = [Path(server.settings.db_path), Path(server.settings.db_path + "-wal")]
        assert any(secret.encode() in f.read_bytes() for f in files if f.exists())
        await alice.recall(sent.msg_id)
        for f in files:
            if f.exists():
                assert secret.encode() not in f.read_bytes(), f
        page = await history_of(bob, peer_id=uid(alice))
        assert page[sent.msg_id].recalled


async def test_an_application_registers_a_poll_type(tmp_path: Path) -> None:
    from im_helpers import im_settings

    example = runpy.run_path(str(EXAMPLE))
    server = example["poll_server"](im_settings(tmp_path, host="127.0.0.1", port=0))
    async with server, clients_of(server) as c:
        alice = await c.login("alice")
        bob = await c.login("bob")
        inbox = Inbox(bob)
        poll = {"question": "Lunch?", "options": ["pizza", "sushi"]}
        await alice.send_p2p(uid(bob), "Lunch? pizza / sushi", type="poll", fields=poll)
        got = (await inbox.wait_for(1))[0]
        assert (got.type, got.fields, got.text) == (
            "poll",
            {**poll, "multiple": False},
            "Lunch? pizza / sushi",
        )
        await refused(
            codes.BAD_FIELDS, alice.send_p2p(uid(bob), "?", type="poll", fields={"question": 1})
        )
        await refused(
            codes.BAD_FIELDS,
            alice.send_p2p(uid(bob), "?", type="poll", fields={"question": "q", "options": ["a"]}),
        )
        page = (await bob.history(peer_id=uid(alice))).chat_messages()
        assert [(m.type, m.fields) for m in page] == [("poll", {**poll, "multiple": False})]


async def test_mentioned_names() -> None:
    assert mentioned_names("hi @ann, @ben! mail a@b.c @ann") == ["ann", "ben"]
    assert mentioned_names("no one") == []


# -- the upgrade from the previous schema version ----------------------------------------------


async def test_sqlite_upgrades_a_database_of_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    # The step before this one's (other steps may follow it).
    before = next(
        i for i, m in enumerate(store.MIGRATIONS) if isinstance(m, str) and "TABLE reactions" in m
    )
    saved = store.MIGRATIONS[:]
    store.MIGRATIONS[:] = saved[:before]
    try:
        db = await store.open_db(str(path))
        await db.execute(
            "INSERT INTO messages (id, kind, conv, sender_id, sender_name, to_id, text, ts, "
            "client_msg_id, seq, device) VALUES (5, 'p2p', 'p:1:2', 1, 'a', 2, 'old', 0, '', 1, 0)"
        )
        await db.close()
    finally:
        store.MIGRATIONS[:] = saved
    messages = SqliteMessageCenter(str(path))
    await messages.start()
    try:
        old = await messages.target(5)
        assert old is not None and (old.text, old.op, old.type, old.recalled) == (
            "old",
            "",
            "text",
            0,
        )
        assert await messages.versions(5) == []
    finally:
        await messages.close()
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [
            (sql.SCHEMA_VERSION,)
        ]
    finally:
        con.close()


async def test_postgresql_upgrades_a_database_of_the_previous_version(pg_dsn: str) -> None:
    # The step before this one's (other steps may follow it).
    before = next(
        i for i, m in enumerate(pg.MIGRATIONS) if isinstance(m, str) and "TABLE reactions" in m
    )
    con = await asyncpg.connect(pg_dsn)
    try:
        async with con.transaction():
            await pg_schema_at(con, before)
            await con.execute(
                "INSERT INTO messages (id, kind, conv, sender_id, sender_name, to_id, text, ts, "
                "client_msg_id, seq, device) VALUES (5, 'p2p', 'p:1:2', 1, 'a', 2, 'old', 0, '', "
                "1, 0)"
            )
            assert await con.fetchval("SELECT to_regclass('reactions')") is None
    finally:
        await con.close()
    db = PgDatabase(pg_dsn, cluster_settings())
    messages = PgMessageCenter(db)
    await messages.start()
    try:
        old = await messages.target(5)
        assert old is not None and (old.text, old.op, old.type, old.recalled) == (
            "old",
            "",
            "text",
            0,
        )
        async with db.connection() as c:
            assert await c.fetchval("SELECT version FROM schema_version") == sql.SCHEMA_VERSION
    finally:
        await messages.close()


_ = Deployment  # re-exported fixture helpers keep their names
