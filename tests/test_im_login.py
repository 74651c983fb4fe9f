"""IM sessions through a real standalone server: the seed's quick start, register,
login (auto-register, wrong password, tokens), logout, online users, and every
IM request refused before login."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bitchat import Client, RequestError, codes
from bitchat.im import packets as p
from bitchat.im.client import IMClient
from bitchat.im.packets import ChatMessage
from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server, port_of


async def test_quick_start_of_the_article(tmp_path: Path) -> None:
    """houyi and gris log in, -lu lists both with ids, gris sends houyi hello."""
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi", "123456")
        inbox = Inbox(houyi)
        gris = await clients.login("gris", "123456")
        assert houyi.user is not None and gris.user is not None
        assert (houyi.user.id, gris.user.id) == (1, 2)

        online = await gris.online_users()
        assert [(u.name, u.id) for u in online] == [("houyi", 1), ("gris", 2)]

        ack = await gris.send_p2p(houyi.user.id, "hello,houyi")
        assert ack.msg_id > 0 and not ack.duplicate
        [m] = await inbox.wait_for(1)
        assert isinstance(m, ChatMessage)
        assert (m.sender_name, m.sender_id, m.to, m.text, m.kind) == (
            "gris",
            2,
            1,
            "hello,houyi",
            "p2p",
        )
        assert m.msg_id == ack.msg_id


async def test_login_registers_unknown_names_and_checks_passwords(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        first = await clients.connect()
        ok = await first.login("houyi", "123456")
        assert (ok.user_id, ok.name, ok.pending) == (1, "houyi", 0)
        assert ok.token

        other = await clients.connect()
        with pytest.raises(RequestError) as info:
            await other.login("houyi", "wrong")
        assert info.value.code == codes.LOGIN_FAILED
        assert other.user is None
        # The same connection may try again.
        ok2 = await other.login("houyi", "123456")
        assert ok2.user_id == 1 and ok2.token != ok.token

        # Names are Unicode: the article's users may go by their Chinese names.
        hou_yi = await clients.connect()
        assert (await hou_yi.login("后羿", "密码 with spaces")).name == "后羿"
        assert [u.name for u in await hou_yi.online_users()] == ["houyi", "后羿"]


async def test_no_auto_register(tmp_path: Path) -> None:
    async with im_server(tmp_path, auto_register=False) as server, clients_of(server) as c:
        im = await c.connect()
        with pytest.raises(RequestError) as info:
            await im.login("stranger", "123456")
        assert info.value.code == codes.LOGIN_FAILED
        # Registering explicitly still works; then the login does.
        user = await im.register("stranger", "123456")
        assert user.name == "stranger"
        with pytest.raises(RequestError) as taken:
            await im.register("stranger", "other")
        assert taken.value.code == codes.NAME_TAKEN
        ok = await im.login("stranger", "123456")
        assert ok.user_id == user.id


async def test_token_logs_in_and_logout_revokes_it(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        first = await clients.login("houyi", "123456")
        token = first.token
        assert token
        second = await clients.connect()
        ok = await second.login(token=token)
        assert (ok.user_id, ok.name) == (1, "houyi")

        await first.logout()
        third = await clients.connect()
        with pytest.raises(RequestError) as info:
            await third.login(token=token)
        assert info.value.code == codes.LOGIN_FAILED
        with pytest.raises(RequestError) as bad:
            await third.login(token="not-a-token")
        assert bad.value.code == codes.LOGIN_FAILED


@pytest.mark.parametrize(
    ("name", "password"),
    [
        ("", "x"),
        ("with space", "x"),
        ("x" * 33, "x"),
        ("ok", ""),
        ("ok", "p" * 257),
        ("tab\tname", "x"),
    ],
)
async def test_bad_names_and_passwords_are_refused(
    tmp_path: Path, name: str, password: str
) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        im = await clients.connect()
        with pytest.raises(RequestError) as info:
            await im.login(name, password)
        assert info.value.code == codes.INVALID_PACKET


async def test_online_users_follow_logins_logouts_and_disconnects(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        presence: list[p.Presence] = []
        seen = asyncio.Event()

        def on_presence(x: p.Presence) -> None:
            presence.append(x)
            seen.set()

        houyi.on_presence(on_presence)
        await houyi.online_users(watch=True)
        await gris.logout()
        await asyncio.wait_for(seen.wait(), WAIT)
        assert [u.name for u in await houyi.online_users()] == ["houyi"]
        assert (presence[0].name, presence[0].online) == ("gris", False)

        # A second connection of gris, then closing it: offline again.
        seen.clear()
        gris2 = await clients.login("gris")
        await asyncio.wait_for(seen.wait(), WAIT)
        assert (presence[-1].name, presence[-1].online) == ("gris", True)
        seen.clear()
        await gris2.close()
        await asyncio.wait_for(seen.wait(), WAIT)
        assert (presence[-1].name, presence[-1].online) == ("gris", False)
        assert [u.name for u in await houyi.online_users()] == ["houyi"]


# Every IM request but Register and Login, with a body that would be valid.
AFTER_LOGIN = [
    p.Logout(),
    p.ListOnline(),
    p.SendP2P(1, "hi"),
    p.SendGroup(1, "hi"),
    p.Ack([1]),
    p.CreateGroup("g"),
    p.JoinGroup(1),
    p.LeaveGroup(1),
    p.MyGroups(),
    p.GroupMembers(1),
    p.History(peer_id=1),
]


async def test_every_im_request_is_refused_before_login(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        await clients.login("houyi")  # a user exists, and a message could go to it
        async with Client("127.0.0.1", port_of(server), server.settings) as anon:
            for packet in AFTER_LOGIN:
                with pytest.raises(RequestError) as info:
                    await anon.request(packet)
                assert info.value.code == codes.UNAUTHENTICATED, packet
            # A failed login does not open the door either.
            with pytest.raises(RequestError):
                await anon.request(p.Login("houyi", "wrong"))
            with pytest.raises(RequestError) as info:
                await anon.request(p.ListOnline())
            assert info.value.code == codes.UNAUTHENTICATED
            # After a logout, the connection is anonymous again.
            await anon.request(p.Login("anon", "pw"))
            await anon.request(p.Logout())
            with pytest.raises(RequestError) as info:
                await anon.request(p.SendP2P(1, "hi"))
            assert info.value.code == codes.UNAUTHENTICATED
        # Nothing was stored for houyi.
        houyi2 = IMClient("127.0.0.1", port_of(server), server.settings)
        clients.opened.append(houyi2)
        await houyi2.connect(WAIT)
        ok = await houyi2.login("houyi", "secret")
        assert ok.pending == 0
