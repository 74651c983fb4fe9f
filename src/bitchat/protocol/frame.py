"""Framing of the bitchat wire protocol, version 1 (sans-I/O).

One frame is a 14-byte header followed by the body; integers are big-endian::

    offset size field        notes
    0      1    magic        0xBC ("BitChat")
    1      1    version      1
    2      1    serializer   1 JSON, 2 MessagePack
    3      1    flags        bit0 POOL (handle off the I/O loop), bit1 RESPONSE,
                             bit2 ERROR; the other bits must be 0
    4      2    packet type  u16: 0-99 system, 100-999 built-in IM, 1000+ user
    6      4    request id   u32: 0 = one-way/push; a response carries its
                             request's id
    10     4    body length  u32: above the limit (default 1 MiB) is an error
    14     n    body         the packet's fields as a map, in the serializer

The same frame travels unchanged inside one binary WebSocket message.

:class:`FrameDecoder` is fed arbitrary chunks (a frame split at any byte, many
frames in one chunk) and returns complete frames. It checks every header field,
the length against the limit included, before it buffers any of the body; a
bad header is a fatal :class:`~bitchat.errors.ProtocolError` (``feed`` raises
it, ``receive`` returns it after the frames that came before it) and the
decoder refuses further input, since the framing is lost.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple

from bitchat.errors import ProtocolError, codes

MAGIC = 0xBC
VERSION = 1
HEADER_SIZE = 14
DEFAULT_MAX_BODY = 1 << 20

FLAG_POOL = 0x01
FLAG_RESPONSE = 0x02
FLAG_ERROR = 0x04
KNOWN_FLAGS = FLAG_POOL | FLAG_RESPONSE | FLAG_ERROR

MAX_REQUEST_ID = 0xFFFFFFFF

_HEADER = struct.Struct(">BBBBHII")
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from


class Frame(NamedTuple):
    """One decoded frame. ``body`` is the raw, still serialized body."""

    serializer: int
    flags: int
    type: int
    request_id: int
    body: bytes


def encode_header(serializer: int, flags: int, type_: int, request_id: int, length: int) -> bytes:
    """The 14 header bytes of a frame."""
    return _pack_header(MAGIC, VERSION, serializer, flags, type_, request_id, length)


def encode_frame(serializer: int, flags: int, type_: int, request_id: int, body: bytes) -> bytes:
    """A whole frame: header and body in one ``bytes``."""
    return _pack_header(MAGIC, VERSION, serializer, flags, type_, request_id, len(body)) + body


class FrameDecoder:
    """Turns a byte stream into :class:`Frame` objects.

    ``serializers`` is the set of serializer ids this side understands; an
    unknown one is a fatal error, as is any reserved flag bit or a body length
    above ``max_body``.
    """

    __slots__ = ("_buf", "_closed", "_new_other", "_new_response", "max_body", "serializers")

    def __init__(
        self,
        max_body: int = DEFAULT_MAX_BODY,
        serializers: frozenset[int] = frozenset({1, 2}),
        *,
        request_class: type[Frame] = Frame,
        response_class: type[Frame] = Frame,
    ) -> None:
        self.max_body = max_body
        self.serializers = serializers
        self._buf = bytearray()
        self._closed = False
        # The connection core's events are Frame subclasses, made here directly.
        self._new_other = functools.partial(tuple.__new__, request_class)
        self._new_response = functools.partial(tuple.__new__, response_class)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add ``data`` and return every frame it completes, in order.

        A bad header raises :class:`ProtocolError`; frames that ``data`` completed
        before it are lost with it (:meth:`receive` returns them).
        """
        frames, error = self.receive(data)
        if error is not None:
            raise error
        return frames

    def receive(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[Frame], ProtocolError | None]:
        """Add ``data``; return the frames it completes and the fatal error, if any.

        Unlike :meth:`feed` this never raises: the frames before a bad header are
        returned with its error, so every complete frame is handled whatever the
        peer's bytes were split into. After an error the decoder refuses input.
        """
        if self._closed:
            return [], ProtocolError("closed", "decoder is closed after a protocol error")
        buf = self._buf
        if buf:
            buf += data
            view = memoryview(buf)
        else:
            # Fast path: parse straight from the chunk, buffer only a tail.
            view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        frames: list[Frame] = []
        pos = 0
        end = len(view)
        try:
            while end - pos >= 1:
                if view[pos] != MAGIC:
                    raise ProtocolError(codes.BAD_MAGIC, f"bad magic byte 0x{view[pos]:02x}")
                if end - pos < HEADER_SIZE:
                    # A copy of at most 13 bytes: a view would pin ``buf`` if this raises.
                    self._check_partial(bytes(view[pos:end]))
                    break
                _, version, ser, flags, type_, rid, length = _unpack_header(view, pos)
                self._check_header(version, ser, flags, length)
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    break
                # The one copy per frame: the body leaves the receive buffer.
                new = self._new_response if flags & FLAG_RESPONSE else self._new_other
                frames.append(new((ser, flags, type_, rid, bytes(view[pos + HEADER_SIZE : stop]))))
                pos = stop
        except ProtocolError as exc:
            self._closed = True
            view.release()
            buf.clear()
            return frames, exc
        view.release()
        if buf:
            if pos:
                del buf[:pos]
        elif pos < end:
            buf += data[pos:]
        return frames, None

    def _check_partial(self, head: bytes) -> None:
        # Fail as early as the bytes allow, so a wrong peer is told at once.
        n = len(head)
        if n > 1 and head[1] != VERSION:
            raise ProtocolError(codes.BAD_VERSION, f"unsupported protocol version {head[1]}")
        if n > 2 and head[2] not in self.serializers:
            raise ProtocolError(codes.BAD_SERIALIZER, f"unknown serializer {head[2]}")
        if n > 3 and head[3] & ~KNOWN_FLAGS:
            raise ProtocolError(codes.BAD_FLAGS, f"reserved flag bits set: 0x{head[3]:02x}")

    def _check_header(self, version: int, ser: int, flags: int, length: int) -> None:
        if version != VERSION:
            raise ProtocolError(codes.BAD_VERSION, f"unsupported protocol version {version}")
        if ser not in self.serializers:
            raise ProtocolError(codes.BAD_SERIALIZER, f"unknown serializer {ser}")
        if flags & ~KNOWN_FLAGS:
            raise ProtocolError(codes.BAD_FLAGS, f"reserved flag bits set: 0x{flags:02x}")
        if length > self.max_body:
            raise ProtocolError(
                codes.FRAME_TOO_LARGE,
                f"body of {length} bytes exceeds the limit of {self.max_body}",
            )
