"""Files and images: what an upload becomes, where its bytes live, who may read them.

An upload (``POST /api/v1/files``, :mod:`bitchat.web.files`) arrives as a stream of
chunks; :meth:`FileService.receive` checks it on the way (the claimed content type
against the allow list and against its first bytes, the size limit, the owner's
quota), writes it chunk by chunk to the store, and for an image reads its
dimensions and makes a thumbnail with Pillow in a worker thread, never decoding
more than ``Settings.max_image_pixels``. Nothing is kept of a refused upload.

Two stores, one per mode, both with the metadata in the ``files`` table:

- :class:`SqliteFileStore` (standalone): the bytes under ``<data_dir>/files/``,
  written to a temporary name and renamed into place once complete.
- :class:`PgFileStore` (cluster): the bytes in ``file_chunks`` rows of
  ``Settings.file_chunk_size`` each, so every node serves every file with no new
  service, ``pg_dump`` backs them up with the rest, and a read or write holds one
  chunk in memory. (Large objects would need ``lo_*`` calls over SQL, ``vacuumlo``
  for orphans, and are left out of a plain per-table dump.)

Thumbnails are one ``file_chunks`` row (``n = -1``) in both stores.

A file may be read by its uploader and by the members of a conversation holding a
message that refers to it: ``file_refs(file_id, conv, msg_id)``, written by
:meth:`FileService.add_ref` when such a message is stored.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import io
import logging
import os
import secrets
import tempfile
import time
import unicodedata
import warnings
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from bitchat.errors import RequestError, codes
from bitchat.im import sql
from bitchat.settings import Settings

if TYPE_CHECKING:
    import aiosqlite

    from bitchat.cluster.pg import PgDatabase
    from bitchat.server import Server

log = logging.getLogger("bitchat.files")

SNIFF_BYTES = 8192
"""How much of an upload's start is looked at to tell its type (what ``filetype`` reads)."""
MAX_NAME_LENGTH = 255
THUMBNAIL_CHUNK = -1
"""The ``file_chunks`` row number of a file's thumbnail."""


@functools.cache
def _sniffable() -> frozenset[str]:
    """Types the sniffer recognizes: a claim of one must be borne out by the bytes."""
    import filetype

    return frozenset(t.mime for t in filetype.types)


def new_file_id() -> str:
    """128 random bits: a file id tells nothing and cannot be guessed."""
    return secrets.token_hex(16)


def is_file_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One stored file's metadata (a row of ``files``)."""

    id: str
    owner_id: int
    name: str
    size: int
    content_type: str
    width: int = 0
    height: int = 0
    has_thumbnail: bool = False
    thumbnail_type: str = ""
    created_at: int = 0

    def public(self) -> dict[str, Any]:
        """What an upload answers, and what a file/image message's fields carry."""
        return {
            "file_id": self.id,
            "name": self.name,
            "size": self.size,
            "content_type": self.content_type,
            "width": self.width,
            "height": self.height,
            "thumbnail": self.has_thumbnail,
        }


_COLUMNS = (
    "id, owner_id, name, size, content_type, width, height, has_thumbnail, "
    "thumbnail_type, created_at"
)
_GET = f"SELECT {_COLUMNS} FROM files WHERE id = :f"
_USED = "SELECT COALESCE(SUM(size), 0) FROM files WHERE owner_id = :o"
# Inserted only while the owner's files, this one included, fit the quota.
_ADD = (
    f"INSERT INTO files ({_COLUMNS}) SELECT :f, :o, :name, :size, :ct, :w, :h, :thumb, :tt, "
    ":ts WHERE (SELECT COALESCE(SUM(size), 0) FROM files WHERE owner_id = :o) + :size <= :quota"
)
# A member of a conversation with a message that refers to the file: a pair's key is
# p:<lo>:<hi>, a group's g:<id>.
_MAY_READ = (
    "SELECT 1 FROM file_refs r WHERE r.file_id = :f AND (r.conv LIKE :lo OR r.conv LIKE :hi "
    "OR EXISTS (SELECT 1 FROM group_members gm WHERE gm.user_id = :u "
    "AND r.conv = 'g:' || gm.group_id)) LIMIT 1"
)
_ADD_REF = (
    "INSERT INTO file_refs (file_id, conv, msg_id) VALUES (:f, :c, :m) ON CONFLICT DO NOTHING"
)
_PUT_THUMB = "INSERT INTO file_chunks (file_id, n, data) VALUES (:f, :n, :d)"
_GET_CHUNK = "SELECT data FROM file_chunks WHERE file_id = :f AND n = :n"


