"""Limits are settings; going over one fails that request and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitchat import RequestError, codes
from bitchat.im.packets import ListOnline
from im_helpers import Inbox, clients_of, im_server


async def test_message_too_long(tmp_path: Path) -> None:
    async with im_server(tmp_path, max_message_length=10) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        inbox = Inbox(houyi)
        gris = await c.login("gris")
        g = await gris.create_group("g")
        await houyi.join_group(g.group_id)
        with pytest.raises(RequestError) as info:
            await gris.send_p2p(1, "x" * 11)
        assert info.value.code == codes.MESSAGE_TOO_LONG
        with pytest.raises(RequestError) as info:
            await gris.send_group(g.group_id, "y" * 11)
        assert info.value.code == codes.MESSAGE_TOO_LONG
        with pytest.raises(RequestError) as info:
            await gris.send_p2p(1, "")
        assert info.value.code == codes.INVALID_PACKET
        await gris.send_p2p(1, "x" * 10)  # at the limit is fine
        await gris.send_group(g.group_id, "é" * 10)  # characters, not bytes
        assert [m.text for m in await inbox.wait_for(2)] == ["x" * 10, "é" * 10]


async def test_group_full(tmp_path: Path) -> None:
    async with im_server(tmp_path, max_group_size=2) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        gris = await c.login("gris")
        chang = await c.login("chang-e")
        g = await houyi.create_group("pair")
        await gris.join_group(g.group_id)
        with pytest.raises(RequestError) as info:
            await chang.join_group(g.group_id)
        assert info.value.code == codes.GROUP_FULL
        assert [m["name"] for m in await houyi.group_members(g.group_id)] == ["houyi", "gris"]
        # A place frees up when someone leaves.
        await gris.leave_group(g.group_id)
        assert (await chang.join_group(g.group_id)).members == 2
        # Other groups are not affected.
        other = await gris.create_group("other")
        assert (await chang.join_group(other.group_id)).members == 2


async def test_rate_limited_per_connection(tmp_path: Path) -> None:
    # A burst of 5 and a refill too slow to matter during the test.
    async with (
        im_server(tmp_path, rate_limit=0.001, rate_burst=5) as server,
        clients_of(server) as c,
    ):
        houyi = await c.login("houyi")  # one token
        inbox = Inbox(houyi)
        gris = await c.login("gris")  # one token of another connection
        for i in range(4):
            await gris.send_p2p(1, f"ok{i}")
        with pytest.raises(RequestError) as info:
            await gris.send_p2p(1, "one too many")
        assert info.value.code == codes.RATE_LIMITED
        with pytest.raises(RequestError) as info:
            await gris.client.request(ListOnline())
        assert info.value.code == codes.RATE_LIMITED
        # The connection stays open, heartbeats still work, and other
        # connections (even of the same user) have their own bucket.
        assert gris.client.connected
        gris2 = await c.login("gris")
        await gris2.send_p2p(1, "from another connection")
        got = await inbox.wait_for(5)
        assert [m.text for m in got] == [f"ok{i}" for i in range(4)] + ["from another connection"]


async def test_groups_per_user(tmp_path: Path) -> None:
    async with im_server(tmp_path, max_groups_per_user=2) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        gris = await c.login("gris")
        a = await houyi.create_group("a")
        b = await gris.create_group("b")
        await houyi.join_group(b.group_id)
        with pytest.raises(RequestError) as info:
            await houyi.create_group("c")
        assert info.value.code == codes.FORBIDDEN
        c3 = await gris.create_group("c")
        with pytest.raises(RequestError) as info:
            await houyi.join_group(c3.group_id)
        assert info.value.code == codes.FORBIDDEN
        assert (await houyi.join_group(a.group_id)).members == 1  # already in: harmless
        await houyi.leave_group(a.group_id)
        assert (await houyi.join_group(c3.group_id)).members == 2
