"""Typing notifications on a real standalone server: one-to-one and in a group, the
rate limit, the stops that logouts, disconnects and messages make, and expiry.

Nothing is stored; whether an event was dropped is checked against a later push
on the same connection (a chat message, or a stop), which the server sends after
anything it would have relayed before it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bitchat import RequestError, UsageError, codes
from bitchat.im.client import IMClient
from bitchat.im.packets import Typing, TypingEvent
from bitchat.im.typing_relay import TYPING_KEY
from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server


class Typings:
    """The TypingEvents one client gets, in order."""

    def __init__(self, im: IMClient) -> None:
        self.got: list[TypingEvent] = []
        self._read = 0
        self._changed = asyncio.Event()
        im.on_typing(self._add)

    def _add(self, e: TypingEvent) -> None:
        self.got.append(e)
        self._changed.set()

    async def count(self, n: int) -> list[TypingEvent]:
        """The first ``n`` events, once they have arrived."""

        async def arrived() -> None:
            while len(self.got) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(arrived(), WAIT)
        return self.got[:n]

    async def next(self) -> TypingEvent:
        """The event after the one ``next`` returned last."""
        self._read += 1
        return (await self.count(self._read))[-1]

    @property
    def states(self) -> list[bool]:
        return [e.typing for e in self.got]


def uid(im: IMClient) -> int:
    assert im.user is not None
    return im.user.id


async def test_one_to_one_typing_and_stop(tmp_path: Path) -> None:
    async with im_server(tmp_path, typing_timeout=3.0) as server, clients_of(server) as c:
        alice = await c.login("alice")
        alice_phone = await c.login("alice")
        bob = await c.login("bob")
        at_bob, at_phone = Typings(bob), Typings(alice_phone)
        phone_inbox, bob_inbox = Inbox(alice_phone), Inbox(bob)

        await alice.typing(to=uid(bob))
        e = await at_bob.next()
        assert (e.user_id, e.name, e.to, e.group_id) == (uid(alice), "alice", uid(bob), 0)
        assert e.typing is True and e.expires_in == 3.0
        await alice.typing(to=uid(bob), typing=False)
        e = await at_bob.next()
        assert e.typing is False and e.user_id == uid(alice)

        # The typer's own other devices are not told: the message after it shows up first.
        await alice.send_p2p(uid(bob), "done")
        await phone_inbox.wait_for(1)
        assert at_phone.got == []

        # As a request it is answered; a stop when nothing is on is not relayed.
        await alice.client.request(Typing(to=uid(bob), typing=False))
        await alice.send_p2p(uid(bob), "marker")
        await bob_inbox.wait_for(2)
        assert at_bob.states == [True, False]


async def test_group_typing_reaches_every_other_member(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        alice, bob, carol = [await c.login(n) for n in ("alice", "bob", "carol")]
        carol_phone = await c.login("carol")
        g = await alice.create_group("team")
        await bob.join_group(g.group_id)
        await carol.join_group(g.group_id)
        seen = {im: Typings(im) for im in (alice, bob, carol, carol_phone)}
        alice_inbox = Inbox(alice)

        await bob.typing(group_id=g.group_id)
        for im in (alice, carol, carol_phone):
            e = await seen[im].next()
            assert (e.user_id, e.name, e.to, e.group_id, e.typing) == (
                uid(bob),
                "bob",
                0,
                g.group_id,
                True,
            )
        await bob.send_group(g.group_id, "marker")
        await alice_inbox.wait_for(1)
        assert seen[bob].got == [] and len(seen[alice].got) == 1
        await alice.typing(group_id=g.group_id)
        assert (await seen[bob].next()).user_id == uid(alice)


async def test_typing_refusals(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        alice, dave = await c.login("alice"), await c.login("dave")
        g = await alice.create_group("team")
        for packet, code in (
            (Typing(to=99_999), codes.NOT_FOUND),
            (Typing(group_id=g.group_id + 1000), codes.NOT_FOUND),
            (Typing(group_id=g.group_id), codes.NOT_MEMBER),
            (Typing(), codes.INVALID_PACKET),
            (Typing(to=uid(alice), group_id=g.group_id), codes.INVALID_PACKET),
            (Typing(to=uid(dave)), codes.INVALID_PACKET),  # to yourself
        ):
            with pytest.raises(RequestError) as err:
                await dave.client.request(packet)
            assert err.value.code == code, packet
        # And before login, nothing is relayed (the login gate).
        fresh = await c.connect()
        with pytest.raises(RequestError) as err:
            await fresh.client.request(Typing(to=uid(alice)))
        assert err.value.code == codes.UNAUTHENTICATED


async def test_repeats_within_the_interval_are_dropped(tmp_path: Path) -> None:
    async with im_server(tmp_path, typing_interval=30.0) as server, clients_of(server) as c:
        alice, bob = await c.login("alice"), await c.login("bob")
        at_bob, inbox = Typings(bob), Inbox(bob)
        for _ in range(20):  # a client typing far too often: all one-way
            await alice.typing(to=uid(bob))
        await alice.typing(to=uid(bob), typing=False)  # a stop always goes through
        await alice.typing(to=uid(bob))  # a start right after a stop: flapping, dropped
        await alice.client.request(Typing(to=uid(bob)))  # dropped silently, still answered
        await alice.send_p2p(uid(bob), "marker")
        await inbox.wait_for(1)
        assert at_bob.states == [True, False]

        # A message means stopped: the next start is relayed at once, interval or not.
        await alice.typing(to=uid(bob))
        assert (await at_bob.count(3))[-1].typing is True
        await alice.send_p2p(uid(bob), "again")
        await alice.typing(to=uid(bob))
        assert (await at_bob.count(4))[-1].typing is True
        await alice.send_p2p(uid(bob), "marker 2")
        await inbox.wait_for(3)
        assert at_bob.states == [True, False, True, True]


async def _stops_on(tmp_path: Path, how: str) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        alice, bob, carol = [await c.login(n) for n in ("alice", "bob", "carol")]
        g = await bob.create_group("team")
        await alice.join_group(g.group_id)
        at_bob, at_carol, carol_inbox = Typings(bob), Typings(carol), Inbox(carol)
        alice_id = uid(alice)
        await alice.typing(to=uid(bob))
        await alice.typing(group_id=g.group_id)
        await alice.typing(to=uid(carol))
        await alice.typing(to=uid(carol), typing=False)  # over already: not told again
        assert (await at_bob.next()).typing and (await at_bob.next()).typing
        assert [(await at_carol.next()).typing for _ in range(2)] == [True, False]
        if how == "logout":
            await alice.logout()
        else:
            await alice.close()
        stops = [await at_bob.next(), await at_bob.next()]
        assert sorted((e.to, e.group_id, e.typing) for e in stops) == [
            (0, g.group_id, False),
            (uid(bob), 0, False),
        ]
        assert all(e.user_id == alice_id and e.expires_in == 0 for e in stops)
        await bob.send_p2p(uid(carol), "marker")  # carol got no second stop meanwhile
        await carol_inbox.wait_for(1)
        assert at_carol.states == [True, False]


async def test_disconnect_stops_typing_at_once(tmp_path: Path) -> None:
    await _stops_on(tmp_path, "close")


async def test_logout_stops_typing_at_once(tmp_path: Path) -> None:
    await _stops_on(tmp_path, "logout")


async def test_typing_expires_on_its_own(tmp_path: Path) -> None:
    async with (
        im_server(tmp_path, typing_timeout=0.2, typing_interval=0.0) as server,
        clients_of(server) as c,
    ):
        alice, bob = await c.login("alice"), await c.login("bob")
        at_bob, inbox = Typings(bob), Inbox(bob)
        # The server's own timer (0.2 s) is waited on: its expiry sets an event.
        relay = server.data["im"].typing
        forget, forgotten = relay._forget, asyncio.Event()

        def forget_and_tell(*args: Any) -> None:
            forget(*args)
            forgotten.set()

        relay._forget = forget_and_tell
        await alice.typing(to=uid(bob))
        assert (await at_bob.next()).expires_in == 0.2
        session = next(s for s in server.sessions.values() if s.user_id == uid(alice))
        assert TYPING_KEY in session.data
        await asyncio.wait_for(forgotten.wait(), WAIT)
        assert TYPING_KEY not in server.sessions[session.id].data
        # Expired: a stop now has nothing to clear (the recipient cleared it already).
        await alice.typing(to=uid(bob), typing=False)
        await alice.send_p2p(uid(bob), "marker")
        await inbox.wait_for(1)
        assert at_bob.states == [True]


async def test_the_client_needs_one_conversation(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        alice = await c.login("alice")
        with pytest.raises(UsageError, match="either to or group_id"):
            await alice.typing()
        with pytest.raises(UsageError):
            await alice.typing(to=1, group_id=1)
