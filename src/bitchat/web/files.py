"""The file routes of the server API, streamed both ways (:mod:`bitchat.files` keeps them).

::

    POST /api/v1/files?name=<file name>     the body is the file; -> 201 its info
    GET  /api/v1/files/<file_id>            the bytes
    GET  /api/v1/files/<file_id>/thumbnail  an image's thumbnail

They take the device's login token (``Authorization: Bearer <token>``, the one
``LoginOk`` gave), not an API key. An upload's body never sits whole in memory:
:class:`Upload` takes h11's ``Data`` events as they come and hands them to the
store through a small buffer; past two chunks the connection stops being read
until the store caught up. A refused upload is answered at once and the
connection closed (its body is not read to the end).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote

import h11
import orjson

from bitchat.errors import RequestError, codes
from bitchat.files import FileInfo, FileService
from bitchat.web import api

if TYPE_CHECKING:
    from bitchat.im.centers import User
    from bitchat.web.http import HttpConnection

log = logging.getLogger("bitchat.web.files")

UPLOAD_PATH = api.PREFIX + "/files"
_DOWNLOAD = re.compile(re.escape(UPLOAD_PATH) + r"/([^/]+)(/thumbnail)?\Z")


def is_files_path(path: str) -> bool:
    return path == UPLOAD_PATH or path.startswith(UPLOAD_PATH + "/")


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


async def authenticate(service: FileService, request: h11.Request) -> User:
    """The user whose device token the request carries; else RequestError."""
    scheme, _, token = (_header(request, b"authorization") or b"").decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise RequestError(
            codes.UNAUTHENTICATED, "send Authorization: Bearer <the device's login token>"
        )
    im = service.server.data.get("im")
    found = await im.users.check_token(token) if im is not None else None
    if found is None:
        raise RequestError(codes.UNAUTHENTICATED, "unknown or expired login token")
    user: User = found[0]
    return user


def _reply(info: FileInfo) -> api.ApiReply:
    return api.ApiReply(201, orjson.dumps(info.public()))


class Upload:
    """One ``POST /api/v1/files`` being received: a buffer between h11 and the store."""

    def __init__(
        self, conn: HttpConnection, service: FileService, request: h11.Request, query: str
    ) -> None:
        self.conn = conn
        self.service = service
        self.request = request
        self.query = query
        self.high_water = 2 * service.settings.file_chunk_size
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._ended = False
        self._wake = asyncio.Event()
        self.refusal: api.ApiReply | None = None
        """Set when the connection refused the upload (too large, too slow): its answer,
        sent once the task (cancelled) removed what it wrote."""
        self.paused = False
        """Reading stopped because the store is behind (``high_water`` bytes buffered)."""
        self.task: asyncio.Task[api.ApiReply] = asyncio.get_running_loop().create_task(self._run())

    # -- the h11 side ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake.set()
        if self._buffered > self.high_water and not self.paused:
            self.paused = True
            self.conn.pause_for_upload()

    def end(self) -> None:
        self._ended = True
        self._wake.set()

    # -- the store side -------------------------------------------------------------------

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self.paused and self._buffered <= self.high_water // 2:
                    self.paused = False
                    self.conn.resume_for_upload()
                yield data
            if self._ended:
                return
            self._wake.clear()
            await self._wake.wait()

    async def _run(self) -> api.ApiReply:
        try:
            user = await authenticate(self.service, self.request)
            name = ""
            for key, value in parse_qsl(self.query, keep_blank_values=True):
                if key == "name":
                    name = value
                    break
            length = _header(self.request, b"content-length")
            declared = int(length) if length is not None else None
            content_type = (_header(self.request, b"content-type") or b"").decode("latin-1")
            info, _ = await self.service.receive(
                user.id, name, content_type, self._body(), declared
            )
        except RequestError as exc:
            return api.error_reply(exc.code, exc.message)
        except (UnicodeDecodeError, ValueError) as exc:
            return api.error_reply(codes.INVALID_PACKET, f"bad request: {exc}")
        except Exception:
            log.exception("an upload failed")
            return api.error_reply(codes.INTERNAL, "the server failed to store this file")
        return _reply(info)


async def download(
    conn: HttpConnection, service: FileService, request: h11.Request, path: str
) -> api.ApiReply | None:
    """Answer a GET of a file or its thumbnail: an error reply, or None once the bytes
    were sent (streamed, chunk by chunk, waiting while the peer does not read)."""
    m = _DOWNLOAD.match(path)
    if m is None:
        return api.error_reply(codes.NOT_FOUND, f"no endpoint {path}")
    if request.method not in (b"GET", b"HEAD"):
        reply = api.error_reply(codes.METHOD_NOT_ALLOWED, "allowed here: GET, HEAD")
        reply.headers.append((b"allow", b"GET, HEAD"))
        return reply
    file_id, thumbnail = m.group(1), bool(m.group(2))
    try:
        user = await authenticate(service, request)
        info = await service.readable(file_id, user.id)
        thumb = await service.store.thumbnail(info.id) if thumbnail else None
    except RequestError as exc:
        return api.error_reply(exc.code, exc.message)
    if thumbnail and thumb is None:
        return api.error_reply(codes.NOT_FOUND, "this file has no thumbnail")
    inline = info.content_type.startswith("image/")
    disposition = (b"inline" if inline else b"attachment") + (
        b"; filename*=UTF-8''" + quote(info.name, safe="").encode("ascii")
    )
    served_type = info.thumbnail_type if thumb is not None else info.content_type
    if served_type.startswith("text/"):
        served_type += "; charset=utf-8"  # the upload's start was checked to be UTF-8
    headers = [
        (b"content-type", served_type.encode()),
        (b"content-length", str(len(thumb) if thumb is not None else info.size).encode()),
        (b"content-disposition", disposition),
        (b"x-content-type-options", b"nosniff"),
        # Whatever a file holds, opened from here it runs nothing.
        (b"content-security-policy", b"sandbox; default-src 'none'"),
        (b"cache-control", b"private, max-age=86400, immutable"),
    ]
    if thumb is not None:
        chunks: AsyncIterator[bytes] = _one(thumb)
    else:
        chunks = service.store.read(info.id)
    await conn.stream_response(200, headers, chunks, request)
    return None


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
