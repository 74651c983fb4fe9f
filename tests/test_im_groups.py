"""Groups and history through a real server: create, join, leave, list, members,
group messages to online and offline members, history paging."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bitchat import RequestError, codes
from im_helpers import Inbox, clients_of, im_server


async def test_group_lifecycle(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        g = await houyi.create_group("moon")
        assert (g.name, g.owner_id, g.members) == ("moon", 1, 1)

        joined = await gris.join_group(g.group_id)
        assert joined.members == 2
        assert (await gris.join_group(g.group_id)).members == 2  # joining twice is harmless
        assert await gris.my_groups() == [
            {
                "id": g.group_id,
                "name": "moon",
                "owner_id": 1,
                "members": 2,
                "role": "member",
                "invite_only": False,
                "history_visible": False,
            }
        ]
        assert await houyi.group_members(g.group_id) == [
            {
                "id": 1,
                "name": "houyi",
                "online": True,
                "last_seen": None,
                "role": "owner",
                "muted_until": 0,
            },
            {
                "id": 2,
                "name": "gris",
                "online": True,
                "last_seen": None,
                "role": "member",
                "muted_until": 0,
            },
        ]

        chang = await clients.login("chang-e")
        with pytest.raises(RequestError) as info:
            await chang.leave_group(g.group_id)
        assert info.value.code == codes.NOT_MEMBER
        with pytest.raises(RequestError) as info:
            await chang.join_group(999)
        assert info.value.code == codes.NOT_FOUND
        with pytest.raises(RequestError) as info:
            await chang.group_members(999)
        assert info.value.code == codes.NOT_FOUND
        with pytest.raises(RequestError) as info:
            await chang.create_group("   ")
        assert info.value.code == codes.INVALID_PACKET
        assert await chang.my_groups() == []


async def test_group_messages_reach_every_member_offline_ones_at_login(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        chang = await clients.login("chang-e")
        g = await houyi.create_group("moon")
        for member in (gris, chang):
            await member.join_group(g.group_id)
        await chang.close()  # offline member
        in_gris = Inbox(gris)
        in_houyi = Inbox(houyi)

        for i in range(3):
            await houyi.send_group(g.group_id, f"g{i}")
        got = await in_gris.wait_for(3)
        assert [(m.kind, m.to, m.sender_name, m.text) for m in got] == [
            ("group", g.group_id, "houyi", f"g{i}") for i in range(3)
        ]
        await gris.send_group(g.group_id, "from gris")
        [m] = await in_houyi.wait_for(1)
        assert m.text == "from gris"  # the sender's own connection got none of its own

        back = await clients.connect()
        inbox = Inbox(back)
        ok = await back.login("chang-e", "secret")
        assert ok.pending == 4
        assert [m.text for m in await inbox.wait_for(4)] == ["g0", "g1", "g2", "from gris"]

        # Who left gets nothing more; outsiders cannot send.
        await gris.leave_group(g.group_id)
        with pytest.raises(RequestError) as info:
            await gris.send_group(g.group_id, "still here?")
        assert info.value.code == codes.NOT_MEMBER
        with pytest.raises(RequestError) as info:
            await gris.send_group(12345, "nobody")
        assert info.value.code == codes.NOT_FOUND
        await houyi.send_group(g.group_id, "after gris left")
        assert [m.text for m in await inbox.wait_for(5)][-1] == "after gris left"
        await gris.send_p2p(1, "marker")
        await in_houyi.wait_for(2)
        assert in_gris.texts == ["g0", "g1", "g2"]


async def test_group_messages_after_a_restart(tmp_path: Path) -> None:
    """Membership comes from the database, not from a cache of the old process."""
    async with im_server(tmp_path) as first, clients_of(first) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        g = await houyi.create_group("moon")
        await gris.join_group(g.group_id)
    async with im_server(tmp_path) as second, clients_of(second) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        inbox = Inbox(gris)
        await houyi.send_group(g.group_id, "still a group")
        assert [m.text for m in await inbox.wait_for(1)] == ["still a group"]
        assert [x["name"] for x in await gris.my_groups()] == ["moon"]


async def test_history_pages_through_a_conversation(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        sent = []
        for i in range(45):
            sender, to = (gris, 1) if i % 2 else (houyi, 2)
            sent.append((await sender.send_p2p(to, f"h{i}")).msg_id)

        pages = []
        before = 0
        while True:
            page = await houyi.history(peer_id=2, before=before, limit=20)
            pages.append(page)
            if not page.more:
                break
            before = page.messages[-1]["msg_id"]
        assert [len(p.messages) for p in pages] == [20, 20, 5]
        ids = [m.msg_id for p in pages for m in p.chat_messages()]
        assert ids == sorted(sent, reverse=True)  # newest first, no gaps, no repeats
        # Exactly a page left: no promise of more.
        exact = await houyi.history(peer_id=2, before=sent[5], limit=5)
        assert len(exact.messages) == 5 and not exact.more

        # gris sees the same conversation; someone else sees none of it.
        assert (await gris.history(peer_id=1, limit=200)).messages == (
            await houyi.history(peer_id=2, limit=200)
        ).messages
        chang = await clients.login("chang-e")
        assert (await chang.history(peer_id=1)).messages == []
        assert (await chang.history(peer_id=2)).messages == []

        # The page size is capped by the server.
        capped = await houyi.history(peer_id=2, limit=10_000)
        assert len(capped.messages) == 45


async def test_group_history_is_for_members(tmp_path: Path) -> None:
    async with im_server(tmp_path, history_max_page=10) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        gris = await c.login("gris")
        g = await houyi.create_group("moon")
        await gris.join_group(g.group_id)
        await asyncio.gather(*(houyi.send_group(g.group_id, f"x{i}") for i in range(12)))
        page = await gris.history(group_id=g.group_id, limit=50)
        assert len(page.messages) == 10 and page.more
        assert page.messages[0]["text"] == "x11"
        rest = await gris.history(group_id=g.group_id, before=page.messages[-1]["msg_id"])
        assert [m["text"] for m in rest.messages] == ["x1", "x0"] and not rest.more

        chang = await c.login("chang-e")
        with pytest.raises(RequestError) as info:
            await chang.history(group_id=g.group_id)
        assert info.value.code == codes.NOT_MEMBER


async def test_history_of_someone_or_a_group_that_does_not_exist(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        for kw, answer in [({"peer_id": 99}, "no user 99"), ({"group_id": 42}, "no group 42")]:
            with pytest.raises(RequestError) as info:
                await houyi.history(**kw)
            assert (info.value.code, info.value.message) == (codes.NOT_FOUND, answer)
        # A user who exists but never wrote: an empty page, not an error.
        await c.login("gris")
        assert (await houyi.history(peer_id=2)).messages == []
