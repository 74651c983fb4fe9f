"""A send cut off by a dead connection waits for the reconnect and is resent with
the same client message id, so it is stored (and delivered) exactly once.

Real standalone servers on loopback; the connection dies the ways it does in
life: a local abort (what the client's own idle check does), the answer lost
after the server stored the message, the server stopped and started again on
the same port while the send waits.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bitchat import ConnectionClosed, RequestTimeout, State
from bitchat.im.client import IMClient
from conftest import WAIT
from im_helpers import Clients, Inbox, clients_of, im_server, port_of


async def _relogins(im: IMClient) -> asyncio.Queue[str]:
    """One item per automatic login after a reconnect: the user's name, or the error."""
    done: asyncio.Queue[str] = asyncio.Queue()
    im.on_relogin(lambda ok, err: done.put_nowait(ok.name if ok else repr(err)))
    return done


async def _exactly_once(houyi: IMClient, gris: IMClient, inbox: Inbox, text: str) -> None:
    """``text`` reached houyi once and was stored once: a marker sent after it comes
    right behind it, and the conversation holds nothing else."""
    await gris.send_p2p(1, "marker")
    await inbox.wait_for(2)
    assert inbox.texts == [text, "marker"]
    page = await houyi.history(peer_id=2)
    assert [m.text for m in page.chat_messages()] == ["marker", text]


async def test_a_send_right_after_a_local_abort_waits_for_the_reconnect(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        inbox = Inbox(houyi)
        gris = await c.login("gris")
        relogins = await _relogins(gris)
        assert gris.client._proto is not None and gris.client._proto.transport is not None
        gris.client._proto.transport.abort()  # as the idle check does
        ack = await asyncio.wait_for(gris.send_p2p(1, "after the abort"), WAIT)
        assert relogins.get_nowait() == "gris"  # resent once logged in again
        assert not ack.duplicate  # the first try never left
        (m,) = await inbox.wait_for(1)
        assert (m.text, m.msg_id) == ("after the abort", ack.msg_id)
        await _exactly_once(houyi, gris, inbox, "after the abort")


async def test_a_send_whose_answer_was_lost_is_stored_once(tmp_path: Path) -> None:
    """The server stores the message and answers; the connection dies before the
    answer is read. The resend with the same client message id gets the stored
    message back (``duplicate``), and the recipient sees it once."""
    async with im_server(tmp_path) as server:
        quiet = server.settings.replace(heartbeat_interval=0)  # no Pong comes instead
        c = Clients(port_of(server), quiet)
        try:
            houyi = await c.login("houyi")
            inbox = Inbox(houyi)
            gris = await c.login("gris")
            relogins = await _relogins(gris)
            proto = gris.client._proto
            assert proto is not None and proto.transport is not None
            transport = proto.transport

            def lose_the_answer(data: bytes) -> None:
                transport.abort()  # the SendAck is read by nobody

            proto.data_received = lose_the_answer  # type: ignore[method-assign]
            ack = await asyncio.wait_for(gris.send_p2p(1, "answer lost"), WAIT)
            assert relogins.get_nowait() == "gris"
            assert ack.duplicate  # stored the first time; the resend found it
            (m,) = await inbox.wait_for(1)
            assert m.msg_id == ack.msg_id
            await _exactly_once(houyi, gris, inbox, "answer lost")
        finally:
            await c.close()


async def test_a_send_waits_for_a_server_restart_on_the_same_port(tmp_path: Path) -> None:
    first = im_server(tmp_path)
    server = await first.__aenter__()
    port = port_of(server)
    c = Clients(port, server.settings)
    sending: asyncio.Task[object] | None = None
    try:
        houyi = await c.login("houyi")
        inbox = Inbox(houyi)
        gris = await c.login("gris")
        states: asyncio.Queue[State] = asyncio.Queue()
        gris.client.on_state.append(states.put_nowait)
        await first.__aexit__(None, None, None)

        async def reach(state: State) -> None:
            while await states.get() is not state:
                pass

        await asyncio.wait_for(reach(State.DISCONNECTED), WAIT)
        sending = asyncio.create_task(gris.send_p2p(1, "while the server was down"))
        # A reconnect attempt fails meanwhile: the send is still waiting.
        await asyncio.wait_for(reach(State.CONNECTING), WAIT)
        await asyncio.wait_for(reach(State.DISCONNECTED), WAIT)
        assert not sending.done()
        async with im_server(tmp_path, port=port):
            ack = await asyncio.wait_for(sending, WAIT)
            (m,) = await inbox.wait_for(1)  # houyi is back too, and gets it once
            assert (m.text, m.msg_id) == ("while the server was down", ack.msg_id)
            await _exactly_once(houyi, gris, inbox, "while the server was down")
    finally:
        await c.close()
        if sending is not None and not sending.done():
            sending.cancel()


async def test_a_send_gives_up_at_its_timeout_not_at_once(tmp_path: Path) -> None:
    """No server comes back: the send waits for one for its timeout, then fails."""
    first = im_server(tmp_path)
    server = await first.__aenter__()
    c = Clients(port_of(server), server.settings)
    try:
        gris = await c.login("gris")
        await first.__aexit__(None, None, None)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(gris.send_p2p(1, "nobody there", timeout=0.3), WAIT)
        assert loop.time() - started >= 0.3
    finally:
        await c.close()


async def test_without_reconnect_a_send_fails_at_once(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        gris = await c.login("gris", reconnect=False)
        assert gris.client._proto is not None and gris.client._proto.transport is not None
        gris.client._proto.transport.abort()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(gris.send_p2p(1, "no"), WAIT / 2)
