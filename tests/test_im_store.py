"""The standalone SQLite centers on their own: schema and migrations, WAL, group
commit, deduplication, pending and acks, history, tokens, error translation."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bitchat import RequestError, ServiceUnavailable, Settings, codes
from bitchat.im import sqlite as store
from bitchat.im.centers import Message
from bitchat.im.ids import IdGenerator, node_of, timestamp_ms
from bitchat.im.passwords import make_hasher
from bitchat.im.sqlite import SqliteMessageCenter, SqliteUserCenter
from im_helpers import FAST_HASH

HASHER = make_hasher(FAST_HASH["password_hash_time_cost"], FAST_HASH["password_hash_memory_kib"])


def test_default_data_folder() -> None:
    s = Settings()
    assert s.data_dir == "./bitchat-data"
    assert Path(s.db_path) == Path("bitchat-data") / "bitchat.db"
    # Production hashing keeps OWASP's argon2id baseline.
    assert (s.password_hash_time_cost, s.password_hash_memory_kib) == (2, 19 * 1024)


async def test_schema_version_and_migrations(tmp_path: Path, monkeypatch: Any) -> None:
    path = str(tmp_path / "sub" / "folder" / "bitchat.db")  # folders are created
    db = await store.open_db(path)
    try:
        assert (await db.execute_fetchall("PRAGMA journal_mode"))[0][0] == "wal"
        [(version,)] = await db.execute_fetchall("SELECT version FROM schema_version")
        assert version == len(store.MIGRATIONS)
        # Checkpoints every 10,000 WAL pages, as the message writer does.
        assert (await db.execute_fetchall("PRAGMA wal_autocheckpoint"))[0][0] == 10_000
    finally:
        await db.close()

    # Opening again migrates nothing; a new migration is applied once, in order.
    monkeypatch.setattr(
        store, "MIGRATIONS", [*store.MIGRATIONS, "ALTER TABLE users ADD COLUMN nick TEXT"]
    )
    for _ in range(2):
        db = await store.open_db(path)
        try:
            [(version,)] = await db.execute_fetchall("SELECT version FROM schema_version")
            assert version == len(store.MIGRATIONS)
            await db.execute_fetchall("SELECT nick FROM users")
        finally:
            await db.close()


async def test_a_database_that_cannot_open_is_service_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ServiceUnavailable):
        await store.open_db(str(blocker / "bitchat.db"))
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database at all" * 100)
    with pytest.raises(ServiceUnavailable):
        await store.open_db(str(garbage))


async def test_users_tokens_and_groups(tmp_path: Path) -> None:
    users = SqliteUserCenter(str(tmp_path / "b.db"), HASHER)
    await users.start()
    try:
        houyi = await users.register("houyi", "123456")
        with pytest.raises(RequestError) as info:
            await users.register("houyi", "x")
        assert info.value.code == codes.NAME_TAKEN
        assert await users.authenticate("houyi", "123456", False) == houyi
        with pytest.raises(RequestError) as info:
            await users.authenticate("houyi", "wrong", True)
        assert info.value.code == codes.LOGIN_FAILED
        with pytest.raises(RequestError):
            await users.authenticate("nobody", "x", False)
        gris = await users.authenticate("gris", "pw", True)  # auto-registered
        assert gris.id == 2

        # Only a digest of the token is stored.
        token = await users.issue_token(houyi.id, 60, 3)
        assert await users.check_token(token) == (houyi, 3)
        rows = await users.db.execute_fetchall("SELECT digest FROM tokens")
        assert token not in {r[0] for r in rows}
        await users.revoke_token(token)
        assert await users.check_token(token) is None
        expired = await users.issue_token(houyi.id, -1)
        assert await users.check_token(expired) is None
        # The password is stored as an argon2id hash only.
        [(stored,)] = await users.db.execute_fetchall(
            "SELECT password_hash FROM users WHERE id = 1"
        )
        assert stored.startswith("$argon2id$") and "123456" not in stored

        g = await users.create_group(houyi.id, "moon")
        assert (await users.join_group(g.id, gris.id, 2)).members == 2
        with pytest.raises(RequestError) as info:
            await users.join_group(g.id, 3, 2)
        assert info.value.code == codes.GROUP_FULL
        assert await users.group_members(g.id) == [1, 2]
        assert [x.name for x in await users.user_groups(gris.id)] == ["moon"]
        await users.leave_group(g.id, gris.id)
        assert await users.group_members(g.id) == [1]
    finally:
        await users.close()

    # A new process (a fresh center on the same file) sees the same data.
    again = SqliteUserCenter(str(tmp_path / "b.db"), HASHER)
    await again.start()
    try:
        assert again.known_user(2) is not None and again.known_user(2).name == "gris"
        assert await again.group_members(g.id) == [1]
    finally:
        await again.close()


def _msg(
    ids: IdGenerator, sender: int, to: int, text: str, cmid: str = "", device: int = 0
) -> Message:
    return Message(ids.next(), "p2p", sender, f"u{sender}", to, text, 0, cmid, device=device)


async def test_group_commit_batches_and_durability(tmp_path: Path) -> None:
    path = str(tmp_path / "b.db")
    messages = SqliteMessageCenter(path, batch_max=30)
    await messages.start()
    writes: list[int] = []
    original = messages._write_batch

    def counting(db: Any, stores: Any, acks: Any) -> Any:
        writes.append(len(stores))
        return original(db, stores, acks)

    messages._write_batch = counting  # type: ignore[method-assign]
    ids = IdGenerator(0)
    try:
        # 100 stores queued in one go: 4 transactions of at most 30, in order.
        futures = [messages.store(_msg(ids, 2, 1, f"m{i}"), [1]) for i in range(100)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
        assert writes == [30, 30, 30, 10]
        assert [m.text for m, dup in results] == [f"m{i}" for i in range(100)]
        # Resolved means committed: another connection sees every row.
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT count(*) FROM messages").fetchone()[0] == 100
            assert other.execute("SELECT last_seq FROM conversations").fetchall() == [(100,)]
    finally:
        await messages.close()


async def test_dedup_pending_acks_history_and_last_id(tmp_path: Path) -> None:
    messages = SqliteMessageCenter(str(tmp_path / "b.db"))
    await messages.start()
    ids = IdGenerator(5)
    try:
        first, dup = await messages.store(_msg(ids, 2, 1, "hello", "c1"), [1])
        assert not dup
        # A retry (new server id, same sender and client id) gets the original.
        again, dup = await messages.store(_msg(ids, 2, 1, "hello", "c1"), [1])
        assert dup and again.id == first.id and again.text == "hello"
        # In one batch too.
        a, b = await asyncio.gather(
            messages.store(_msg(ids, 2, 1, "x", "c2"), [1]),
            messages.store(_msg(ids, 2, 1, "x", "c2"), [1]),
        )
        assert a[0].id == b[0].id and (a[1], b[1]) == (False, True)
        for i in range(5):
            await messages.store(_msg(ids, 1, 2, f"r{i}", device=7), [2])

        # Device 7 of user 1 misses 2's messages, not those it sent itself.
        assert await messages.count_pending(1, 7) == 2
        pending = await messages.pending(1, 7, 0, 10)
        assert [m.text for m in pending] == ["hello", "x"]
        assert [(m.seq, m.conv) for m in pending] == [(1, "p:1:2"), (2, "p:1:2")]
        assert [m.text for m in await messages.pending(1, 7, pending[0].id, 10)] == ["x"]
        await messages.ack(1, 7, [("p:1:2", pending[0].seq)])
        await messages.ack(2, 7, [("p:1:2", 7)])  # another user's cursor: changes nothing
        assert [m.text for m in await messages.pending(1, 7, 0, 10)] == ["x"]
        # A cursor never moves back.
        await messages.ack(1, 7, [("p:1:2", 0)])
        assert await messages.count_pending(1, 7) == 1
        # Another device of user 1 misses everything, its own user's messages too.
        assert await messages.count_pending(1, 8) == 7
        # Sending moved each sender's read position to their own message.
        (conv,) = await messages.conversations(1, 0, 10)
        assert (conv.peer_id, conv.last_seq, conv.read_seq, conv.unread) == (2, 7, 7, 0)
        assert conv.peer_read_seq == 2 and conv.peer_delivered_seq == 7
        assert conv.last_message is not None and conv.last_message.text == "r4"

        page = await messages.history(1, 2, 0, 0, 4)
        assert [m.text for m in page] == ["r4", "r3", "r2", "r1"]
        page2 = await messages.history(2, 1, 0, page[-1].id, 4)  # either side, same talk
        assert [m.text for m in page2] == ["r0", "x", "hello"]

        last = await messages.last_id(5)
        assert node_of(last) == 5 and last == max(m.id for m in page)
        assert await messages.last_id(6) == 0
        assert abs(timestamp_ms(last) - timestamp_ms(IdGenerator(5).next())) < 60_000
    finally:
        await messages.close()
    with pytest.raises(ServiceUnavailable):
        await messages.store(_msg(ids, 1, 2, "closed"), [2])


def test_ids_are_ordered_and_survive_restarts() -> None:
    gen = IdGenerator(7)
    seq = [gen.next() for _ in range(10_000)]  # more than 4096 in a millisecond
    assert seq == sorted(seq) and len(set(seq)) == len(seq)
    assert {node_of(i) for i in seq} == {7}
    # Seeded with the last id of a previous run, a generator never goes back,
    # even if the clock did.
    future = seq[-1] + (10_000 << 22)
    resumed = IdGenerator(7, future)
    assert resumed.next() > future
    with pytest.raises(ValueError):
        IdGenerator(1024)


def test_the_writer_checkpoints_rarely_but_still_fsyncs(tmp_path: Path) -> None:
    # A checkpoint every 10,000 WAL pages, not SQLite's 1,000 (hot index pages are
    # copied back once per checkpoint); every commit is still fsynced.
    writer = SqliteMessageCenter(str(tmp_path / "b.db"))._connect_writer()
    try:
        assert writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10_000
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        writer.close()


async def test_two_marks_at_once_report_the_newly_read_range_once(tmp_path: Path) -> None:
    messages = SqliteMessageCenter(str(tmp_path / "m.db"))
    await messages.start()
    ids = IdGenerator(1)
    try:
        for i in range(3):
            await messages.store(_msg(ids, 2, 1, f"m{i}"), [1])
        results = await asyncio.gather(*(messages.mark_read(1, "p:1:2", 0) for _ in range(4)))
        assert sorted(r[2] for r in results) == [[], [], [], [2]]
        assert {r[:2] for r in results} == {(3, 3)}
    finally:
        await messages.close()
