"""``IMClient`` and the sync model on a real standalone server: the conversation
list and its pages, marking read (the answer, the push to the user's other
sessions, the senders' receipts), group receipts, and the device a client keeps
from its first login through every login after a reconnect.

Whether the store has an ack is known from an ``Ack`` sent as a request: its
``Ok`` comes once the store has it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from bitchat import UsageError
from bitchat.im.client import IMClient
from bitchat.im.packets import Ack, ChatMessage, LoginOk, Ok, ReadState, Receipt
from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server

T = TypeVar("T")


class Pushes(Generic[T]):
    """The pushes of one kind a client gets, in order; waits for one that fits."""

    def __init__(self) -> None:
        self.got: list[T] = []
        self._changed = asyncio.Event()

    def __call__(self, packet: T) -> None:
        self.got.append(packet)
        self._changed.set()

    async def until(self, fits: Callable[[T], bool]) -> T:
        """The first push (of all so far, and then of those to come) that ``fits``."""

        async def find() -> T:
            while True:
                for p in self.got:
                    if fits(p):
                        return p
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(find(), WAIT)
        except TimeoutError:
            raise AssertionError(f"no fitting push in {self.got!r}") from None


def uid(im: IMClient) -> int:
    assert im.user is not None
    return im.user.id


async def stored_acks(im: IMClient, messages: list[ChatMessage]) -> None:
    """Ack ``messages`` and return once the store has the acks."""
    assert isinstance(await im.client.request(Ack([m.msg_id for m in messages])), Ok)


def relogins(im: IMClient) -> asyncio.Queue[LoginOk]:
    """The LoginOk of each login after a reconnect (a failed one fails the test)."""
    got: asyncio.Queue[LoginOk] = asyncio.Queue()

    def on_relogin(ok: LoginOk | None, error: Exception | None) -> None:
        assert ok is not None, error
        got.put_nowait(ok)

    im.on_relogin(on_relogin)
    return got


def drop_connection(im: IMClient) -> None:
    """Cut the connection under the client: it reconnects and logs in again."""
    proto = im.client._proto
    assert proto is not None and proto.transport is not None
    proto.transport.abort()


async def test_the_conversation_list_newest_first_in_pages(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        alice = await c.login("alice")
        bob = await c.login("bob")
        inbox = Inbox(alice)
        sent = [await bob.send_p2p(uid(alice), f"p{i}") for i in range(3)]
        moon = await alice.create_group("moon")
        await bob.join_group(moon.group_id)
        for i in range(2):
            await bob.send_group(moon.group_id, f"g{i}")
        await inbox.wait_for(5)

        page = await alice.conversations()
        assert not page.more
        group, p2p = page.conversations
        assert (group["kind"], group["group_id"], group["peer_id"], group["name"]) == (
            "group",
            moon.group_id,
            0,
            "moon",
        )
        assert (group["last_seq"], group["read_seq"], group["unread"]) == (2, 0, 2)
        assert (group["peer_read_seq"], group["peer_delivered_seq"]) == (0, 0)
        assert (group["last_message"]["text"], group["last_message"]["seq"]) == ("g1", 2)
        assert group["activity"] == group["last_message"]["msg_id"]
        assert (p2p["kind"], p2p["peer_id"], p2p["group_id"], p2p["name"]) == (
            "p2p",
            uid(bob),
            0,
            "bob",
        )
        assert (p2p["last_seq"], p2p["read_seq"], p2p["unread"]) == (3, 0, 3)
        assert p2p["peer_read_seq"] == 3  # bob's own messages are read by him
        assert p2p["last_message"]["text"] == "p2"
        assert p2p["activity"] == sent[-1].msg_id
        assert ChatMessage.from_dict(p2p["last_message"]).sender_name == "bob"

        # The sender's side: sending moved his read position, nothing is unread.
        mine = {x["kind"]: x for x in (await bob.conversations()).conversations}
        assert (mine["p2p"]["read_seq"], mine["p2p"]["unread"]) == (3, 0)
        assert (mine["group"]["read_seq"], mine["group"]["unread"]) == (2, 0)

        first = await alice.conversations(limit=1)
        assert first.more and [x["name"] for x in first.conversations] == ["moon"]
        second = await alice.conversations(limit=1, before=first.conversations[0]["activity"])
        assert not second.more and [x["name"] for x in second.conversations] == ["bob"]
        every = [x async for x in alice.all_conversations(page=1)]
        assert [(x["kind"], x["name"]) for x in every] == [("group", "moon"), ("p2p", "bob")]

        # A group without messages is there too, its join the activity: the newest.
        empty = await alice.create_group("empty")
        [top] = (await alice.conversations(limit=1)).conversations
        assert (top["group_id"], top["last_message"], top["unread"]) == (empty.group_id, None, 0)


async def test_mark_read_answers_pushes_and_tells_the_sender(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        laptop = await c.login("alice", device="laptop")
        phone = await c.login("alice", device="phone")
        bob = await c.login("bob")
        at_bob: Pushes[Receipt] = Pushes()
        bob.on_receipt(at_bob)
        at_phone: Pushes[ReadState] = Pushes()
        phone.on_read_state(at_phone)
        at_laptop: Pushes[ReadState] = Pushes()
        laptop.on_read_state(at_laptop)
        inbox = Inbox(laptop)
        for i in range(3):
            await bob.send_p2p(uid(laptop), f"m{i}")
        await inbox.wait_for(3)

        # alice has them on a device: bob hears so.
        r = await at_bob.until(lambda r: r.kind == "delivered" and r.seq == 3)
        assert (r.user_id, r.name, r.group_id) == (uid(laptop), "alice", 0)

        state = await laptop.mark_read(peer_id=uid(bob), seq=2)
        assert (state.peer_id, state.group_id, state.read_seq, state.unread) == (2, 0, 2, 1)
        assert await at_phone.until(lambda s: s.read_seq == 2) == state
        r = await at_bob.until(lambda r: r.kind == "read")
        assert (r.user_id, r.name, r.seq, r.group_id) == (uid(laptop), "alice", 2, 0)

        state = await laptop.mark_read(peer_id=uid(bob))  # seq 0: up to the latest
        assert (state.read_seq, state.unread) == (3, 0)
        await at_bob.until(lambda r: r.kind == "read" and r.seq == 3)
        back = await laptop.mark_read(peer_id=uid(bob), seq=1)  # never back
        assert (back.read_seq, back.unread) == (3, 0)
        assert await at_phone.until(lambda s: s.read_seq == 3) == state

        # The stored state, on both sides.
        [theirs] = (await bob.conversations()).conversations
        assert (theirs["peer_read_seq"], theirs["peer_delivered_seq"]) == (3, 3)
        [mine] = (await laptop.conversations()).conversations
        assert (mine["read_seq"], mine["unread"]) == (3, 0)
        # The session that marked read got answers, never its own push (its later
        # answer would have come after it).
        assert at_laptop.got == []

        with pytest.raises(UsageError):
            await laptop.mark_read()
        with pytest.raises(UsageError):
            await laptop.mark_read(peer_id=2, group_id=1)


async def test_group_receipts_count_members_and_name_readers(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        alice = await c.login("alice", auto_ack=False)
        bob = await c.login("bob")
        carol = await c.login("carol", auto_ack=False)
        at_bob: Pushes[Receipt] = Pushes()
        bob.on_receipt(at_bob)
        moon = await alice.create_group("moon")
        await bob.join_group(moon.group_id)
        await carol.join_group(moon.group_id)
        a_in, c_in = Inbox(alice), Inbox(carol)
        await bob.send_group(moon.group_id, "one")
        await bob.send_group(moon.group_id, "two")
        await stored_acks(alice, await a_in.wait_for(2))
        await stored_acks(carol, await c_in.wait_for(2))

        r = await bob.receipts(moon.group_id, 2)
        assert (r.group_id, r.seq, r.delivered, r.read, r.readers) == (moon.group_id, 2, 2, 0, [])

        state = await alice.mark_read(group_id=moon.group_id)
        assert (state.peer_id, state.group_id, state.read_seq, state.unread) == (
            0,
            moon.group_id,
            2,
            0,
        )
        got = await at_bob.until(lambda r: r.kind == "read")
        assert (got.user_id, got.name, got.seq, got.group_id) == (
            uid(alice),
            "alice",
            2,
            moon.group_id,
        )
        for seq in (1, 2):
            r = await bob.receipts(moon.group_id, seq, who=True)
            assert (r.delivered, r.read) == (2, 1)
            assert r.readers == [
                {"id": uid(alice), "name": "alice", "read": True},
                {"id": uid(carol), "name": "carol", "read": False},
            ]
        # No "delivered" receipts in groups.
        assert [x.kind for x in at_bob.got] == ["read"]


async def test_the_device_is_kept_through_every_login(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        bob = await c.login("bob")
        # No device asked: the server names one, and the client keeps it.
        named = await c.connect()
        ok = await named.login("alice", "secret")
        assert ok.device and named.device == ok.device
        inbox = Inbox(named)
        await bob.send_p2p(ok.user_id, "hello")
        await stored_acks(named, await inbox.wait_for(1))

        # A reconnect logs in with the token, then (the token refused) with the
        # password: the same device both times, which has the message already.
        again = relogins(named)
        drop_connection(named)
        first = await asyncio.wait_for(again.get(), WAIT)
        assert (first.device, first.pending) == (ok.device, 0)
        named.token = "not-a-token-of-this-server"
        drop_connection(named)
        second = await asyncio.wait_for(again.get(), WAIT)
        assert (second.device, second.pending) == (ok.device, 0)
        assert named.device == ok.device and named.token == second.token

        # Another run that keeps the device id is that device; one that does not is
        # a new device and starts at the user's read position (hello is unread).
        same = await c.connect(device=ok.device)
        assert (await same.login("alice", "secret")).pending == 0
        fresh = await c.connect()
        new = await fresh.login("alice", "secret")
        assert new.device != ok.device and new.pending == 1
        # login(device=...) names it for this login and the ones after it.
        asked = await c.connect()
        chosen = await asked.login("alice", "secret", device="desk-1")
        assert chosen.device == "desk-1" == asked.device


async def test_own_messages_from_another_device_are_pushed_and_acked(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        laptop = await c.login("alice", device="laptop")
        phone = await c.login("alice", device="phone")
        bob = await c.login("bob")
        carol = await c.login("carol")
        at_laptop, at_phone = Inbox(laptop), Inbox(phone)
        await laptop.send_p2p(uid(bob), "from the laptop")
        await carol.send_p2p(uid(laptop), "marker")
        # The phone gets the laptop's message (acked by itself), the laptop does not.
        own, marker = await at_phone.wait_for(2)
        assert (own.text, own.sender_id, own.to) == ("from the laptop", uid(laptop), uid(bob))
        assert [m.text for m in await at_laptop.wait_for(1)] == ["marker"]
        # The auto ack of the phone's first message went out before this one.
        await stored_acks(phone, [marker])
        await phone.close()
        again = await c.connect(device="phone")
        ok = await again.login("alice", "secret")
        assert ok.pending == 0, "the phone's own message was not acked"


async def test_messages_pushed_before_any_consumer_wait_for_the_first(tmp_path: Path) -> None:
    """``on_message`` after ``login()``: the login's pushes are kept, unacked, for it."""
    async with im_server(tmp_path) as server, clients_of(server) as c:
        alice = await c.login("alice", device="phone")
        await alice.close()
        bob = await c.login("bob")
        for i in range(3):
            await bob.send_p2p(uid(alice), f"m{i}")

        late = await c.connect(device="phone")
        arrived: Pushes[ChatMessage] = Pushes()
        late.client.on(ChatMessage, arrived)  # under the IMClient: no consumer of its
        ok = await late.login("alice", "secret")
        assert ok.pending == 3
        await arrived.until(lambda m: m.text == "m2")
        # Not acked: the login after a reconnect (which waits for the acks the device
        # sent) counts them again, and the three pushed again are kept once.
        again_ok = relogins(late)
        drop_connection(late)
        assert (await asyncio.wait_for(again_ok.get(), WAIT)).pending == 3
        await _nth(arrived, 6)

        inbox = Inbox(late)  # the first consumer: handed the three at once
        assert [m.text for m in inbox.messages] == ["m0", "m1", "m2"]
        await late.online_users()
        await late.close()
        again = await c.connect(device="phone")
        assert (await again.login("alice", "secret")).pending == 0, "not acked once handed"

        # messages() is a consumer too; a message pushed again while kept comes once.
        await again.close()
        await bob.send_p2p(uid(alice), "m3")
        it = await c.connect(device="phone")
        seen: Pushes[ChatMessage] = Pushes()
        it.client.on(ChatMessage, seen)
        assert (await it.login("alice", "secret")).pending == 1
        await seen.until(lambda m: m.text == "m3")
        it_ok = relogins(it)
        drop_connection(it)
        assert (await asyncio.wait_for(it_ok.get(), WAIT)).pending == 1
        await _nth(seen, 2)
        stream = it.messages()
        first = await asyncio.wait_for(anext(stream), WAIT)
        assert first.text == "m3"
        await bob.send_p2p(uid(alice), "m4")
        assert (await asyncio.wait_for(anext(stream), WAIT)).text == "m4"
        await stream.aclose()


async def _nth(pushes: Pushes[ChatMessage], n: int) -> None:
    await pushes.until(lambda _: len(pushes.got) >= n)


async def test_kept_messages_are_bounded_by_the_dedupe_window(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        alice = await c.login("alice", device="phone")
        await alice.close()
        bob = await c.login("bob")
        for i in range(3):
            await bob.send_p2p(uid(alice), f"m{i}")
        late = await c.connect(device="phone", dedupe_window=2)
        arrived: Pushes[ChatMessage] = Pushes()
        late.client.on(ChatMessage, arrived)
        await late.login("alice", "secret")
        await arrived.until(lambda m: m.text == "m2")
        inbox = Inbox(late)
        # The first two are kept and handed (then acked); the one beyond the window is
        # not kept, nor acked: the cursor stops before it, and the next login has it.
        assert [m.text for m in inbox.messages] == ["m0", "m1"]
        await late.online_users()
        await late.close()
        again = await c.connect(device="phone")
        later = Inbox(again)
        assert (await again.login("alice", "secret")).pending == 1
        assert [m.text for m in await later.wait_for(1)] == ["m2"]
