"""Files and images through real sockets, in both modes: uploads (streamed, bounded by
size and quota, their type checked), downloads only by those who may, images'
dimensions and thumbnails, a file uploaded on one cluster node read from another,
an upload's memory, and the stores' upgrade to files."""

from __future__ import annotations

import asyncio
import io
import os
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from bitchat import RequestError, Server
from bitchat.cluster import pg
from bitchat.cluster.pg import PgDatabase
from bitchat.errors import codes
from bitchat.files import FileService, SqliteFileStore, check_name
from bitchat.im import sql
from bitchat.im import sqlite as store
from bitchat.im.centers import conversation
from bitchat.im.client import IMClient
from bitchat.im.files_client import message_fields
from bitchat.im.packets import SendAck, SendGroup, SendP2P
from cluster_support import (  # noqa: F401 (fixtures)
    cluster_settings,
    node_maker,
    pg_dsn_fixture,
    pg_schema_at,
    redis_prefix_fixture,
)
from conftest import WAIT
from im_helpers import Clients, clients_of, im_server, port_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), (200, 30, 30) if mode == "RGB" else None).save(out, "PNG")
    return out.getvalue()


async def send(im: IMClient, info: dict[str, Any], to: int = 0, group_id: int = 0) -> SendAck:
    """Send a file/image message referring to the uploaded ``info``."""
    kind, fields = message_fields(info)
    packet = (
        SendGroup(group_id, f"[{kind}]", type=kind, fields=fields)
        if group_id
        else SendP2P(to, f"[{kind}]", type=kind, fields=fields)
    )
    ack = await im.client.request(packet)
    assert isinstance(ack, SendAck)
    return ack


def files_of(server: Server) -> FileService:
    service: FileService = server.data["files"]
    return service


def base(server: Server) -> str:
    return f"http://127.0.0.1:{port_of(server)}"


def bearer(im: IMClient) -> dict[str, str]:
    assert im.token
    return {"authorization": f"Bearer {im.token}"}


def error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.text


async def post(
    server: Server,
    im: IMClient | None,
    body: Any,
    content_type: str = "text/plain",
    name: str = "a.txt",
) -> httpx.Response:
    headers = {"content-type": content_type, **(bearer(im) if im is not None else {})}
    async with httpx.AsyncClient(base_url=base(server), timeout=WAIT) as http:
        return await http.post(
            "/api/v1/files", params={"name": name}, headers=headers, content=body
        )


async def get(server: Server, im: IMClient | None, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base(server), timeout=WAIT) as http:
        return await http.get(path, headers=bearer(im) if im is not None else {})


def stored_names(tmp_path: Path) -> list[str]:
    """Files under the data folder's files/ (temporary ones included)."""
    root = tmp_path / "files"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with im_server(
        tmp_path, max_file_size=4000, file_quota_per_user=6000, file_chunk_size=4096
    ) as s:
        yield s


@pytest.fixture
async def clients(server: Server) -> AsyncIterator[Clients]:
    async with clients_of(server) as c:
        yield c


# -- uploads and downloads ------------------------------------------------------------------


