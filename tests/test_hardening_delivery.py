"""Who gets pushes, through a real standalone server on loopback: a Presence watch
ends with its login, and a retried send reaches the recipients again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bitchat import Ping
from bitchat.im import packets as p
from bitchat.im.client import IMClient
from conftest import WAIT
from im_helpers import Clients, Inbox, clients_of, im_server


class Watch:
    """The Presence pushes one client gets; awaitable by (name, online)."""

    def __init__(self, im: IMClient) -> None:
        self.got: list[tuple[str, bool]] = []
        self._changed = asyncio.Event()
        im.on_presence(self._on)

    def _on(self, x: p.Presence) -> None:
        self.got.append((x.name, x.online))
        self._changed.set()

    async def wait(self, name: str, online: bool) -> None:
        async def seen() -> None:
            while (name, online) not in self.got:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(seen(), WAIT)


async def _presence_reached(witness: Watch, clients: Clients, name: str) -> None:
    """``name`` comes online and ``witness`` is told: every watcher has been pushed to
    (one loop over the watchers), so a round trip on another connection after this
    returns after any Presence the server sent it."""
    await clients.login(name)
    await witness.wait(name, True)


async def test_a_watch_ends_at_logout_and_is_not_inherited(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        steady = await clients.login("steady")
        witness = Watch(steady)
        await steady.online_users(watch=True)

        shared = await clients.login("alice")
        seen = Watch(shared)
        await shared.online_users(watch=True)
        await _presence_reached(witness, clients, "first")
        assert seen.got == [("first", True)]  # the watch works while alice is logged in

        await shared.logout()
        await _presence_reached(witness, clients, "second")
        assert await shared.client.request(Ping()) is not None  # after any push to it
        assert seen.got == [("first", True)]

        # The same connection, now someone else: alice's watch does not carry over.
        await shared.login("mallory", "secret")
        await _presence_reached(witness, clients, "third")
        assert await shared.client.request(Ping()) is not None
        assert seen.got == [("first", True)]

        # A login as another user without a logout in between ends the watch too.
        await shared.online_users(watch=True)
        await shared.login("bob", "secret")
        await _presence_reached(witness, clients, "fourth")
        assert await shared.client.request(Ping()) is not None
        assert seen.got == [("first", True)]

        # Asked again as bob, it works again.
        await shared.online_users(watch=True)
        await _presence_reached(witness, clients, "fifth")
        await seen.wait("fifth", True)
        assert len(server.data["im"].watchers) == 2  # steady and bob, nobody else


async def test_a_retried_send_is_delivered_again(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        sender = await clients.login("sender")
        recipient = await clients.login("recipient")
        assert recipient.user is not None
        inbox = Inbox(recipient)
        raw = await clients.login("recipient", auto_ack=False)  # sees every push, no dedup
        pushed: list[int] = []
        arrived = asyncio.Event()

        def on_push(m: p.ChatMessage) -> None:
            pushed.append(m.msg_id)
            arrived.set()

        raw.client.on(p.ChatMessage, on_push)
        first = await sender.send_p2p(recipient.user.id, "once", client_msg_id="cid-1")
        await asyncio.wait_for(arrived.wait(), WAIT)
        arrived.clear()
        again = await sender.send_p2p(recipient.user.id, "once", client_msg_id="cid-1")
        assert again.duplicate and again.msg_id == first.msg_id
        # The stored message is pushed again to the recipient's connections...
        await asyncio.wait_for(arrived.wait(), WAIT)
        assert pushed == [first.msg_id, first.msg_id]
        # ...and a client that dedups by msg_id shows it once.
        await inbox.wait_for(1)
        assert await recipient.client.request(Ping()) is not None
        assert inbox.texts == ["once"]

        # The same client_msg_id towards someone else is no retry: nothing reaches them.
        other = await clients.login("other")
        assert other.user is not None
        stranger = Inbox(other)
        third = await sender.send_p2p(other.user.id, "once", client_msg_id="cid-1")
        assert third.duplicate and third.msg_id == first.msg_id
        assert await other.client.request(Ping()) is not None  # after any push to it
        assert stranger.messages == []
        assert pushed == [first.msg_id, first.msg_id]
