"""Oversized and ill-formed input against a real standalone server: refused at decode
with ``invalid_packet`` (nothing stored, nothing pushed), and an ack flood that
cannot hold up anyone's messages."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bitchat import RequestError, Server, codes
from bitchat.app import build_server
from bitchat.im.sqlite import SqliteMessageCenter
from cluster_support import (  # noqa: F401 (fixtures)
    REDIS_URL,
    cluster_settings,
    pg_dsn_fixture,
    redis_prefix_fixture,
)
from conftest import WAIT, RawPeer
from im_helpers import Inbox, clients_of, im_server, pending_of, port_of

LOGIN, SEND_P2P, SEND_ACK, ACK, CREATE_GROUP, REGISTER, ERROR = 103, 110, 112, 114, 120, 101, 3


async def logged_in_peer(raw_connect: Any, port: int, name: str, ser: int = 1) -> RawPeer:
    peer: RawPeer = await raw_connect(port)
    login = {"name": name, "password": "pw"}
    _, _, type_, _, body = await peer.request(LOGIN, login, rid=1, ser=ser)
    assert type_ == 104, body
    return peer


async def answer(peer: RawPeer, rid: int) -> tuple[int, Any]:
    """The type and body of the answer to request ``rid`` (pushes are skipped)."""
    while True:
        _, _, type_, got, body = await peer.read_frame()
        if got == rid:
            return type_, body


@pytest.mark.parametrize("ser", [1, 2])
async def test_a_huge_client_msg_id_is_refused_before_the_handler(
    tmp_path: Path, raw_connect: Any, ser: int
) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        inbox = Inbox(houyi)
        peer = await logged_in_peer(raw_connect, port_of(server), "mallory", ser)
        body = {"to": 1, "text": "hi", "client_msg_id": "c" * 900_000}
        peer.send_frame(SEND_P2P, body, rid=2, ser=ser)
        type_, err = await answer(peer, 2)
        assert type_ == ERROR and err["code"] == codes.INVALID_PACKET
        assert "max_client_msg_id_length" in err["message"]
        # Neither stored nor pushed; the connection goes on, at the limit it is served.
        fine = {"to": 1, "text": "fine", "client_msg_id": "c" * 64}
        peer.send_frame(SEND_P2P, fine, rid=3, ser=ser)
        type_, ack = await answer(peer, 3)
        assert type_ == SEND_ACK and ack["client_msg_id"] == "c" * 64
        assert [m.text for m in await inbox.wait_for(1)] == ["fine"]
        assert [m.text for m in (await houyi.history(peer_id=2)).chat_messages()] == ["fine"]


async def test_a_huge_token_is_refused_before_any_lookup(tmp_path: Path, raw_connect: Any) -> None:
    async with im_server(tmp_path) as server:
        peer: RawPeer = await raw_connect(port_of(server))
        _, _, type_, _, err = await peer.request(LOGIN, {"token": "t" * 900_000}, rid=1)
        assert type_ == ERROR and err["code"] == codes.INVALID_PACKET
        assert "max_token_length" in err["message"]


@pytest.mark.parametrize("ser", [1, 2])
async def test_nul_is_refused_in_every_string(tmp_path: Path, raw_connect: Any, ser: int) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        inbox = Inbox(houyi)
        peer = await logged_in_peer(raw_connect, port_of(server), "mallory", ser)
        bad = [
            (SEND_P2P, {"to": 1, "text": "evil\u0000"}),
            (SEND_P2P, {"to": 1, "text": "evil", "client_msg_id": "x\u0000"}),
            (CREATE_GROUP, {"name": "evil\u0000"}),
            (REGISTER, {"name": "ev\u0000il", "password": "pw"}),
            (LOGIN, {"name": "mallory", "password": "p\u0000w"}),
        ]
        for rid, (type_, body) in enumerate(bad, start=10):
            peer.send_frame(type_, body, rid=rid, ser=ser)
        for rid, (_, body) in enumerate(bad, start=10):
            got, err = await answer(peer, rid)
            assert got == ERROR and err["code"] == codes.INVALID_PACKET, (body, err)
            assert "U+0000" in err["message"]
        peer.send_frame(SEND_P2P, {"to": 1, "text": "after"}, rid=99, ser=ser)
        assert (await answer(peer, 99))[0] == SEND_ACK
        assert [m.text for m in await inbox.wait_for(1)] == ["after"]
        assert await houyi.my_groups() == []
        assert [m.text for m in (await houyi.history(peer_id=2)).chat_messages()] == ["after"]


async def test_servers_in_one_process_apply_their_own_limits(tmp_path: Path) -> None:
    async with (
        im_server(tmp_path / "a", max_client_msg_id_length=8, max_ack_ids=2) as strict,
        im_server(tmp_path / "b") as lax,
        clients_of(strict) as s,
        clients_of(lax) as x,
    ):
        for c, ok in ((s, False), (x, True)):
            await c.login("houyi")
            gris = await c.login("gris")
            if ok:
                assert (await gris.send_p2p(1, "hi", client_msg_id="c" * 9)).msg_id
            else:
                with pytest.raises(RequestError) as info:
                    await gris.send_p2p(1, "hi", client_msg_id="c" * 9)
                assert info.value.code == codes.INVALID_PACKET
                assert "at most 8 characters" in info.value.message


async def test_an_ack_over_max_ack_ids_is_refused_and_the_client_splits_its_own(
    tmp_path: Path, raw_connect: Any
) -> None:
    async with im_server(tmp_path, max_ack_ids=3) as server, clients_of(server) as c:
        await (await c.login("houyi")).close()  # user 1, offline from now on
        peer = await logged_in_peer(raw_connect, port_of(server), "mallory")
        _, _, type_, _, err = await peer.request(ACK, {"msg_ids": [1, 2, 3, 4]}, rid=2)
        assert type_ == ERROR and err["code"] == codes.INVALID_PACKET
        assert "max_ack_ids" in err["message"]
        # Ten offline messages arrive in one burst; the client acks them in Acks of 3.
        gris = await c.login("gris")
        for i in range(10):
            await gris.send_p2p(1, f"m{i}")
        store = server.data["im"].messages
        acked: list[tuple[list[tuple[str, int]], asyncio.Future[None]]] = []
        all_acked = asyncio.Event()
        ack = store.ack

        def spy(user_id: int, device_id: int, cursors: Sequence[tuple[str, int]]) -> Any:
            fut = ack(user_id, device_id, cursors)
            acked.append((list(cursors), fut))
            if any(seq == 10 for _, seq in cursors):
                all_acked.set()
            return fut

        store.ack = spy
        houyi = await c.connect(device="dev-houyi")
        inbox = Inbox(houyi)
        await houyi.login("houyi", "secret")
        await inbox.wait_for(10)
        await asyncio.wait_for(all_acked.wait(), WAIT)
        await asyncio.wait_for(asyncio.gather(*(f for _, f in acked)), WAIT)
        # Acks of 3, 3, 3 and 1 ids: each moves the conversation's cursor once.
        # (An empty one is the login's: it waits for the acks still queued.)
        assert [c for c, _ in acked if c] == [[("p:1:3", n)] for n in (3, 6, 9, 10)]
        assert await pending_of(server.data["im"], 1, "dev-houyi") == 0


async def test_an_ack_flood_does_not_hold_up_other_senders(
    tmp_path: Path, raw_connect: Any
) -> None:
    # Acks of the most ids allowed, pipelined: 240 transactions' worth of them.
    async with (
        im_server(tmp_path, max_ack_ids=1024, store_batch_max_acks=256) as server,
        clients_of(server) as c,
    ):
        store: SqliteMessageCenter = server.data["im"].messages
        batches: list[tuple[int, int]] = []  # (messages, acked ids) of each transaction
        write = store._write_batch

        def spy(db: Any, stores: Any, acks: list[int]) -> Any:
            batches.append((len(stores), len(acks) // 4))
            return write(db, stores, acks)

        store._write_batch = spy  # type: ignore[method-assign]
        await c.login("houyi", auto_ack=False)
        gris = await c.login("gris")
        mallory = await logged_in_peer(raw_connect, port_of(server), "mallory")
        floods = 60
        for rid in range(10, 10 + floods):
            ids = list(range(rid * 2000, rid * 2000 + 1024))
            mallory.send_frame(ACK, {"msg_ids": ids}, rid=rid)
        ack = await gris.send_p2p(1, "not held up")
        for rid in range(10, 10 + floods):
            assert await answer(mallory, rid) == (100, {})
        assert ack.msg_id
        # Ids never pushed to that connection move no cursor: the flood writes nothing.
        assert sum(a for _, a in batches) == 0 and sum(n for n, _ in batches) == 1


async def test_one_senders_nul_fails_no_one_else_standalone(
    tmp_path: Path, raw_connect: Any
) -> None:
    async with im_server(tmp_path) as server:
        await _nul_among_honest_sends(server, raw_connect)


async def test_one_senders_nul_fails_no_one_else_in_a_cluster(
    redis_prefix: str, pg_dsn: str, raw_connect: Any
) -> None:
    # PostgreSQL cannot store U+0000: it was a failed batch for everyone in it.
    settings = cluster_settings(
        host="127.0.0.1",
        port=0,
        mode="cluster",
        redis_url=REDIS_URL,
        pg_dsn=pg_dsn,
        node_id=1,
        redis_prefix=redis_prefix,
    )
    async with build_server(settings) as node:
        await _nul_among_honest_sends(node, raw_connect)


async def _nul_among_honest_sends(server: Server, raw_connect: Any) -> None:
    async with clients_of(server) as c:
        houyi = await c.login("houyi")
        inbox = Inbox(houyi)
        gris = await c.login("gris")
        mallory = await logged_in_peer(raw_connect, port_of(server), "mallory")
        n = 40
        for rid in range(10, 10 + n):  # pipelined with the honest sends: the same batches
            body = {"to": 1, "text": "evil\u0000", "client_msg_id": f"e{rid}"}
            mallory.send_frame(SEND_P2P, body, rid=rid)
        acks = await asyncio.gather(*(gris.send_p2p(1, f"m{i}") for i in range(n)))
        assert len({a.msg_id for a in acks}) == n
        for rid in range(10, 10 + n):
            type_, err = await answer(mallory, rid)
            assert type_ == ERROR and err["code"] == codes.INVALID_PACKET
        mallory.send_frame(CREATE_GROUP, {"name": "evil\u0000"}, rid=99)
        type_, err = await answer(mallory, 99)
        assert type_ == ERROR and err["code"] == codes.INVALID_PACKET
        assert sorted(m.text for m in await inbox.wait_for(n)) == sorted(f"m{i}" for i in range(n))