def _info(row: Sequence[Any]) -> FileInfo:
    fid, owner, name, size, ct, w, h, thumb, tt, ts = row
    return FileInfo(fid, owner, name, size, ct, w, h, bool(thumb), tt, ts)


class BlobWriter(ABC):
    """A file's bytes on their way into the store: readable only after :meth:`commit`."""

    chunks = 0
    """Writes so far (each at most about ``Settings.file_chunk_size``)."""

    @abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abstractmethod
    async def commit(self) -> None: ...

    @abstractmethod
    async def abort(self) -> None:
        """Forget what was written (safe to call after a failed write or a commit)."""


class FileStore(ABC):
    """Metadata, references and bytes of files (one per server)."""

    dialect: sql.Dialect

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _fetch(self, query: str, params: dict[str, Any]) -> list[Sequence[Any]]: ...

    @abstractmethod
    async def _execute(self, query: str, params: dict[str, Any]) -> int:
        """Run one statement in its own transaction; the rows it changed."""

    @abstractmethod
    def writer(self, file_id: str) -> BlobWriter: ...

    @abstractmethod
    def read(self, file_id: str) -> AsyncIterator[bytes]:
        """The bytes of a committed file, chunk by chunk."""

    @abstractmethod
    async def delete_bytes(self, file_id: str) -> None: ...

    async def spool(self, file_id: str) -> IO[bytes]:
        """The file's bytes as a file object Pillow can read (the caller closes it)."""
        out = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115 - the caller's
        async for chunk in self.read(file_id):
            out.write(chunk)
        out.seek(0)
        return out

    async def get(self, file_id: str) -> FileInfo | None:
        rows = await self._fetch(_GET, {"f": file_id})
        return _info(rows[0]) if rows else None

    async def used(self, owner_id: int) -> int:
        rows = await self._fetch(_USED, {"o": owner_id})
        return int(rows[0][0]) if rows else 0

    async def add(self, info: FileInfo, thumbnail: bytes | None, quota: int) -> bool:
        """Record ``info`` (and its thumbnail) unless the owner's quota would be passed."""
        params = {
            "f": info.id,
            "o": info.owner_id,
            "name": info.name,
            "size": info.size,
            "ct": info.content_type,
            "w": info.width,
            "h": info.height,
            "thumb": info.has_thumbnail
            if self.dialect is sql.Dialect.POSTGRES
            else int(info.has_thumbnail),
            "tt": info.thumbnail_type,
            "ts": info.created_at,
            "quota": quota,
        }
        if thumbnail is not None:
            await self._execute(_PUT_THUMB, {"f": info.id, "n": THUMBNAIL_CHUNK, "d": thumbnail})
        return await self._add_row(params)

    @abstractmethod
    async def _add_row(self, params: dict[str, Any]) -> bool: ...

    async def thumbnail(self, file_id: str) -> bytes | None:
        rows = await self._fetch(_GET_CHUNK, {"f": file_id, "n": THUMBNAIL_CHUNK})
        return bytes(rows[0][0]) if rows else None

    async def may_read(self, file_id: str, user_id: int) -> bool:
        """True when a conversation of ``user_id`` holds a message referring to the file."""
        params = {"f": file_id, "u": user_id, "lo": f"p:{user_id}:%", "hi": f"p:%:{user_id}"}
        return bool(await self._fetch(_MAY_READ, params))

    async def add_ref(self, file_id: str, conv: str, msg_id: int) -> None:
        await self._execute(_ADD_REF, {"f": file_id, "c": conv, "m": msg_id})

    async def delete(self, file_id: str) -> None:
        """Forget the file: metadata first (it is no longer served), then the rest."""
        await self._execute("DELETE FROM files WHERE id = :f", {"f": file_id})
        await self._execute("DELETE FROM file_refs WHERE file_id = :f", {"f": file_id})
        await self.delete_bytes(file_id)

    async def drop_ref(self, file_id: str, conv: str, msg_id: int) -> None:
        await self._execute(
            "DELETE FROM file_refs WHERE file_id = :f AND conv = :c AND msg_id = :m",
            {"f": file_id, "c": conv, "m": msg_id},
        )


