"""Webhooks: signed deliveries from the outbox to a real HTTP receiver on loopback, in
standalone and cluster mode; retries in order, dead letters, settings, the schema."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitchat import Server, Settings
from bitchat.app import build_server
from bitchat.config import Given, load_settings, merge
from bitchat.errors import ConfigError
from bitchat.im import sql
from bitchat.im.packets import ChatMessage
from bitchat.im.webhook_dispatch import backoff
from bitchat.webhooks import EVENTS, endpoints, sign, verify
from cluster_support import (  # noqa: F401 (fixtures)
    WAIT,
    node_maker,
    pg_dsn_fixture,
    redis_prefix_fixture,
)
from im_helpers import Clients, Inbox, im_settings
from webhook_support import Receiver

SECRET = "whsec-test-0123456789"
FAST = {
    "webhook_secret": SECRET,
    "webhook_backoff_base": 0.02,
    "webhook_backoff_max": 0.1,
    "webhook_poll_interval": 0.05,
    "webhook_timeout": 2.0,
}


# -- signatures -------------------------------------------------------------------------------


def test_a_signature_verifies_with_its_secret_body_and_time_only() -> None:
    body = b'{"id":"e1","type":"message.stored"}'
    header = sign(SECRET, body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body, now=1_700_000_100)
    assert verify(SECRET, header, body.decode(), now=1_700_000_100)
    assert not verify("other", header, body, now=1_700_000_100)
    assert not verify(SECRET, header, body + b" ", now=1_700_000_100)
    assert not verify(SECRET, header, body, now=1_700_000_301)  # too old: a replay
    assert verify(SECRET, header, body, tolerance=0, now=1_800_000_000)
    for bad in ("", "t=x,v1=00", "v1=" + "0" * 64, "t=1700000000", "garbage"):
        assert not verify(SECRET, bad, body, now=1_700_000_000)
    # A rotated secret: either of two signatures is enough.
    both = header + ",v1=" + sign("new", body, 1_700_000_000).split("v1=")[1]
    assert verify("new", both, body, now=1_700_000_000)
    assert verify(SECRET, sign(SECRET, body), body)  # now, by the clock


@given(
    secret=st.text(min_size=1),
    body=st.binary(),
    t=st.integers(0, 2**40),
    flip=st.integers(0, 10**6),
)
def test_any_body_verifies_and_any_changed_byte_does_not(
    secret: str, body: bytes, t: int, flip: int
) -> None:
    header = sign(secret, body, t)
    assert verify(secret, header, body, now=t)
    if body:
        i = flip % len(body)
        changed = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        assert not verify(secret, header, changed, now=t)
    assert not verify(secret + "x", header, body, now=t)


def test_backoff_doubles_with_jitter_up_to_its_maximum() -> None:
    for attempts, full in ((1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0), (500, 60.0)):
        for _ in range(20):
            assert full / 2 <= backoff(attempts, 1.0, 60.0) <= full


# -- settings ---------------------------------------------------------------------------------


def test_endpoints_from_settings_and_config_tables(tmp_path: Path) -> None:
    config = tmp_path / "bitchat.toml"
    config.write_text(
        'webhook_urls = ["http://127.0.0.1:9/a", "https://hooks.example/b"]\n'
        'webhook_secret = "s"\n'
        'webhook_events = ["message.stored", "user.online"]\n'
        "[[webhooks]]\n"
        'url = "http://127.0.0.1:9/c"\n'
        'secret = "own"\n'
        'events = ["group.member_added"]\n'
        "[[webhooks]]\n"
        'url = "http://127.0.0.1:9/d"\n'
    )
    s = load_settings(config=str(config)).settings
    assert s.webhook_urls == ("http://127.0.0.1:9/a", "https://hooks.example/b")
    found = {e.url: e for e in endpoints(s)}
    assert list(found) == [
        "http://127.0.0.1:9/a",
        "https://hooks.example/b",
        "http://127.0.0.1:9/c",
        "http://127.0.0.1:9/d",
    ]
    assert found["http://127.0.0.1:9/a"].events == {"message.stored", "user.online"}
    assert (found["http://127.0.0.1:9/c"].secret, found["http://127.0.0.1:9/c"].events) == (
        "own",
        {"group.member_added"},
    )
    assert found["http://127.0.0.1:9/d"].secret == "s"
    # The environment and the command line take a comma-separated list; empty: all events.
    env = {
        "BITCHAT_WEBHOOK_URLS": "http://127.0.0.1:9/x, http://127.0.0.1:9/y",
        "BITCHAT_WEBHOOK_SECRET": "s",
    }
    s = load_settings(environ=env).settings
    assert s.webhook_urls == ("http://127.0.0.1:9/x", "http://127.0.0.1:9/y")
    assert all(e.events == set(EVENTS) for e in endpoints(s))
    assert endpoints(Settings()) == []


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ('webhook_urls = ["ftp://h/x"]\nwebhook_secret = "s"', "webhook_urls: expected an http"),
        ('webhook_urls = ["http:///x"]\nwebhook_secret = "s"', "webhook_urls: expected an http"),
        ('webhook_urls = ["http://h/x"]', "webhook_urls: the endpoints need webhook_secret"),
        ('webhook_urls = "http://h/x"', "webhook_urls: expected an array of strings"),
        (
            'webhook_urls = ["http://h/x"]\nwebhook_secret = "s"\nwebhook_events = ["nope"]',
            "webhook_events: unknown event 'nope'",
        ),
        ('[[webhooks]]\nurl = "http://h/x"', "webhooks: http://h/x needs a secret"),
        ('[[webhooks]]\nurl = "file:///etc/passwd"\nsecret = "s"', "webhooks: expected an http"),
        ('[[webhooks]]\nurl = "http://h/x"\nsecret = "s"\nsecrte = "t"', "unknown key 'secrte'"),
        (
            '[[webhooks]]\nurl = "http://h/x"\nsecret = "s"\nevents = ["user.away"]',
            "unknown event 'user.away'",
        ),
    ],
)
def test_bad_webhook_settings_are_refused_at_config_time(
    tmp_path: Path, lines: str, problem: str
) -> None:
    config = tmp_path / "bitchat.toml"
    config.write_text(lines + "\n")
    with pytest.raises(ConfigError) as err:
        load_settings(config=str(config))
    assert problem in str(err.value) and str(config) in str(err.value)


def test_message_edits_and_recalls_are_accepted_names() -> None:
    given = {
        "webhook_urls": Given(("http://h/x",), "test"),
        "webhook_secret": Given("s", "test"),
        "webhook_events": Given(("message.edited", "message.recalled"), "test"),
    }
    [e] = endpoints(merge([given]).settings)
    assert e.events == {"message.edited", "message.recalled"}


# -- servers of both modes --------------------------------------------------------------------

Make = Callable[..., Awaitable[Server]]


@pytest.fixture(params=["standalone", "cluster"])
def services(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """The mode, and in cluster mode the test's Redis prefix and database (asked for
    only then: a standalone run needs neither)."""
    if request.param == "cluster":
        return "cluster", request.getfixturevalue("redis_prefix"), request.getfixturevalue("pg_dsn")
    return "standalone", "", ""


@pytest.fixture
async def make(services: tuple[str, str, str], tmp_path: Path) -> AsyncIterator[Make]:
    """``make(node=1, **settings)``: a started server of the test's mode (a cluster
    node: several share one database and Redis), webhooks settings made fast."""
    mode, prefix, dsn = services
    if mode == "standalone":
        servers: list[Server] = []

        async def standalone(node: int = 1, **changes: Any) -> Server:
            assert not servers, "standalone: one server"
            server = build_server(
                im_settings(tmp_path / "data", host="127.0.0.1", port=0, **{**FAST, **changes})
            )
            await server.start()
            servers.append(server)
            return server

        yield standalone
        for server in servers:
            await server.stop()
        return
    async with node_maker(prefix, dsn) as node_of:

        async def cluster(node: int = 1, **changes: Any) -> Server:
            return await node_of(node, **{**FAST, **changes, "rate_limit": 0})  # type: ignore[no-any-return]

        yield cluster


@contextlib.asynccontextmanager
async def clients(server: Server) -> AsyncIterator[Clients]:
    c = Clients(server.address[1], server.settings)
    try:
        yield c
    finally:
        await c.close()


def seqs_by_conversation(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for e in events:
        if e["type"] == "message.stored":
            d = e["data"]
            peers = d["to"] if d["kind"] == "group" else sorted((d["sender_id"], d["to"]))
            key = f"{d['kind']}:{peers}"
            found.setdefault(key, []).append(d["seq"])
    return found


# -- every event, signed ----------------------------------------------------------------------


async def test_every_event_is_delivered_signed(make: Make) -> None:
    async with Receiver() as everything, Receiver() as only_stored:
        server = await make(
            webhook_urls=(everything.url,),
            webhooks=({"url": only_stored.url, "secret": "its-own", "events": ["message.stored"]},),
        )
        async with clients(server) as c:
            alice = await c.login("alice")
            bob = await c.login("bob")
            bob_inbox = Inbox(bob)
            assert alice.user is not None and bob.user is not None
            a, b = alice.user.id, bob.user.id
            ack = await alice.send_p2p(b, "hello bob")
            group = await alice.create_group("team")
            await bob.join_group(group.group_id)
            await bob.send_group(group.group_id, "hi team")
            await bob.leave_group(group.group_id)
            [pushed, *_] = await bob_inbox.wait_for(1)
            await bob.logout()

            expected = {
                "user.online": 2,
                "user.offline": 1,
                "message.stored": 2,
                "group.member_added": 2,
                "group.member_removed": 1,
            }

            def all_there() -> bool:
                types = [e["type"] for e in everything.events()]
                return all(types.count(t) == n for t, n in expected.items())

            await everything.wait_until(all_there)
            await only_stored.wait_until(lambda: len(only_stored.events()) == 2)

        for d in everything.accepted:
            assert d.method == "POST" and d.path == "/hook"
            assert d.headers["content-type"] == "application/json"
            assert verify(SECRET, d.headers["x-bitchat-signature"], d.body)
            assert not verify("its-own", d.headers["x-bitchat-signature"], d.body)
            assert d.headers["x-bitchat-event-id"] == d.event["id"]
            assert d.headers["x-bitchat-event-type"] == d.event["type"]
            assert abs(d.event["created_at"] / 1000 - time.time()) < 60
            assert set(d.event) == {"id", "type", "created_at", "data"}
        for d in only_stored.accepted:
            assert verify("its-own", d.headers["x-bitchat-signature"], d.body)
            assert d.event["type"] == "message.stored"

        events = everything.events()
        by_type: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            by_type.setdefault(e["type"], []).append(e["data"])
        assert {u["user_id"] for u in by_type["user.online"]} == {a, b}
        assert by_type["user.offline"] == [{"user_id": b, "name": "bob"}]
        g = group.group_id
        assert by_type["group.member_added"] == [
            {"group_id": g, "user_id": a, "reason": "created"},
            {"group_id": g, "user_id": b, "reason": "joined"},
        ]
        assert by_type["group.member_removed"] == [{"group_id": g, "user_id": b, "reason": "left"}]
        p2p, grp = by_type["message.stored"]
        # The message as clients see it.
        # (a plain message's body leaves out the fields that keep their defaults)
        assert ChatMessage.from_dict(p2p).to_dict() == {**pushed.to_dict(), "msg_id": ack.msg_id}
        assert p2p["text"] == "hello bob" and p2p["seq"] == 1
        assert (grp["kind"], grp["to"], grp["text"], grp["sender_id"]) == ("group", g, "hi team", b)
        assert len({e["id"] for e in events}) == len(events)
        # One group's events in commit order: created, joined, the message, left.
        order = [
            e["type"] for e in events if e["data"].get("group_id") == g or e["data"].get("to") == g
        ]
        assert order == [
            "group.member_added",
            "group.member_added",
            "message.stored",
            "group.member_removed",
        ]
        metrics = server.metrics.render().decode()
        assert 'bitchat_webhook_deliveries_total{result="delivered"}' in metrics


# -- failures, order, dead letters ------------------------------------------------------------


async def test_edits_and_recalls_are_delivered(make: Make) -> None:
    async with Receiver() as hooks:
        server = await make(
            webhooks=({"url": hooks.url, "events": ["message.edited", "message.recalled"]},),
        )
        async with clients(server) as c:
            alice = await c.login("alice")
            bob = await c.login("bob")
            assert bob.user is not None
            sent = await alice.send_p2p(bob.user.id, "helo")
            edit = await alice.edit(sent.msg_id, "hello")
            await alice.react(sent.msg_id, "👍")  # no webhook
            recall = await alice.recall(sent.msg_id)
            await hooks.wait_until(lambda: len(hooks.events()) == 2)
        edited, recalled = (e for e in hooks.events())
        assert edited["type"] == "message.edited" and recalled["type"] == "message.recalled"
        assert edited["data"]["msg_id"] == edit.msg_id and edited["data"]["target"] == sent.msg_id
        assert edited["data"]["text"] == "hello" and edited["data"]["op"] == "edit"
        assert recalled["data"]["msg_id"] == recall.msg_id and recalled["data"]["text"] == ""


async def test_a_failing_receiver_that_recovers_gets_everything_in_order(make: Make) -> None:
    async with Receiver(status=500) as receiver:
        server = await make(
            webhook_urls=(receiver.url,),
            webhook_events=("message.stored",),
            webhook_max_attempts=1000,
        )
        async with clients(server) as c:
            alice = await c.login("alice")
            bob = await c.login("bob")
            carol = await c.login("carol")
            assert bob.user is not None and carol.user is not None
            for i in range(12):
                await alice.send_p2p(bob.user.id, f"to bob {i}")
                await alice.send_p2p(carol.user.id, f"to carol {i}")
            # Failing: each conversation's first event is tried again and again, alone.
            await receiver.wait_until(lambda: len(receiver.requests) >= 8, what="failures")
            receiver.status = 204
            await receiver.wait_until(lambda: len(receiver.events()) == 24)
        per_conv: dict[str, list[int]] = {}
        for d in receiver.requests:
            data = d.event["data"]
            per_conv.setdefault(str(data["to"]), []).append(data["seq"])
        for seqs in per_conv.values():
            # Never an event sent before the one before it was taken.
            assert seqs == sorted(seqs), seqs
        for seqs in seqs_by_conversation(receiver.events()).values():
            assert seqs == list(range(1, 13))
        assert sum(not d.ok for d in receiver.requests) >= 8
        # A retry is the same event: its id and body, signed again.
        taken = {e["id"]: e for e in receiver.events()}
        for d in receiver.requests:
            assert d.event == taken[d.headers["x-bitchat-event-id"]]
        failed = server.metrics.render().decode()
        assert 'bitchat_webhook_deliveries_total{result="failed"}' in failed


async def test_a_failing_endpoint_holds_back_no_other_endpoint(make: Make) -> None:
    async with Receiver(status=500) as down, Receiver() as up:
        server = await make(
            webhook_urls=(down.url, up.url),
            webhook_events=("message.stored",),
            webhook_max_attempts=1000,
        )
        async with clients(server) as c:
            alice = await c.login("alice")
            bob = await c.login("bob")
            assert bob.user is not None
            for i in range(5):
                await alice.send_p2p(bob.user.id, f"m{i}")
            await up.wait_until(lambda: len(up.events()) == 5)
            await down.wait_until(lambda: len(down.requests) >= 2, what="retries")
            assert not down.accepted
            # Each endpoint's copy of an event has the same id.
            assert {e["id"] for e in up.events()} >= {down.requests[0].event["id"]}
            down.status = 200
            await down.wait_until(lambda: len(down.events()) == 5)
        assert [e["id"] for e in down.events()] == [e["id"] for e in up.events()]


async def test_dead_letters_after_the_last_attempt_then_replayed(make: Make) -> None:
    async with Receiver(status=503) as receiver:
        server = await make(
            webhook_urls=(receiver.url,),
            webhook_events=("message.stored",),
            webhook_max_attempts=3,
        )
        im = server.data["im"]
        died: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def outcome(row: Any, result: str) -> None:
            if result == "dead" and not died.done():
                died.set_result(None)

        im.webhooks.on_outcome = outcome
        async with clients(server) as c:
            alice = await c.login("alice")
            bob = await c.login("bob")
            assert bob.user is not None
            first = await alice.send_p2p(bob.user.id, "never taken")
            await asyncio.wait_for(died, WAIT)
            assert len(receiver.requests) == 3
            store = im.webhooks.store

            async def dead() -> list[Any]:
                return list(await store.dead_letters())

            [letter] = await dead()
            assert (letter.type, letter.attempts, letter.last_error) == (
                "message.stored",
                3,
                "HTTP 503",
            )
            assert json.loads(letter.body)["data"]["msg_id"] == first.msg_id
            assert await store.pending() == 0
            # A dead letter holds back nothing of its conversation.
            receiver.status = 200
            second = await alice.send_p2p(bob.user.id, "taken")
            await receiver.wait_until(lambda: len(receiver.events()) == 1)
            assert receiver.events()[0]["data"]["msg_id"] == second.msg_id
            assert await store.replay() == 1
            im.webhooks.wake()
            await receiver.wait_until(lambda: len(receiver.events()) == 2)
            assert receiver.events()[1]["data"]["msg_id"] == first.msg_id
            assert await dead() == []
        assert 'bitchat_webhook_deliveries_total{result="dead"} 1.0' in (
            server.metrics.render().decode()
        )


async def test_deliveries_under_way_are_bounded_by_the_concurrency(tmp_path: Path) -> None:
    async with Receiver() as receiver:
        receiver.gate = asyncio.Event()
        settings = im_settings(
            tmp_path,
            host="127.0.0.1",
            port=0,
            webhook_urls=(receiver.url,),
            webhook_events=("message.stored",),
            webhook_concurrency=2,
            **FAST,
        )
        async with build_server(settings) as server, clients(server) as c:
            alice = await c.login("alice")
            peers = [await c.login(f"peer{i}") for i in range(6)]
            for peer in peers:  # six conversations: nothing orders one after another
                assert peer.user is not None
                await alice.send_p2p(peer.user.id, "hi")
            await receiver.wait_until(lambda: receiver.waiting == 2, what="2 held")
            db = sqlite3.connect(tmp_path / "bitchat.db")
            try:
                [(leased,)] = db.execute(
                    "SELECT count(*) FROM webhook_outbox WHERE next_at > ?", (time.time(),)
                ).fetchall()
                [(rows,)] = db.execute("SELECT count(*) FROM webhook_outbox").fetchall()
            finally:
                db.close()
            assert (leased, rows) == (2, 6)  # the other four not even claimed
            receiver.gate.set()
            await receiver.wait_until(lambda: len(receiver.events()) == 6)


async def test_an_endpoint_slower_than_the_timeout_fails(tmp_path: Path) -> None:
    async with Receiver() as receiver:
        receiver.gate = asyncio.Event()  # never answers
        settings = im_settings(
            tmp_path,
            host="127.0.0.1",
            port=0,
            webhook_urls=(receiver.url,),
            webhook_events=("message.stored",),
            webhook_max_attempts=2,
            **{**FAST, "webhook_timeout": 0.3},
        )
        async with build_server(settings) as server, clients(server) as c:
            outcomes: asyncio.Queue[str] = asyncio.Queue()
            server.data["im"].webhooks.on_outcome = lambda row, result: outcomes.put_nowait(result)
            alice = await c.login("alice")
            bob = await c.login("bob")
            assert bob.user is not None
            await alice.send_p2p(bob.user.id, "slow")
            assert await asyncio.wait_for(outcomes.get(), WAIT) == "failed"
            assert await asyncio.wait_for(outcomes.get(), WAIT) == "dead"
            [letter] = await server.data["im"].webhooks.store.dead_letters()
            # httpx's read timeout, or the whole delivery's deadline: whichever came first.
            assert letter.last_error.startswith(("ReadTimeout", "no answer within 0.3s"))
            receiver.gate.set()


# -- cluster: shared work, one event per transition --------------------------------------------


async def test_nodes_share_the_outbox_and_presence_is_per_cluster(
    redis_prefix: str, pg_dsn: str
) -> None:
    async with Receiver() as receiver, node_maker(redis_prefix, pg_dsn) as node:
        n1 = await node(1, webhook_urls=(receiver.url,), **FAST)
        n2 = await node(2, webhook_urls=(receiver.url,), **FAST)
        async with clients(n1) as c1, clients(n2) as c2:
            alice = await c1.login("alice", device="phone")
            bob = await c2.login("bob")
            alice_too = await c2.login("alice", device="laptop")  # her second session
            assert alice.user is not None and bob.user is not None
            for i in range(10):
                await alice.send_p2p(bob.user.id, f"a{i}")
                await bob.send_p2p(alice.user.id, f"b{i}")
            await alice_too.close()  # not her last session: no user.offline

            await receiver.wait_until(lambda: len(receiver.events("message.stored")) == 20)
            await alice.close()
            await receiver.wait_until(lambda: len(receiver.events("user.offline")) == 1)
        ids = [e["id"] for e in receiver.events()]
        assert len(ids) == len(set(ids))
        online = [e["data"]["user_id"] for e in receiver.events("user.online")]
        assert sorted(online) == sorted([alice.user.id, bob.user.id])
        assert [e["data"]["user_id"] for e in receiver.events("user.offline")] == [alice.user.id]
        [seqs] = seqs_by_conversation(receiver.events()).values()
        assert seqs == list(range(1, 21))


# -- off: nothing written ---------------------------------------------------------------------


async def test_without_webhooks_nothing_is_written_nor_loaded(tmp_path: Path) -> None:
    server = build_server(im_settings(tmp_path, host="127.0.0.1", port=0))
    async with server:
        im = server.data["im"]
        assert im.webhooks is None and im.messages.outbox is None and im.users.outbox is None
        async with clients(server) as c:
            alice = await c.login("alice")
            bob = await c.login("bob")
            assert bob.user is not None
            await alice.send_p2p(bob.user.id, "hello")
            g = await alice.create_group("g")
            await bob.join_group(g.group_id)
            await bob.leave_group(g.group_id)
    db = sqlite3.connect(tmp_path / "bitchat.db")
    try:
        assert db.execute("SELECT count(*) FROM webhook_outbox").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (1,)
    finally:
        db.close()


# -- the schema -------------------------------------------------------------------------------


async def test_sqlite_upgrades_a_version_6_database(tmp_path: Path) -> None:
    from bitchat.im import sqlite as store

    path = tmp_path / "bitchat.db"
    saved = store.MIGRATIONS[:]
    store.MIGRATIONS[:] = saved[:6]
    try:
        db = await store.open_db(str(path))
        await db.execute(
            "INSERT INTO users (name, name_key, name_shape, password_hash, created_at) "
            "VALUES ('alice', 'alice', 'alice', 'x', 0)"
        )
        await db.close()
    finally:
        store.MIGRATIONS[:] = saved
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(6,)]
        assert not raw.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'webhook_outbox'"
        ).fetchall()
    finally:
        raw.close()
    async with Receiver() as receiver:
        server = build_server(
            im_settings(tmp_path, host="127.0.0.1", port=0, webhook_urls=(receiver.url,), **FAST)
        )
        async with server:
            db = await store.open_db(str(path))
            try:
                [(version,)] = await db.execute_fetchall("SELECT version FROM schema_version")
                assert version == sql.SCHEMA_VERSION == len(store.MIGRATIONS)
            finally:
                await db.close()
            async with clients(server) as c:
                await c.login("bob")  # a new user beside the one from version 6
                await receiver.wait_until(lambda: len(receiver.events("user.online")) == 1)
            assert [u.name for u in (await server.data["im"].users.get_users([1])).values()] == [
                "alice"
            ]


async def test_postgresql_upgrades_a_version_6_database(pg_dsn: str, redis_prefix: str) -> None:
    from bitchat.cluster import pg

    con = await asyncpg.connect(pg_dsn)
    try:
        async with con.transaction():
            await con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            await con.execute("INSERT INTO schema_version VALUES (6)")
            for script in pg.MIGRATIONS[:6]:
                if isinstance(script, str):
                    await con.execute(script)
                else:
                    await script(con)
            assert await con.fetchval("SELECT to_regclass('webhook_outbox')") is None
    finally:
        await con.close()
    async with Receiver() as receiver, node_maker(redis_prefix, pg_dsn) as node:
        server = await node(1, webhook_urls=(receiver.url,), **FAST)
        async with clients(server) as c:
            await c.login("alice")
            await receiver.wait_until(lambda: len(receiver.events("user.online")) == 1)
    con = await asyncpg.connect(pg_dsn)
    try:
        assert await con.fetchval("SELECT version FROM schema_version") == sql.SCHEMA_VERSION
        assert len(pg.MIGRATIONS) == sql.SCHEMA_VERSION
    finally:
        await con.close()


# -- the README's receiver --------------------------------------------------------------------


async def test_the_readme_receiver_verifies_and_prints_events(tmp_path: Path) -> None:
    import re
    import threading
    from http.server import HTTPServer

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Webhooks", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    namespace: dict[str, Any] = {"__name__": "readme_webhooks"}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    loop = asyncio.get_running_loop()
    printed: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    namespace["print"] = lambda *args: loop.call_soon_threadsafe(printed.put_nowait, args)
    http = HTTPServer(("127.0.0.1", 0), namespace["Hook"])
    http.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}/"
        words = " ".join(section.split())
        assert "--webhook-secret the-webhook-secret" in words
        server = build_server(
            im_settings(
                tmp_path,
                host="127.0.0.1",
                port=0,
                webhook_urls=(url,),
                **{**FAST, "webhook_secret": namespace["SECRET"]},
            )
        )
        async with server, clients(server) as c:
            await c.login("houyi")
            line = await asyncio.wait_for(printed.get(), WAIT)
        assert line == ("user.online", {"user_id": 1, "name": "houyi"})
        assert f"prints `{line[0]} {line[1]}`" in words
        # A forged delivery is refused.
        import httpx

        async with httpx.AsyncClient() as h:
            answer = await h.post(url, content=b"{}", headers={"X-Bitchat-Signature": "t=1,v1=0"})
        assert answer.status_code == 400
    finally:
        http.shutdown()
        http.server_close()
        thread.join(WAIT)


def test_settings_with_endpoint_tables_print_as_a_config_that_reads_back(tmp_path: Path) -> None:
    from bitchat.config import to_toml

    tables = (
        {"url": "http://127.0.0.1:9/a", "secret": "s", "events": ["user.online"]},
        {"url": "https://h.example/b", "secret": 'q"uote'},
    )
    s = Settings(webhook_urls=("http://127.0.0.1:9/c",), webhook_secret="t", webhooks=tables)
    config = tmp_path / "out.toml"
    config.write_text(to_toml(s))
    again = load_settings(config=str(config)).settings
    assert again.webhooks == tables and again.webhook_urls == s.webhook_urls


def test_the_readme_config_is_valid(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Webhooks", 1)[1]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match is not None
    config = tmp_path / "bitchat.toml"
    config.write_text(match.group(1))
    found = endpoints(load_settings(config=str(config)).settings)
    assert [(e.url, e.secret) for e in found] == [
        ("https://backend.example/bitchat", "the-webhook-secret"),
        ("https://analytics.example/in", "another-secret"),
    ]
    assert found[1].events == {"user.online", "user.offline"}