async def test_upload_then_only_the_uploader_and_the_conversation_may_download(
    server: Server, clients: Clients, tmp_path: Path
) -> None:
    alice, bob, carol = [await clients.login(n) for n in ("alice", "bob", "carol")]
    source = tmp_path / "notes.txt"
    source.write_text("héllo files\n" * 50)
    info = await alice.upload_file(str(source))
    assert info["name"] == "notes.txt" and info["size"] == source.stat().st_size
    assert info["content_type"] == "text/plain" and info["thumbnail"] is False
    fid = info["file_id"]
    saved = await alice.download_file(fid, str(tmp_path / "alice"))
    assert Path(saved).name == "notes.txt" and Path(saved).read_bytes() == source.read_bytes()
    # Not sent to bob yet: refused, and nothing written.
    with pytest.raises(RequestError) as refused:
        await bob.download_file(fid, str(tmp_path / "bob"))
    assert refused.value.code == codes.FORBIDDEN
    assert os.listdir(tmp_path / "bob") == []
    error(await get(server, bob, f"/api/v1/files/{fid}"), 403, codes.FORBIDDEN)
    # A message of alice to bob refers to it: bob may, carol (in no such conversation) not.
    assert alice.user and bob.user
    await send(alice, info, to=bob.user.id)
    saved = await bob.download_file(fid, str(tmp_path / "bob"))
    assert Path(saved).read_bytes() == source.read_bytes()
    again = await bob.download_file(fid, str(tmp_path / "bob"))
    assert Path(again).name == "notes (1).txt"
    error(await get(server, carol, f"/api/v1/files/{fid}"), 403, codes.FORBIDDEN)
    r = await get(server, bob, f"/api/v1/files/{fid}")
    assert r.headers["content-disposition"].startswith("attachment")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    # A group member may once a group message refers to it.
    group = await alice.create_group("team")
    await alice.add_member(group.group_id, carol.user.id if carol.user else 0)
    await send(alice, info, group_id=group.group_id)
    assert (await get(server, carol, f"/api/v1/files/{fid}")).content == source.read_bytes()


async def test_bad_tokens_and_unknown_files(server: Server, clients: Clients) -> None:
    alice = await clients.login("alice")
    error(await post(server, None, b"x"), 401, codes.UNAUTHENTICATED)
    r = await post(server, None, b"x")
    assert r.headers["www-authenticate"].startswith("Bearer")
    async with httpx.AsyncClient(base_url=base(server), timeout=WAIT) as http:
        r = await http.post(
            "/api/v1/files?name=a.txt",
            headers={"authorization": "Bearer not-a-token", "content-type": "text/plain"},
            content=b"x",
        )
    error(r, 401, codes.UNAUTHENTICATED)
    error(await get(server, alice, "/api/v1/files/" + "0" * 32), 404, codes.NOT_FOUND)
    error(await get(server, alice, "/api/v1/files/nope"), 404, codes.NOT_FOUND)
    error(await get(server, None, "/api/v1/files/" + "0" * 32), 401, codes.UNAUTHENTICATED)
    error(await post(server, alice, b"x", name="../etc"), 400, codes.INVALID_PACKET)
    error(await post(server, alice, b"x", name=""), 400, codes.INVALID_PACKET)
    # An API key is not a device token.
    async with httpx.AsyncClient(base_url=base(server), timeout=WAIT) as http:
        r = await http.put("/api/v1/files/" + "0" * 32, headers=bearer(alice))
    error(r, 405, codes.METHOD_NOT_ALLOWED)