# -- standalone: SQLite and the data folder -------------------------------------------------


class _LocalWriter(BlobWriter):
    def __init__(self, final: str, tmp: str) -> None:
        self.final = final
        self.tmp = tmp
        self._fh: IO[bytes] | None = None

    async def write(self, data: bytes) -> None:
        if self._fh is None:
            self._fh = await asyncio.to_thread(_create, self.tmp)
        self.chunks += 1
        await asyncio.to_thread(self._fh.write, data)

    async def commit(self) -> None:
        if self._fh is None:
            self._fh = await asyncio.to_thread(_create, self.tmp)
        await asyncio.to_thread(_finish, self._fh, self.tmp, self.final)
        self._fh = None

    async def abort(self) -> None:
        fh, self._fh = self._fh, None
        await asyncio.to_thread(_discard, fh, self.tmp)


def _create(path: str) -> IO[bytes]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "xb")  # closed by _finish or _discard


def _finish(fh: IO[bytes], tmp: str, final: str) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(tmp, final)  # whole or not at all under its own name


def _discard(fh: IO[bytes] | None, tmp: str) -> None:
    if fh is not None:
        fh.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


class SqliteFileStore(FileStore):
    """Standalone: metadata in the SQLite database, bytes under ``folder``."""

    dialect = sql.Dialect.SQLITE

    def __init__(self, db_path: str, folder: str, chunk_size: int) -> None:
        self.db_path = db_path
        self.folder = folder
        self.chunk_size = chunk_size
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        from bitchat.im.sqlite import open_db

        self._db = await open_db(self.db_path)
        # Temporary files of uploads cut by a stop are of no use to anyone.
        tmp = os.path.join(self.folder, "tmp")
        for name in await asyncio.to_thread(lambda: os.listdir(tmp) if os.path.isdir(tmp) else []):
            await asyncio.to_thread(_discard, None, os.path.join(tmp, name))

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "the file store is not started"
        return self._db

    def path(self, file_id: str) -> str:
        # Two levels, so no folder holds every file.
        return os.path.join(self.folder, file_id[:2], file_id)

    async def _fetch(self, query: str, params: dict[str, Any]) -> list[Sequence[Any]]:
        text, args = sql.render(query, self.dialect, params)
        return list(await self.db.execute_fetchall(text, args))

    async def _execute(self, query: str, params: dict[str, Any]) -> int:
        text, args = sql.render(query, self.dialect, params)
        async with self._lock:
            cursor = await self.db.execute(text, args)
            return cursor.rowcount

    async def _add_row(self, params: dict[str, Any]) -> bool:
        return await self._execute(_ADD, params) == 1

    def writer(self, file_id: str) -> BlobWriter:
        tmp = os.path.join(self.folder, "tmp", f"{file_id}.{secrets.token_hex(4)}")
        return _LocalWriter(self.path(file_id), tmp)

    async def read(self, file_id: str) -> AsyncIterator[bytes]:
        fh = await asyncio.to_thread(open, self.path(file_id), "rb")
        try:
            while chunk := await asyncio.to_thread(fh.read, self.chunk_size):
                yield chunk
        finally:
            fh.close()

    async def spool(self, file_id: str) -> IO[bytes]:
        return await asyncio.to_thread(open, self.path(file_id), "rb")

    async def delete_bytes(self, file_id: str) -> None:
        await asyncio.to_thread(_discard, None, self.path(file_id))
        await self._execute("DELETE FROM file_chunks WHERE file_id = :f", {"f": file_id})


# -- cluster: PostgreSQL chunk rows ---------------------------------------------------------


