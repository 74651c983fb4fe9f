"""File and image messages wired to the files: the core's type validators refuse a
message about a file its sender did not upload (or describes wrongly), and the store
writes the file's reference with the message's row, so the conversation's members may
download it at once (no separate step); standalone and cluster, real sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitchat import RequestError, Server
from bitchat.errors import codes
from bitchat.im.client import IMClient
from bitchat.im.packets import SendP2P
from cluster_support import (  # noqa: F401 (fixtures)
    node_maker,
    pg_dsn_fixture,
    redis_prefix_fixture,
)
from im_helpers import clients_of, im_server
from test_files import error, get, png


async def _round(a: Server, b: Server, tmp_path: Path) -> None:
    async with clients_of(a) as on_a, clients_of(b) as on_b:
        alice: IMClient = await on_a.login("alice")
        bob: IMClient = await on_b.login("bob")
        carol: IMClient = await on_b.login("carol")
        assert alice.user and bob.user
        (tmp_path / "dot.png").write_bytes(png(3, 2))
        ack, info = await alice.send_file(str(tmp_path / "dot.png"), to=bob.user.id)
        fid = info["file_id"]
        # The message is stored: bob may download the file and its thumbnail on his node.
        assert (await get(b, bob, f"/api/v1/files/{fid}")).content == png(3, 2)
        assert (await get(b, bob, f"/api/v1/files/{fid}/thumbnail")).status_code == 200
        error(await get(b, carol, f"/api/v1/files/{fid}"), 403, codes.FORBIDDEN)
        # carol may not send a message about alice's file, nor describe a file falsely.
        fields = {"file_id": fid, "name": "dot.png", "size": info["size"]}
        with pytest.raises(RequestError) as refused:
            await carol.client.request(SendP2P(bob.user.id, "[image]", type="image", fields=fields))
        assert refused.value.code == codes.FORBIDDEN
        lie = {**fields, "size": 1}
        with pytest.raises(RequestError) as refused:
            await alice.client.request(SendP2P(bob.user.id, "[image]", type="image", fields=lie))
        assert refused.value.code == codes.BAD_FIELDS
        error(await get(b, carol, f"/api/v1/files/{fid}"), 403, codes.FORBIDDEN)
        assert ack.msg_id


async def test_a_file_message_lets_its_conversation_download_the_file(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server:
        await _round(server, server, tmp_path)


async def test_cluster_a_file_message_stored_on_one_node_opens_the_file_on_another(
    redis_prefix: str, pg_dsn: str, tmp_path: Path
) -> None:
    async with node_maker(redis_prefix, pg_dsn) as make:
        a = await make(1)
        b = await make(2)
        await _round(a, b, tmp_path)
