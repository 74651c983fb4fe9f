"""The batching of both SQL message stores (SQLite, and PostgreSQL for real): one row
the database refuses fails alone, and acks are written a bounded number per
transaction, never ahead of the messages queued with them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bitchat import RequestError, codes
from bitchat.cluster.pg import PgDatabase, PgMessageCenter
from bitchat.im.centers import AckJob, Message, MessageCenter, take_acks
from bitchat.im.ids import IdGenerator
from bitchat.im.sqlite import SqliteMessageCenter
from cluster_support import cluster_settings, pg_dsn_fixture  # noqa: F401 (fixtures)
from conftest import WAIT


@contextlib.asynccontextmanager
async def opened(center: MessageCenter) -> AsyncIterator[MessageCenter]:
    await center.start()
    try:
        yield center
    finally:
        await center.close()


def sqlite_store(tmp_path: Path) -> MessageCenter:
    return SqliteMessageCenter(str(tmp_path / "m.db"), batch_max=64, ack_batch_max=10)


def pg_store(dsn: str) -> MessageCenter:
    db = PgDatabase(dsn, cluster_settings(), application_name="bitchat-batches")
    return PgMessageCenter(db, batch_max=64, ack_batch_max=10)


def _msg(ids: IdGenerator, text: str, *, to: int = 2, cid: str = "") -> Message:
    return Message(ids.next(), "p2p", 1, "user1", to, text, 1, cid)


async def _outcome(fut: asyncio.Future[Any]) -> Any:
    try:
        return await asyncio.wait_for(fut, WAIT)
    except RequestError as exc:
        return exc


async def test_a_row_sqlite_refuses_fails_alone(tmp_path: Path) -> None:
    async with opened(sqlite_store(tmp_path)) as store:
        await _one_bad_row(store)


async def test_a_row_postgresql_refuses_fails_alone(pg_dsn: str) -> None:
    async with opened(pg_store(pg_dsn)) as store:
        await _one_bad_row(store)


async def _one_bad_row(store: MessageCenter) -> None:
    ids = IdGenerator(1)
    # SQLite refuses a lone surrogate and a 65-bit integer; PostgreSQL refuses U+0000
    # too. All of it queued in one loop iteration: one batch, written in one go.
    bad = [_msg(ids, "\ud800"), _msg(ids, "big", to=1 << 64)]
    if isinstance(store, PgMessageCenter):
        bad += [_msg(ids, "evil\u0000"), _msg(ids, "evil", cid="x\u0000")]
    good = [_msg(ids, f"good {i}", cid=f"c{i}") for i in range(3)]
    batch = [good[0], *bad[:1], good[1], *bad[1:], good[2]]
    called: list[tuple[Any, BaseException | None]] = []
    done = asyncio.Event()
    futures = [store.store(m, [2]) for m in batch[:-1]]

    def then(result: Any, error: BaseException | None) -> None:
        called.append((result, error))
        done.set()

    store.store_then(batch[-1], [2], then)  # the send path's way
    outcomes = [await _outcome(f) for f in futures]
    await asyncio.wait_for(done.wait(), WAIT)
    by_text = {m.text: o for m, o in zip(batch, outcomes, strict=False)}
    for m in bad:
        exc = by_text[m.text]
        assert isinstance(exc, RequestError) and exc.code == codes.INVALID_PACKET, m
        assert "cannot keep this message" in exc.message
    assert by_text["good 0"] == (good[0], False) and by_text["good 1"] == (good[1], False)
    assert called == [((good[2], False), None)]
    pending = await store.pending(2, 1, 0, 100)
    assert [m.text for m in pending] == ["good 0", "good 1", "good 2"]
    # The store goes on as before (a retried good message is still deduplicated).
    again = await store.store(_msg(ids, "good 0", cid="c0"), [2])
    assert again == (good[0], True)
    if isinstance(store, PgMessageCenter):
        assert store.db.health.up


async def test_sqlite_writes_a_bounded_number_of_acks_per_transaction(tmp_path: Path) -> None:
    async with opened(sqlite_store(tmp_path)) as store:
        await _bounded_acks(store)


async def test_postgresql_writes_a_bounded_number_of_acks_per_transaction(pg_dsn: str) -> None:
    async with opened(pg_store(pg_dsn)) as store:
        await _bounded_acks(store)


async def _bounded_acks(store: MessageCenter) -> None:
    ids = IdGenerator(1)
    stored = [await store.store(_msg(ids, f"m{i}"), [2]) for i in range(25)]
    assert [m.seq for m, _ in stored] == list(range(1, 26))
    # A big ack, then a message, in one loop iteration: the message is committed
    # with the first tenth of the ack, not after all of it.
    cursors = [("p:1:2", m.seq) for m, _ in stored] + [(f"p:2:{9000 + i}", 1) for i in range(75)]
    acked = store.ack(2, 1, cursors)  # 100 cursor moves: 10 transactions
    sent = store.store(_msg(ids, "urgent", to=3), [3])
    ack_done_when_sent: list[bool] = []
    sent.add_done_callback(lambda f: ack_done_when_sent.append(acked.done()))
    small = store.ack(3, 1, [])  # an empty ack resolves in its turn too
    await asyncio.wait_for(asyncio.gather(acked, sent, small), WAIT)
    assert ack_done_when_sent == [False]
    assert await store.count_pending(2, 1) == 0
    assert await store.count_pending(2, 2) == 25  # another device of the same user
    assert [m.text for m in await store.pending(3, 1, 0, 10)] == ["urgent"]


def _job(user: int, n: int) -> AckJob:
    cursors = [(f"c{i}", i + 1) for i in range(n)]
    return AckJob(user, 9, cursors, asyncio.get_running_loop().create_future())


async def test_take_acks_splits_jobs_across_transactions() -> None:
    a, b, c = _job(1, 3), _job(2, 5), _job(3, 0)
    jobs = collections.deque([a, b, c])
    flat, done, partial = take_acks(jobs, 4)
    rows = [(1, "c0", 9, 1), (1, "c1", 9, 2), (1, "c2", 9, 3), (2, "c0", 9, 1)]
    assert flat == [v for r in rows for v in r] and done == [a.waiter] and partial is b
    assert list(jobs) == [b, c] and b.pos == 1
    flat, done, partial = take_acks(jobs, 4)
    rows = [(2, f"c{i}", 9, i + 1) for i in range(1, 5)]
    assert flat == [v for r in rows for v in r] and done == [b.waiter] and partial is None
    flat, done, partial = take_acks(jobs, 4)  # the empty job resolves when it is first
    assert flat == [] and done == [c.waiter] and not jobs


async def test_take_acks_keeps_one_row_per_cursor() -> None:
    loop = asyncio.get_running_loop()
    a = AckJob(1, 9, [("c", 5), ("c", 3)], loop.create_future())
    b = AckJob(1, 9, [("c", 7)], loop.create_future())
    flat, done, _ = take_acks(collections.deque([a, b]), 10)
    assert flat == [1, "c", 9, 7] and done == [a.waiter, b.waiter]