class _PgWriter(BlobWriter):
    def __init__(self, store: PgFileStore, file_id: str) -> None:
        self.store = store
        self.file_id = file_id
        self._buffer = bytearray()
        self._n = 0

    async def write(self, data: bytes) -> None:
        self._buffer += data
        size = self.store.chunk_size
        while len(self._buffer) >= size:
            await self._flush(bytes(self._buffer[:size]))
            del self._buffer[:size]

    async def _flush(self, data: bytes) -> None:
        n = self._n
        self.chunks += 1

        async def put(con: Any) -> None:
            # Each chunk commits by itself: an upload holds no transaction open while its
            # peer sends; the files row (written last) is what makes the chunks a file.
            await con.execute(
                "INSERT INTO file_chunks (file_id, n, data) VALUES ($1, $2, $3) "
                "ON CONFLICT (file_id, n) DO UPDATE SET data = EXCLUDED.data",
                self.file_id,
                n,
                data,
            )

        await self.store.db.run("storing a file chunk", put)
        self._n += 1

    async def commit(self) -> None:
        if self._buffer or self._n == 0:
            await self._flush(bytes(self._buffer))
            self._buffer.clear()

    async def abort(self) -> None:
        self._buffer.clear()
        await self.store.delete_bytes(self.file_id)


