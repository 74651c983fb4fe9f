"""The sans-I/O protocol core: framing, serializers and packets.

Nothing here imports asyncio; it is fed bytes and returns frames and packets.
"""

from bitchat.protocol.frame import (
    FLAG_ERROR,
    FLAG_POOL,
    FLAG_RESPONSE,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Frame,
    FrameDecoder,
    encode_frame,
    encode_header,
)
from bitchat.protocol.packets import (
    Error,
    Limit,
    Limits,
    Packet,
    Ping,
    Pong,
    Registry,
    decode_body,
    encode_body,
    registry,
)
from bitchat.protocol.serializers import JSON, MSGPACK, SERIALIZERS, Serializer

__all__ = [
    "FLAG_ERROR",
    "FLAG_POOL",
    "FLAG_RESPONSE",
    "HEADER_SIZE",
    "JSON",
    "MAGIC",
    "MSGPACK",
    "SERIALIZERS",
    "VERSION",
    "Error",
    "Frame",
    "FrameDecoder",
    "Limit",
    "Limits",
    "Packet",
    "Ping",
    "Pong",
    "Registry",
    "Serializer",
    "decode_body",
    "encode_body",
    "encode_frame",
    "encode_header",
    "registry",
]
