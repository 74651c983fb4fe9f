"""Pushing chat messages to sessions: encode once per serializer, hold during sync."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from bitchat.im.centers import Message
from bitchat.im.packets import ChatMessage
from bitchat.protocol.frame import encode_frame
from bitchat.protocol.serializers import SERIALIZERS

if TYPE_CHECKING:
    from bitchat.session import Session

_CHAT = ChatMessage.TYPE
SYNCING = "bitchat.syncing"
"""Session data key: a list of messages held back while offline messages are pushed."""


def encode_message(message: Message, serializer: int) -> bytes:
    body = SERIALIZERS[serializer].dumps(message.to_dict())
    return encode_frame(serializer, 0, _CHAT, 0, body)


def push_message(message: Message, sessions: Iterable[Session]) -> int:
    """Push to each session; returns how many got it (or will, after their sync)."""
    # Encoded once per serializer; the first one without a dict (most pushes have one).
    first_ser = 0
    first: bytes = b""
    frames: dict[int, bytes] | None = None
    n = 0
    for session in sessions:
        if session.closed:
            continue
        held = session.data.get(SYNCING)
        if held is not None:
            # Offline messages are still going out: keep this one for after them.
            held.append(message)
            n += 1
            continue
        ser = session.core.serializer
        if ser == first_ser:
            frame = first
        elif not first_ser:
            first_ser, first = ser, encode_message(message, ser)
            frame = first
        else:
            if frames is None:
                frames = {}
            frame = frames.get(ser) or frames.setdefault(ser, encode_message(message, ser))
        session.send_frame(frame)
        n += 1
    return n