class PgFileStore(FileStore):
    """Cluster: metadata and bytes in PostgreSQL, shared by every node."""

    dialect = sql.Dialect.POSTGRES

    def __init__(self, db: PgDatabase, chunk_size: int) -> None:
        self.db = db
        self.chunk_size = chunk_size

    async def start(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def _fetch(self, query: str, params: dict[str, Any]) -> list[Sequence[Any]]:
        text, args = sql.render(query, self.dialect, params)

        async def fetch(con: Any) -> list[Sequence[Any]]:
            return list(await con.fetch(text, *args))

        return await self.db.run("reading files", fetch)

    async def _execute(self, query: str, params: dict[str, Any]) -> int:
        text, args = sql.render(query, self.dialect, params)

        async def execute(con: Any) -> int:
            status: str = await con.execute(text, *args)
            return int(status.rsplit(" ", 1)[-1])

        return await self.db.run("writing files", execute, retry=False)

    async def _add_row(self, params: dict[str, Any]) -> bool:
        text, args = sql.render(_PG_ADD, self.dialect, params)

        async def add(con: Any) -> bool:
            async with con.transaction():
                # One upload of the owner at a time past here: the quota sum stays true.
                await con.execute("SELECT pg_advisory_xact_lock($1)", _QUOTA_LOCK ^ params["o"])
                status: str = await con.execute(text, *args)
            return status.endswith(" 1")

        return await self.db.run("recording a file", add, retry=False)

    def writer(self, file_id: str) -> BlobWriter:
        return _PgWriter(self, file_id)

    async def read(self, file_id: str) -> AsyncIterator[bytes]:
        n = 0
        while True:
            rows = await self._fetch(_GET_CHUNK, {"f": file_id, "n": n})
            if not rows:
                return
            yield bytes(rows[0][0])
            n += 1

    async def delete_bytes(self, file_id: str) -> None:
        await self._execute("DELETE FROM file_chunks WHERE file_id = :f", {"f": file_id})


# As _ADD, with the types PostgreSQL cannot infer in a SELECT list.
_PG_ADD = (
    f"INSERT INTO files ({_COLUMNS}) SELECT :f::text, :o::bigint, :name::text, :size::bigint, "
    ":ct::text, :w::int, :h::int, :thumb::boolean, :tt::text, :ts::bigint "
    "WHERE (SELECT COALESCE(SUM(size), 0) FROM files WHERE owner_id = :o::bigint) "
    "+ :size::bigint <= :quota::bigint"
)
_QUOTA_LOCK = 0x6269_7466_0000_0000
"""Advisory lock keys of the owners' quota checks (xor the owner's id)."""


# -- checks and images ----------------------------------------------------------------------


def check_name(name: str) -> str:
    """A file's name as it is kept: one path component, printable, at most 255 chars."""
    name = unicodedata.normalize("NFC", name.strip())
    if (
        not name
        or len(name) > MAX_NAME_LENGTH
        or name in (".", "..")
        or any(c in "/\\" or unicodedata.category(c)[0] == "C" for c in name)
    ):
        raise RequestError(
            codes.INVALID_PACKET,
            f"name must be a file name of 1 to {MAX_NAME_LENGTH} printable characters "
            "without / or \\",
        )
    return name


def claimed_type(header: str | None, allowed: Sequence[str]) -> str:
    """The content type an upload claims (parameters dropped), if allowed."""
    claim = (header or "").split(";", 1)[0].strip().lower()
    if not claim:
        raise RequestError(codes.BAD_CONTENT_TYPE, "send the file's Content-Type")
    if claim not in allowed:
        raise RequestError(
            codes.BAD_CONTENT_TYPE, f"{claim} is not accepted (allowed: {', '.join(allowed)})"
        )
    return claim


def check_bytes(claim: str, head: bytes) -> None:
    """Refuse an upload whose first bytes are not of the claimed type."""
    if claim == "application/octet-stream":
        return  # no claim to check: it is served as bytes to save
    import filetype  # on the first upload, as Pillow is

    sniffed = filetype.guess_mime(head) if head else None
    if sniffed is not None:
        ok = sniffed == claim
    elif claim in _sniffable():
        ok = False  # a type with a signature, and the bytes have none
    elif claim.startswith("text/"):
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            ok = True
        except UnicodeDecodeError:
            ok = False
    else:
        ok = True
    if not ok:
        found = sniffed or "something else"
        raise RequestError(
            codes.BAD_CONTENT_TYPE, f"the file claims to be {claim} but its bytes are {found}"
        )


@dataclass(frozen=True, slots=True)
class ImageFacts:
    width: int
    height: int
    thumbnail: bytes | None
    thumbnail_type: str


def inspect_image(fh: IO[bytes], max_pixels: int, size: int) -> ImageFacts | None:
    """Dimensions and a thumbnail of the image in ``fh`` (blocking: run in a thread).

    The header is read first; an image of more than ``max_pixels`` is never decoded.
    None: not an image Pillow can read.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if max_pixels != Image.MAX_IMAGE_PIXELS:
        # Pillow's own bomb check at our limit too (Pillow is loaded on the first image:
        # about 3 MiB a server without images never needs).
        Image.MAX_IMAGE_PIXELS = max_pixels
        # Past it this function decodes nothing (its own check): no warning to give.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        with Image.open(fh) as img:
            width, height = img.size
            if width * height > max_pixels or width <= 0 or height <= 0:
                return ImageFacts(max(width, 0), max(height, 0), None, "")
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            thumb = ImageOps.exif_transpose(img.copy()) or img.copy()
            thumb.thumbnail((size, size))
            alpha = thumb.mode in ("RGBA", "LA", "PA") or "transparency" in thumb.info
            out = io.BytesIO()
            if alpha:
                thumb.convert("RGBA").save(out, "PNG", optimize=True)
                kind = "image/png"
            else:
                thumb.convert("RGB").save(out, "JPEG", quality=80)
                kind = "image/jpeg"
            return ImageFacts(width, height, out.getvalue(), kind)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        return None
    except (OSError, ValueError, SyntaxError) as exc:  # a broken image: kept as a file
        log.info("could not read an uploaded image: %s", exc)
        return None


# -- the service ----------------------------------------------------------------------------


class FileService:
    """Uploads, downloads and references of one server (``server.data["files"]``)."""

    def __init__(self, server: Server, store: FileStore) -> None:
        self.server = server
        self.settings: Settings = server.settings
        self.store = store
        self._running: set[asyncio.Task[Any]] = set()
        """Uploads being received: a stop waits for them to remove what a cut one wrote."""
        server.on_startup.append(self._start)
        server.on_shutdown.append(self._stop)

    async def _start(self, server: Server) -> None:
        await self.store.start()

    async def _stop(self, server: Server) -> None:
        # The HTTP connections closed first (their hook runs before this one), which
        # cancelled their uploads; each removes what it wrote before the store closes.
        if self._running:
            await asyncio.wait(list(self._running), timeout=self.settings.shutdown_grace)
        await self.store.close()

    async def check_start(self, owner_id: int, declared: int | None) -> None:
        """Refuse at once an upload whose declared size is over a limit."""
        s = self.settings
        if declared is not None and declared > s.max_file_size:
            raise _too_large(s.max_file_size)
        if declared is not None and await self.store.used(owner_id) + declared > (
            s.file_quota_per_user
        ):
            raise _over_quota(s.file_quota_per_user)

    async def receive(
        self,
        owner_id: int,
        name: str,
        content_type: str,
        chunks: AsyncIterator[bytes],
        declared: int | None = None,
    ) -> tuple[FileInfo, BlobWriter]:
        """Store an upload's ``chunks`` as a file of ``owner_id``; its info (and the
        writer that wrote it, whose ``chunks`` count the writes). Raises
        :class:`RequestError` for a refused upload, after removing what was written."""
        s = self.settings
        name = check_name(name)
        claim = claimed_type(content_type, s.file_types)
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        await self.check_start(owner_id, declared)
        used = await self.store.used(owner_id)
        file_id = new_file_id()
        writer = self.store.writer(file_id)
        size = 0
        head: bytearray | None = bytearray()
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > s.max_file_size:
                    raise _too_large(s.max_file_size)
                if used + size > s.file_quota_per_user:
                    raise _over_quota(s.file_quota_per_user)
                if head is not None:
                    head += chunk
                    if len(head) < SNIFF_BYTES:
                        continue
                    check_bytes(claim, bytes(head[:SNIFF_BYTES]))
                    chunk, head = bytes(head), None
                await writer.write(chunk)
            if head is not None:
                check_bytes(claim, bytes(head))
                if head:
                    await writer.write(bytes(head))
            await writer.commit()
        except BaseException:
            await asyncio.shield(writer.abort())
            raise
        try:
            info, thumb = await self._describe(file_id, owner_id, name, claim, size)
            if not await self.store.add(info, thumb, s.file_quota_per_user):
                raise _over_quota(s.file_quota_per_user)
        except BaseException:
            await asyncio.shield(self.store.delete_bytes(file_id))
            raise
        return info, writer

    async def _describe(
        self, file_id: str, owner_id: int, name: str, claim: str, size: int
    ) -> tuple[FileInfo, bytes | None]:
        info = FileInfo(file_id, owner_id, name, size, claim, created_at=int(time.time()))
        if not claim.startswith("image/"):
            return info, None
        fh = await self.store.spool(file_id)
        try:
            facts = await asyncio.to_thread(
                inspect_image, fh, self.settings.max_image_pixels, self.settings.thumbnail_size
            )
        finally:
            fh.close()
        if facts is None:
            return info, None
        described = FileInfo(
            file_id,
            owner_id,
            name,
            size,
            claim,
            facts.width,
            facts.height,
            facts.thumbnail is not None,
            facts.thumbnail_type,
            info.created_at,
        )
        return described, facts.thumbnail

    async def readable(self, file_id: str, user_id: int) -> FileInfo:
        """The file, if ``user_id`` may read it; else RequestError (not_found, forbidden)."""
        info = await self.store.get(file_id) if is_file_id(file_id) else None
        if info is None:
            raise RequestError(codes.NOT_FOUND, "no such file")
        if info.owner_id != user_id and not await self.store.may_read(file_id, user_id):
            raise RequestError(
                codes.FORBIDDEN,
                "only its uploader and the members of a conversation it was "
                "sent to may read this file",
            )
        return info

    async def delete(self, file_id: str, user_id: int) -> None:
        """Remove a file of ``user_id`` (its uploader): its bytes, thumbnail and
        references go, and it no longer counts against the quota."""
        info = await self.store.get(file_id) if is_file_id(file_id) else None
        if info is None:
            raise RequestError(codes.NOT_FOUND, "no such file")
        if info.owner_id != user_id:
            raise RequestError(codes.FORBIDDEN, "only its uploader may delete a file")
        await self.store.delete(file_id)

    async def add_ref(self, file_id: str, conv: str, msg_id: int) -> None:
        """Record that message ``msg_id`` of conversation ``conv`` refers to the file (so
        the conversation's members may read it)."""
        await self.store.add_ref(file_id, conv, msg_id)

    async def check_fields(
        self, owner_id: int, fields: dict[str, Any], *, image: bool = False
    ) -> FileInfo:
        """The stored file a file (or, with ``image``, image) message's ``fields``
        describe: it exists, ``owner_id`` uploaded it, and what the fields say of it
        (name, size, content_type, width, height) is true. Else RequestError:
        ``bad_fields``, ``not_found``, ``forbidden``."""
        fid = fields.get("file_id")
        if not isinstance(fid, str) or not is_file_id(fid):
            raise RequestError(codes.BAD_FIELDS, "fields.file_id must be a file's id")
        info = await self.store.get(fid)
        if info is None:
            raise RequestError(codes.NOT_FOUND, "no such file")
        if info.owner_id != owner_id:
            raise RequestError(
                codes.FORBIDDEN, "a message can only carry a file its sender uploaded"
            )
        if image and not info.width:
            raise RequestError(codes.BAD_FIELDS, "an image message needs an image file")
        for key in ("name", "size", "content_type", "width", "height"):
            # A field left out (its default: "" or 0) says nothing to check.
            if fields.get(key) and fields[key] != getattr(info, key):
                raise RequestError(codes.BAD_FIELDS, f"fields.{key} does not match the file")
        return info

    async def validate_file(self, session: Any, fields: dict[str, Any]) -> None:
        """The validator of type "file" (``IMService.type_validator("file", ...)``)."""
        await self.check_fields(_sender(session), fields)

    async def validate_image(self, session: Any, fields: dict[str, Any]) -> None:
        """The validator of type "image"."""
        await self.check_fields(_sender(session), fields, image=True)

    async def before_message(self, msg: Any, fields: dict[str, Any]) -> None:
        """A file/image message passed its checks and is about to be stored: its
        conversation may read the file from now on, before anyone is pushed it
        (recorded with message id 0 until :meth:`after_message`)."""
        fid = fields.get("file_id")
        if isinstance(fid, str) and is_file_id(fid):
            await self.add_ref(fid, msg.conversation_key, 0)

    async def after_message(self, msg: Any, fields: dict[str, Any]) -> None:
        """The message is stored: its reference names it."""
        fid = fields.get("file_id")
        if isinstance(fid, str) and is_file_id(fid):
            conv = msg.conversation_key
            await self.add_ref(fid, conv, msg.id)
            await self.store.drop_ref(fid, conv, 0)

    async def after_recall(self, msg: Any, fields: dict[str, Any]) -> None:
        """The message was recalled: its conversation no longer reads the file through
        it (another message that refers to it still counts; the uploader always may)."""
        fid = fields.get("file_id")
        if isinstance(fid, str) and is_file_id(fid):
            await self.store.drop_ref(fid, msg.conversation_key, msg.id)


def _sender(session: Any) -> int:
    user_id = getattr(session, "user_id", None)
    if not isinstance(user_id, int):
        raise RequestError(codes.UNAUTHENTICATED, "log in first")
    return user_id


def _too_large(limit: int) -> RequestError:
    return RequestError(codes.BODY_TOO_LARGE, f"files are limited to {limit} bytes")


def _over_quota(quota: int) -> RequestError:
    return RequestError(
        codes.QUOTA_EXCEEDED, f"this upload would pass your file quota of {quota} bytes"
    )


def install(server: Server, im: Any) -> FileService:
    """Files for ``server`` in its mode: ``server.data["files"]``."""
    s = server.settings
    store: FileStore
    if s.mode == "cluster":
        store = PgFileStore(im.messages.db, s.file_chunk_size)
    else:
        store = SqliteFileStore(s.db_path, os.path.join(s.data_dir, "files"), s.file_chunk_size)
    service = FileService(server, store)
    server.data["files"] = service
    # Messages of type file/image: checked against the store, and the conversation
    # they are sent to may read the file.
    im.type_validator("file", service.validate_file)
    im.type_validator("image", service.validate_image)
    for kind in ("file", "image"):
        im.life.on_store(
            kind,
            before=service.before_message,
            after=service.after_message,
            recalled=service.after_recall,
        )
    return service
