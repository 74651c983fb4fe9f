"""Body serializers, chosen per frame by the header's serializer byte."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgpack
import orjson

JSON: Final = 1
MSGPACK: Final = 2


class Serializer:
    """A named pair of ``dumps``/``loads`` functions for one serializer id."""

    __slots__ = ("dumps", "id", "loads", "name")

    def __init__(
        self, id: int, name: str, dumps: Callable[[Any], bytes], loads: Callable[[bytes], Any]
    ) -> None:
        self.id = id
        self.name = name
        self.dumps = dumps
        self.loads = loads

    def __repr__(self) -> str:
        return f"Serializer({self.id}, {self.name!r})"


def _msgpack_loads(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def _msgpack_dumps(obj: Any) -> bytes:
    # packb, not a shared Packer: pool handlers may encode from worker threads.
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


SERIALIZERS: Final[dict[int, Serializer]] = {
    JSON: Serializer(JSON, "json", orjson.dumps, orjson.loads),
    MSGPACK: Serializer(MSGPACK, "msgpack", _msgpack_dumps, _msgpack_loads),
}
BY_NAME: Final[dict[str, Serializer]] = {s.name: s for s in SERIALIZERS.values()}
SERIALIZER_IDS: Final[frozenset[int]] = frozenset(SERIALIZERS)


def get(id_or_name: int | str) -> Serializer:
    """The serializer for an id (1, 2) or a name ("json", "msgpack")."""
    if isinstance(id_or_name, str):
        return BY_NAME[id_or_name]
    return SERIALIZERS[id_or_name]