async def test_size_limit_and_quota_refuse_and_keep_nothing(
    server: Server, clients: Clients, tmp_path: Path
) -> None:
    alice = await clients.login("alice")
    bob = await clients.login("bob")
    # Over max_file_size (4000): told by Content-Length, or found while streaming.
    error(await post(server, alice, b"a" * 4001), 413, codes.BODY_TOO_LARGE)

    async def chunked(total: int) -> AsyncIterator[bytes]:
        for _ in range(total // 1000):
            yield b"b" * 1000

    error(await post(server, alice, chunked(5000)), 413, codes.BODY_TOO_LARGE)
    assert stored_names(tmp_path) == []
    # The quota (6000): 4000 + 2000 fit, one byte more does not (also when streamed).
    assert (await post(server, alice, b"c" * 4000)).status_code == 201
    assert (await post(server, alice, b"d" * 2000)).status_code == 201
    error(await post(server, alice, b"e"), 413, codes.QUOTA_EXCEEDED)
    error(await post(server, alice, chunked(1000)), 413, codes.QUOTA_EXCEEDED)
    assert len(stored_names(tmp_path)) == 2  # no temporary file left behind
    assert await files_of(server).store.used(alice.user.id if alice.user else 0) == 6000
    # Bob's quota is his own.
    assert (await post(server, bob, b"f" * 4000)).status_code == 201
    # A delete by its uploader (only) gives the room back.
    assert alice.user
    [(first,)] = await files_of(server).store._fetch(
        "SELECT id FROM files WHERE owner_id = :o AND size = 4000", {"o": alice.user.id}
    )
    with pytest.raises(RequestError) as refused:
        await bob.delete_file(first)
    assert refused.value.code == codes.FORBIDDEN
    await alice.delete_file(first)
    error(await get(server, alice, f"/api/v1/files/{first}"), 404, codes.NOT_FOUND)
    with pytest.raises(RequestError) as refused:
        await alice.delete_file(first)
    assert refused.value.code == codes.NOT_FOUND
    assert (await post(server, alice, b"g" * 3000)).status_code == 201
    assert len(stored_names(tmp_path)) == 3  # alice's two, bob's one


async def test_content_type_is_checked_against_the_bytes_and_the_allow_list(
    server: Server, clients: Clients, tmp_path: Path
) -> None:
    alice = await clients.login("alice")
    image = png(8, 8)
    error(await post(server, alice, image, "image/jpeg", "a.jpg"), 415, codes.BAD_CONTENT_TYPE)
    error(await post(server, alice, b"plain text", "image/png"), 415, codes.BAD_CONTENT_TYPE)
    error(await post(server, alice, image, "text/plain"), 415, codes.BAD_CONTENT_TYPE)
    error(await post(server, alice, b"\xff\xfe\x00bad", "text/plain"), 415, codes.BAD_CONTENT_TYPE)
    error(await post(server, alice, b"<html>", "text/html"), 415, codes.BAD_CONTENT_TYPE)
    error(await post(server, alice, b"x", ""), 415, codes.BAD_CONTENT_TYPE)
    assert stored_names(tmp_path) == []
    ok = await post(server, alice, image, "image/png; charset=binary", "a.png")
    assert ok.status_code == 201 and ok.json()["content_type"] == "image/png"
    raw = await post(server, alice, image, "application/octet-stream", "a.bin")
    assert raw.status_code == 201 and raw.json()["width"] == 0  # bytes, not an image


async def test_an_image_gets_its_dimensions_and_a_thumbnail(tmp_path: Path) -> None:
    async with (
        im_server(tmp_path, thumbnail_size=64, max_image_pixels=1_000_000) as server,
        clients_of(server) as clients,
    ):
        alice = await clients.login("alice")
        path = tmp_path / "cat.png"
        path.write_bytes(png(300, 200))
        info = await alice.upload_file(str(path))
        assert (info["width"], info["height"], info["thumbnail"]) == (300, 200, True)
        thumb = await get(server, alice, f"/api/v1/files/{info['file_id']}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(thumb.content)) as img:
            assert img.size == (64, 43)
        full = await get(server, alice, f"/api/v1/files/{info['file_id']}")
        assert full.content == path.read_bytes()
        assert full.headers["content-disposition"].startswith("inline")
        # Transparency stays: a PNG thumbnail.
        clear = await post(server, alice, png(100, 100, "RGBA"), "image/png", "c.png")
        thumb = await get(server, alice, f"/api/v1/files/{clear.json()['file_id']}/thumbnail")
        assert thumb.headers["content-type"] == "image/png"
        assert thumb.content.startswith(PNG_MAGIC)
        # More pixels than max_image_pixels: dimensions from the header, never decoded.
        big = await post(server, alice, png(1100, 1000), "image/png", "big.png")
        assert big.status_code == 201, big.text
        assert (big.json()["width"], big.json()["height"], big.json()["thumbnail"]) == (
            1100,
            1000,
            False,
        )
        no_thumb = await get(server, alice, f"/api/v1/files/{big.json()['file_id']}/thumbnail")
        error(no_thumb, 404, codes.NOT_FOUND)
        # A text file has no thumbnail either; a broken image is kept as bytes.
        broken = await post(server, alice, PNG_MAGIC + b"\x00" * 50, "image/png", "x.png")
        assert broken.status_code == 201 and broken.json()["thumbnail"] is False


def _vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
async def test_a_large_upload_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    size = 96 * 1024 * 1024
    async with (
        im_server(tmp_path, max_file_size=size, file_quota_per_user=size) as server,
        clients_of(server) as clients,
    ):
        alice = await clients.login("alice")
        block = os.urandom(64 * 1024)

        async def body() -> AsyncIterator[bytes]:
            for _ in range(size // len(block)):
                yield block

        # The peak resident size of this process (server and client both) from now on.
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _vm_hwm()
        r = await post(server, alice, body(), "application/octet-stream", "big.bin")
        grown = _vm_hwm() - before
        assert r.status_code == 201 and r.json()["size"] == size
        assert grown < size // 3, f"the upload grew the peak memory by {grown} bytes"
        store_ = files_of(server).store
        assert isinstance(store_, SqliteFileStore)
        assert os.path.getsize(store_.path(r.json()["file_id"])) == size
        # The download streams too.
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _vm_hwm()
        async with (
            httpx.AsyncClient(base_url=base(server), timeout=WAIT) as http,
            http.stream("GET", f"/api/v1/files/{r.json()['file_id']}", headers=bearer(alice)) as s,
        ):
            got = 0
            async for chunk in s.aiter_bytes():
                got += len(chunk)
        assert got == size
        assert _vm_hwm() - before < size // 3


# -- cluster mode ---------------------------------------------------------------------------


async def test_cluster_a_file_uploaded_on_one_node_is_served_by_another(
    redis_prefix: str, pg_dsn: str, tmp_path: Path
) -> None:
    limits = {"max_file_size": 2_000_000, "file_chunk_size": 64 * 1024}
    async with node_maker(redis_prefix, pg_dsn) as make:
        a = await make(1, **limits)
        b = await make(2, **limits)
        await _cluster_round(a, b, tmp_path)


async def _cluster_round(a: Server, b: Server, tmp_path: Path) -> None:
    async with clients_of(a) as on_a, clients_of(b) as on_b:
        alice = await on_a.login("alice")
        bob = await on_b.login("bob")
        carol = await on_b.login("carol")
        source = tmp_path / "photo.png"
        data = png(400, 300)
        source.write_bytes(data + b"")
        info = await alice.upload_file(str(source))
        assert (info["width"], info["height"], info["thumbnail"]) == (400, 300, True)
        blob = os.urandom(300_000)  # several chunk rows
        (tmp_path / "blob.bin").write_bytes(blob)
        raw = await alice.upload_file(str(tmp_path / "blob.bin"))
        error(await get(b, bob, f"/api/v1/files/{info['file_id']}"), 403, codes.FORBIDDEN)
        assert alice.user and bob.user
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        bob.on_message(inbox.put_nowait)
        ack = await send(alice, info, to=bob.user.id)  # checked and recorded on node A
        await send(alice, raw, to=bob.user.id)
        got = await asyncio.wait_for(inbox.get(), WAIT)  # pushed through node B
        assert got.msg_id == ack.msg_id and got.type == "image"
        saved = await bob.download_file(info["file_id"], str(tmp_path / "bob"))
        assert Path(saved).read_bytes() == data
        saved = await bob.download_file(raw["file_id"], str(tmp_path / "bob"))
        assert Path(saved).read_bytes() == blob
        thumb = await get(b, bob, f"/api/v1/files/{info['file_id']}/thumbnail")
        assert thumb.status_code == 200 and thumb.content
        error(await get(b, carol, f"/api/v1/files/{info['file_id']}"), 403, codes.FORBIDDEN)
        # Limits hold on every node, and a refused upload leaves no chunk rows.
        error(await post(b, bob, png(4, 4), "image/gif", "x.gif"), 415, codes.BAD_CONTENT_TYPE)
        error(await post(b, bob, b"z" * 2_000_001), 413, codes.BODY_TOO_LARGE)

        async def streamed() -> AsyncIterator[bytes]:
            for _ in range(25):
                yield b"y" * 100_000

        error(await post(b, bob, streamed()), 413, codes.BODY_TOO_LARGE)
        # Deleted on node A: gone for node B too, chunk rows included.
        await alice.delete_file(raw["file_id"])
        error(await get(b, bob, f"/api/v1/files/{raw['file_id']}"), 404, codes.NOT_FOUND)
        db: PgDatabase = files_of(b).store.db  # type: ignore[attr-defined]
        async with db.connection() as con:
            left = await con.fetchval(
                "SELECT count(*) FROM file_chunks WHERE file_id = $1", raw["file_id"]
            )
        assert left == 0
        async with db.connection() as con:
            orphans = await con.fetchval(
                "SELECT count(*) FROM file_chunks c WHERE NOT EXISTS "
                "(SELECT 1 FROM files f WHERE f.id = c.file_id)"
            )
        assert orphans == 0


# -- the stores' upgrade --------------------------------------------------------------------


def _before_files(migrations: list[Any]) -> int:
    """The version just before the step that adds files (whatever its number)."""
    return next(
        i for i, m in enumerate(migrations) if isinstance(m, str) and "CREATE TABLE files" in m
    )


async def test_sqlite_upgrades_a_database_of_the_previous_version_to_files(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bitchat.db"
    previous = _before_files(store.MIGRATIONS)
    saved = store.MIGRATIONS[:]
    store.MIGRATIONS[:] = saved[:previous]
    try:
        db = await store.open_db(str(path))  # as the previous version left it
    finally:
        store.MIGRATIONS[:] = saved
    try:
        await db.execute(
            "INSERT INTO users (name, password_hash, created_at, name_key, name_shape) "
            "VALUES ('alice', 'x', 0, 'alice', 'alice')"
        )
    finally:
        await db.close()
    files = SqliteFileStore(str(path), str(tmp_path / "files"), 4096)
    await files.start()
    try:
        [(version,)] = await files.db.execute_fetchall("SELECT version FROM schema_version")
        assert version == len(store.MIGRATIONS) == sql.SCHEMA_VERSION
        assert await files.used(1) == 0
        writer = files.writer("ab" * 16)
        await writer.write(b"hello")
        await writer.commit()
        from bitchat.files import FileInfo

        assert await files.add(FileInfo("ab" * 16, 1, "h.txt", 5, "text/plain"), None, 10)
        assert (await files.get("ab" * 16)) == FileInfo("ab" * 16, 1, "h.txt", 5, "text/plain")
        assert b"".join([c async for c in files.read("ab" * 16)]) == b"hello"
    finally:
        await files.close()


async def test_postgresql_upgrades_a_database_of_the_previous_version_to_files(
    pg_dsn: str,
) -> None:
    previous = _before_files(pg.MIGRATIONS)
    con = await asyncpg.connect(pg_dsn)
    try:
        async with con.transaction():
            await pg_schema_at(con, previous)
            alice = await con.fetchval(
                "INSERT INTO users (name, password_hash, created_at, name_key, name_shape) "
                "VALUES ('alice', 'x', 0, 'alice', 'alice') RETURNING id"
            )
    finally:
        await con.close()
    from bitchat.files import FileInfo, PgFileStore

    files = PgFileStore(PgDatabase(pg_dsn, cluster_settings()), 4096)
    await files.start()
    try:
        async with files.db.connection() as c:
            assert await c.fetchval("SELECT version FROM schema_version") == sql.SCHEMA_VERSION
        assert len(pg.MIGRATIONS) == sql.SCHEMA_VERSION
        writer = files.writer("cd" * 16)
        await writer.write(b"x" * 5000)
        await writer.commit()
        assert writer.chunks == 2
        info = FileInfo("cd" * 16, alice, "x.bin", 5000, "application/octet-stream")
        assert not await files.add(info, None, 4999)  # over the quota: not recorded
        assert await files.add(info, b"thumb", 5000)
        assert await files.get("cd" * 16) == info
        assert await files.thumbnail("cd" * 16) == b"thumb"
        assert b"".join([c async for c in files.read("cd" * 16)]) == b"x" * 5000
        assert not await files.may_read("cd" * 16, alice + 1)
        await files.add_ref("cd" * 16, f"p:{alice}:{alice + 1}", 7)
        await files.add_ref("cd" * 16, f"p:{alice}:{alice + 1}", 7)  # once
        assert await files.may_read("cd" * 16, alice + 1)
        assert not await files.may_read("cd" * 16, alice + 11)
    finally:
        await files.close()


async def test_uploads_and_downloads_share_a_keep_alive_connection(
    server: Server, clients: Clients
) -> None:
    alice = await clients.login("alice")
    async with httpx.AsyncClient(base_url=base(server), timeout=WAIT, headers=bearer(alice)) as h:
        up = "/api/v1/files?name=a.txt"
        one = await h.post(up, headers={"content-type": "text/plain"}, content=b"one")
        two = await h.post(up, headers={"content-type": "text/plain"}, content=b"two")
        fid = two.json()["file_id"]
        head = await h.head(f"/api/v1/files/{fid}")
        assert head.status_code == 200 and head.headers["content-length"] == "3"
        assert head.content == b""
        assert (await h.get(f"/api/v1/files/{one.json()['file_id']}")).content == b"one"
        assert (await h.get(f"/api/v1/files/{fid}")).content == b"two"
        error(await h.post(f"/api/v1/files/{fid}"), 405, codes.METHOD_NOT_ALLOWED)
        r = await h.delete(f"/api/v1/files/{fid}/thumbnail")
        error(r, 405, codes.METHOD_NOT_ALLOWED)
        assert r.headers["allow"] == "GET, HEAD"


async def test_an_upload_that_stalls_is_timed_out_and_leaves_nothing(tmp_path: Path) -> None:
    async with (
        im_server(tmp_path, file_upload_timeout=0.5) as server,
        clients_of(server) as clients,
    ):
        alice = await clients.login("alice")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(
            b"POST /api/v1/files?name=slow.txt HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + (alice.token or "").encode() + b"\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100000\r\n\r\n" + b"s" * 9000
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), WAIT)  # until the server closes
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        assert b'"upload_timeout"' in answer
        assert stored_names(tmp_path) == []  # removed before the answer


async def test_a_file_message_is_checked_against_the_stored_file(
    server: Server, clients: Clients
) -> None:
    """What the core's type validator hook calls for "file" and "image" messages, and
    the reference it records once such a message is stored."""
    alice, bob = [await clients.login(n) for n in ("alice", "bob")]
    assert alice.user and bob.user
    files = files_of(server)
    text = (await post(server, alice, b"report", "text/plain", "r.txt")).json()
    image = (await post(server, alice, png(30, 20), "image/png", "p.png")).json()

    class Session:  # what the hook hands over: the sender's session
        def __init__(self, user_id: int | None) -> None:
            self.user_id = user_id

    await files.validate_file(Session(alice.user.id), text)
    await files.validate_image(Session(alice.user.id), image)
    await files.validate_file(Session(alice.user.id), {"file_id": text["file_id"]})
    refusals = [
        (Session(bob.user.id), text, codes.FORBIDDEN),  # not bob's upload
        (Session(None), text, codes.UNAUTHENTICATED),
        (Session(alice.user.id), {**text, "size": 1}, codes.BAD_FIELDS),
        (Session(alice.user.id), {**text, "name": "other.txt"}, codes.BAD_FIELDS),
        (Session(alice.user.id), {**image, "width": 31}, codes.BAD_FIELDS),
        (Session(alice.user.id), {"file_id": "x"}, codes.BAD_FIELDS),
        (Session(alice.user.id), {}, codes.BAD_FIELDS),
        (Session(alice.user.id), {"file_id": "f" * 32}, codes.NOT_FOUND),
    ]
    for session, fields, code in refusals:
        with pytest.raises(RequestError) as info:
            await files.validate_file(session, fields)
        assert info.value.code == code, (fields, info.value)
    with pytest.raises(RequestError) as info:
        await files.validate_image(Session(alice.user.id), text)  # a text file
    assert info.value.code == codes.BAD_FIELDS
    # Through the wire: a message with someone else's file, or fields that lie, is
    # refused and nothing is sent; a good one lets the conversation read the file.
    path = f"/api/v1/files/{image['file_id']}"
    error(await get(server, bob, path), 403, codes.FORBIDDEN)
    fields = {k: image[k] for k in ("file_id", "name", "size", "content_type")}
    with pytest.raises(RequestError) as info:
        await bob.client.request(SendP2P(alice.user.id, "mine?", type="image", fields=fields))
    assert info.value.code == codes.FORBIDDEN
    with pytest.raises(RequestError) as info:
        await alice.client.request(
            SendP2P(bob.user.id, "x", type="image", fields={**fields, "size": 2})
        )
    assert info.value.code == codes.BAD_FIELDS
    with pytest.raises(RequestError) as info:
        await alice.client.request(SendP2P(bob.user.id, "x", type="image", fields=text))
    assert info.value.code == codes.BAD_FIELDS  # a text file as an image (and "thumbnail")
    error(await get(server, bob, path), 403, codes.FORBIDDEN)
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    bob.on_message(inbox.put_nowait)
    ack = await alice.client.request(SendP2P(bob.user.id, "[image]", type="image", fields=fields))
    got = await asyncio.wait_for(inbox.get(), WAIT)
    assert got.msg_id == ack.msg_id and got.type == "image"
    assert got.fields["file_id"] == image["file_id"]
    assert (await get(server, bob, path)).status_code == 200  # as soon as it is pushed
    conv = conversation("p2p", alice.user.id, bob.user.id)
    rows = await files.store._fetch(
        "SELECT conv, msg_id FROM file_refs WHERE file_id = :f", {"f": image["file_id"]}
    )
    assert [tuple(r) for r in rows] == [(conv, ack.msg_id)]
    # Recalled: bob no longer reads it; alice, the uploader, still does.
    await alice.recall(ack.msg_id)
    error(await get(server, bob, path), 403, codes.FORBIDDEN)
    assert (await get(server, alice, path)).status_code == 200


async def test_send_file_uploads_and_sends_a_typed_message(
    server: Server, clients: Clients, tmp_path: Path
) -> None:
    alice, bob = [await clients.login(n) for n in ("alice", "bob")]
    assert bob.user
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    bob.on_message(inbox.put_nowait)
    (tmp_path / "dot.png").write_bytes(png(3, 2))
    ack, info = await alice.send_file(str(tmp_path / "dot.png"), to=bob.user.id)
    assert (info["width"], info["height"]) == (3, 2)
    got = await asyncio.wait_for(inbox.get(), WAIT)
    assert got.msg_id == ack.msg_id and got.text == f"[image] dot.png ({info['size']} bytes)"
    with pytest.raises(RequestError) as refused:  # a type the allow list refuses: no send
        await alice.send_file(str(tmp_path / "dot.png"), to=bob.user.id, content_type="x/y")
    assert refused.value.code == codes.BAD_CONTENT_TYPE
    assert inbox.empty()


# -- names ----------------------------------------------------------------------------------


@given(st.text(max_size=300))
def test_a_kept_name_is_one_printable_path_component(name: str) -> None:
    try:
        kept = check_name(name)
    except RequestError as exc:
        assert exc.code == codes.INVALID_PACKET
        return
    assert kept and len(kept) <= 255 and kept not in (".", "..")
    assert "/" not in kept and "\\" not in kept
    assert all(unicodedata.category(c)[0] != "C" for c in kept)


@given(st.text(max_size=100))
def test_a_downloaded_name_stays_in_its_folder(name: str) -> None:
    from urllib.parse import quote

    from bitchat.im.files_client import _filename

    got = _filename("attachment; filename*=UTF-8''" + quote(name, safe=""), "fallback")
    assert got and got not in (".", "..") and "/" not in got
    assert os.path.dirname(os.path.join("folder", got)) == "folder"
