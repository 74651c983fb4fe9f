"""Delivery that loses nothing, through a real server and real clients: stored
before the ack, offline messages in order (also across a server restart),
redelivery until acked, retries not duplicated, every connection of a user
pushed, missed messages after a reconnect."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Literal

from bitchat.im.packets import Ack, LoginOk, SendP2P
from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server, pending_of, port_of


async def test_offline_messages_arrive_in_order_at_login(tmp_path: Path) -> None:
    # A small batch: the sync goes out in several batches, paced by drain().
    async with im_server(tmp_path, offline_batch=7) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        await houyi.close()
        gris = await clients.login("gris")
        acks = await asyncio.gather(*(gris.send_p2p(1, f"m{i}") for i in range(30)))
        ids = [a.msg_id for a in acks]
        assert ids == sorted(ids) and len(set(ids)) == 30  # request order is id order

        again = await clients.connect()
        inbox = Inbox(again)
        ok = await again.login("houyi", "secret")
        assert ok.pending == 30
        got = await inbox.wait_for(30)
        assert [m.text for m in got] == [f"m{i}" for i in range(30)]
        assert [m.msg_id for m in got] == ids


async def test_live_messages_during_the_sync_keep_the_order(tmp_path: Path) -> None:
    async with im_server(tmp_path, offline_batch=5) as server, clients_of(server) as clients:
        await (await clients.login("houyi")).close()
        gris = await clients.login("gris")
        await asyncio.gather(*(gris.send_p2p(1, f"old{i}") for i in range(40)))

        houyi = await clients.connect()
        inbox = Inbox(houyi)
        # Messages keep coming while the offline ones are being pushed.
        login = asyncio.ensure_future(houyi.login("houyi", "secret"))
        new = asyncio.gather(*(gris.send_p2p(1, f"new{i}") for i in range(40)))
        await asyncio.gather(login, new)
        got = await inbox.wait_for(80)
        texts = [m.text for m in got]
        assert sorted(texts) == sorted(
            [f"old{i}" for i in range(40)] + [f"new{i}" for i in range(40)]
        )
        assert [m.msg_id for m in got] == sorted(m.msg_id for m in got)
        assert len(inbox.messages) == 80  # nothing twice


async def test_unacked_messages_are_delivered_again(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi", auto_ack=False)
        inbox = Inbox(houyi)
        gris = await clients.login("gris")
        await gris.send_p2p(1, "one")
        await gris.send_p2p(1, "two")
        await inbox.wait_for(2)
        await houyi.close()

        again = await clients.connect(auto_ack=False, device="dev-houyi")
        inbox2 = Inbox(again)
        ok = await again.login("houyi", "secret")
        assert ok.pending == 2
        got = await inbox2.wait_for(2)
        assert [m.text for m in got] == ["one", "two"]
        # An ack (here awaited) clears them for good.
        await again.client.request(Ack([m.msg_id for m in got]))
        await again.close()
        third = await clients.connect(device="dev-houyi")
        assert (await third.login("houyi", "secret")).pending == 0


async def test_auto_ack_clears_pending(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        inbox = Inbox(houyi)
        gris = await clients.login("gris")
        await gris.send_p2p(1, "hi")
        await inbox.wait_for(1)
        # The automatic ack is one-way. A round trip after it means the server has
        # queued it; an empty ack through the store resolves after its commit.
        await houyi.online_users()
        im = server.data["im"]
        await asyncio.wait_for(im.messages.ack(0, 0, []), WAIT)
        assert await pending_of(im, 1, "dev-houyi") == 0


async def test_messages_survive_a_server_restart(tmp_path: Path) -> None:
    async with im_server(tmp_path) as first:
        port = port_of(first)
        async with clients_of(first) as clients:
            houyi = await clients.login("houyi", auto_ack=False)
            got_live = Inbox(houyi)
            gris = await clients.login("gris")
            before = [await gris.send_p2p(1, f"before{i}") for i in range(3)]
            await got_live.wait_for(3)  # pushed, not acked
            await houyi.close()
            await gris.close()
            await first.stop()  # a clean stop; acked sends were durable already

        async with im_server(tmp_path, port=port) as second, clients_of(second) as clients2:
            gris = await clients2.login("gris")
            after = await gris.send_p2p(1, "after")
            assert after.msg_id > before[-1].msg_id  # ids keep growing across restarts
            houyi = await clients2.connect()
            inbox = Inbox(houyi)
            ok = await houyi.login("houyi", "secret")
            assert ok.pending == 4
            got = await inbox.wait_for(4)
            assert [m.text for m in got] == ["before0", "before1", "before2", "after"]
            page = await houyi.history(peer_id=2)
            assert [m["text"] for m in page.messages] == ["after", "before2", "before1", "before0"]


async def test_a_connected_client_follows_the_server_through_a_restart(tmp_path: Path) -> None:
    """The client reconnects, logs in again with its token, and gets what it missed."""
    server = im_server(tmp_path)
    first = await server.__aenter__()
    port = port_of(first)
    async with clients_of(first) as clients:
        houyi = await clients.login("houyi")
        inbox = Inbox(houyi)
        relogged: asyncio.Future[LoginOk] = asyncio.get_running_loop().create_future()

        def on_relogin(ok: LoginOk | None, error: Exception | None) -> None:
            if not relogged.done():
                if ok is not None:
                    relogged.set_result(ok)
                else:
                    relogged.set_exception(error or RuntimeError("no login"))

        houyi.on_relogin(on_relogin)
        await server.__aexit__(None, None, None)

        async with im_server(tmp_path, port=port) as second, clients_of(second) as clients2:
            gris = await clients2.login("gris")
            await gris.send_p2p(1, "while you were away")
            ok = await asyncio.wait_for(relogged, WAIT)
            assert (ok.user_id, ok.name) == (1, "houyi")
            [m] = await inbox.wait_for(1)
            assert (m.text, m.sender_name) == ("while you were away", "gris")
            # And the live path works again.
            await gris.send_p2p(1, "live")
            assert [m.text for m in await inbox.wait_for(2)] == ["while you were away", "live"]


async def test_a_retried_send_is_stored_once(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        inbox = Inbox(houyi)
        gris = await clients.login("gris")
        first = await gris.send_p2p(1, "once", client_msg_id="c-1")
        retry = await gris.send_p2p(1, "once", client_msg_id="c-1")
        assert not first.duplicate and retry.duplicate
        assert retry.msg_id == first.msg_id and retry.client_msg_id == "c-1"

        # Two devices of gris retry the same id at the same moment: one batch.
        gris2 = await clients.login("gris")
        a, b = await asyncio.gather(
            gris.client.request(SendP2P(1, "twice?", "c-2")),
            gris2.client.request(SendP2P(1, "twice?", "c-2")),
        )
        assert a.msg_id == b.msg_id and [a.duplicate, b.duplicate].count(True) == 1

        # The same client id from another sender is another message.
        other = await clients.login("chang-e")
        third = await other.send_p2p(1, "mine", client_msg_id="c-1")
        assert not third.duplicate and third.msg_id != first.msg_id

        await gris.send_p2p(1, "marker")
        got = await inbox.wait_for(4)
        assert [m.text for m in got] == ["once", "twice?", "mine", "marker"]
        page = await houyi.history(peer_id=2)
        assert [m["text"] for m in page.messages] == ["marker", "twice?", "once"]


async def test_a_send_cut_off_by_a_disconnect_is_retried_without_duplicates(
    tmp_path: Path,
) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        inbox = Inbox(houyi)
        gris = await clients.login("gris")
        for i in range(5):
            send = asyncio.ensure_future(gris.send_p2p(1, f"cut{i}"))
            await asyncio.sleep(0)  # one loop step: the request is written, not answered
            proto = gris.client._proto
            assert proto is not None and proto.transport is not None
            proto.transport.abort()  # the answer (if any) is lost; the client retries
            ack = await asyncio.wait_for(send, WAIT)
            assert ack.msg_id
        await gris.send_p2p(1, "end")
        got = await inbox.wait_for(6)
        assert [m.text for m in got] == [f"cut{i}" for i in range(5)] + ["end"]
        page = await houyi.history(peer_id=2)
        assert len(page.messages) == 6


async def test_every_connection_of_a_user_gets_the_push(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        phone = await clients.login("houyi")
        laptop = await clients.login("houyi")
        on_phone, on_laptop = Inbox(phone), Inbox(laptop)
        gris = await clients.login("gris")
        gris_inbox = Inbox(gris)
        assert [u.name for u in await gris.online_users()] == ["houyi", "gris"]

        await gris.send_p2p(1, "to both")
        assert [m.text for m in await on_phone.wait_for(1)] == ["to both"]
        assert [m.text for m in await on_laptop.wait_for(1)] == ["to both"]

        # houyi answers from the phone: gris gets it, and so does the laptop (a copy
        # of what the phone sent); the phone itself does not.
        await phone.send_p2p(2, "from the phone")
        assert [m.text for m in await gris_inbox.wait_for(1)] == ["from the phone"]
        [_, copy] = await on_laptop.wait_for(2)
        assert (copy.text, copy.sender_id, copy.to) == ("from the phone", 1, 2)
        await gris.send_p2p(1, "marker")
        await on_phone.wait_for(2)
        assert on_phone.texts == ["to both", "marker"]


async def test_sending_to_an_unknown_user_fails(tmp_path: Path) -> None:
    from bitchat import RequestError, codes

    async with im_server(tmp_path) as server, clients_of(server) as clients:
        gris = await clients.login("gris")
        try:
            await gris.send_p2p(99, "anyone?")
        except RequestError as exc:
            assert exc.code == codes.NOT_FOUND
        else:
            raise AssertionError("sent to a user that does not exist")
        # The connection goes on; a later send keeps working.
        houyi = await clients.login("houyi")
        inbox = Inbox(houyi)
        await gris.send_p2p(2, "ok")
        assert [m.text for m in await inbox.wait_for(1)] == ["ok"]


async def test_offline_sync_goes_at_the_pace_of_a_slow_reader(tmp_path: Path) -> None:
    """A backlog far over the write hard limit reaches a reader that stalls: the
    sync waits for it (Session.drain) instead of piling everything up in the
    transport and getting the reader disconnected."""
    waiting = asyncio.Event()

    class Writable(asyncio.Event):
        async def wait(self) -> Literal[True]:
            waiting.set()  # the sync is blocked until the reader catches up
            return await super().wait()

    async with (
        im_server(
            tmp_path,
            offline_batch=20,
            write_high_water=16 * 1024,
            write_low_water=4 * 1024,
            write_hard_limit=128 * 1024,
        ) as server,
        clients_of(server) as clients,
    ):
        await (await clients.login("houyi")).close()
        gris = await clients.login("gris")
        text = "x" * 1000
        for start in range(0, 400, 100):
            await asyncio.gather(
                *(gris.send_p2p(1, f"{i}:{text}") for i in range(start, start + 100))
            )
        # A small kernel send buffer, so the backlog cannot hide in it.
        for sock in server._server.sockets:  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted ones inherit
        server.on_session_open.append(lambda s: setattr(s, "_writable", Writable()))

        houyi = await clients.connect()
        inbox = Inbox(houyi)
        states: list[object] = []
        houyi.client.on_state.append(states.append)
        await houyi.login("houyi", "secret")
        proto = houyi.client._proto
        assert proto is not None and proto.transport is not None
        proto.transport.pause_reading()  # the reader stalls

        await asyncio.wait_for(waiting.wait(), WAIT)
        [session] = [s for s in server.sessions.values() if s.user_id == 1]
        assert len(inbox.messages) < 400 and not session.closed
        assert session.link.write_buffer_size() < 128 * 1024

        proto.transport.resume_reading()
        got = await inbox.wait_for(400)
        assert [int(m.text.split(":")[0]) for m in got] == list(range(400))
        assert states == []  # never disconnected
