"""Packets: field validation, the registry, body encoding."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import orjson
import pytest

from bitchat import Error, Packet, Ping, Pong, Registry, registry
from bitchat.errors import ProtocolError, UsageError, codes
from bitchat.protocol import JSON, MSGPACK, SERIALIZERS, decode_body, encode_body
from bitchat.protocol.serializers import get as get_serializer


class Sample(Packet, type=61100, register=False):
    n: int
    x: float
    ok: bool
    name: str
    blob: bytes
    tags: list[str]
    scores: dict[str, int]
    note: str | None = None
    count: int = 0
    extra: Any = None


GOOD: dict[str, Any] = {
    "n": 1,
    "x": 1.5,
    "ok": True,
    "name": "a",
    "blob": b"\x00\xff",
    "tags": ["t"],
    "scores": {"a": 1},
}


def dec(data: Any, cls: type[Packet] = Sample, ser: int = MSGPACK, rid: int = 0) -> Any:
    return decode_body(cls, ser, msgpack.packb(data, use_bin_type=True), rid)


def invalid(data: Any, cls: type[Packet] = Sample) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        dec(data, cls, rid=77)
    exc = info.value
    assert exc.code == codes.INVALID_PACKET
    assert not exc.fatal
    assert exc.request_id == 77
    return exc


def test_a_packet_is_a_dataclass_with_its_type() -> None:
    p = Sample(1, 2.0, False, "n", b"", [], {})
    assert dataclasses.is_dataclass(p)
    assert Sample.TYPE == 61100 and Sample.POOL is False
    assert p.to_dict() == {
        "n": 1,
        "x": 2.0,
        "ok": False,
        "name": "n",
        "blob": b"",
        "tags": [],
        "scores": {},
        "note": None,
        "count": 0,
        "extra": None,
    }


def test_valid_body_decodes() -> None:
    p = dec(GOOD)
    assert p == Sample(**GOOD)
    assert p.note is None and p.count == 0


def test_missing_required_field() -> None:
    for name in ("n", "x", "ok", "name", "blob", "tags", "scores"):
        data = dict(GOOD)
        del data[name]
        assert repr(name) in invalid(data).message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", "1"),
        ("n", 1.0),
        ("n", True),  # a bool is not an int
        ("n", None),
        ("x", "1.5"),
        ("x", False),
        ("ok", 1),
        ("ok", 0),
        ("ok", "true"),
        ("name", 3),
        ("name", b"a"),
        ("blob", "ab"),
        ("tags", "t"),
        ("tags", [1]),
        ("tags", {"t": 1}),
        ("scores", [["a", 1]]),
        ("scores", {"a": "1"}),
        ("scores", {"a": True}),
        ("note", 5),
        ("count", None),
    ],
)
def test_wrong_type(field: str, value: Any) -> None:
    exc = invalid({**GOOD, field: value})
    assert repr(field) in exc.message


@pytest.mark.parametrize("value", [1 << 63, (1 << 64) - 1])  # MessagePack carries u64
@pytest.mark.parametrize("field", ["n", "count", "scores"])
def test_ints_must_fit_in_64_bits_signed(field: str, value: int) -> None:
    """Ids reach the stores as signed 64-bit integers: larger ones are bad input."""
    body = {**GOOD, field: {"a": value} if field == "scores" else value}
    exc = invalid(body)
    assert repr(field) in exc.message and "64-bit integer" in exc.message
    edge = {**GOOD, "n": (1 << 63) - 1, "count": -(1 << 63)}
    assert (dec(edge).n, dec(edge).count) == ((1 << 63) - 1, -(1 << 63))


def test_int_is_accepted_for_float_and_becomes_one() -> None:
    p = dec({**GOOD, "x": 3})
    assert p.x == 3.0 and type(p.x) is float


def test_optional_fields() -> None:
    assert dec({**GOOD, "note": None}).note is None
    assert dec({**GOOD, "note": "hi"}).note == "hi"

    class Opt(Packet, type=61101, register=False):
        maybe: int | None  # required, but may be null

    assert decode_body(Opt, JSON, b'{"maybe":null}').maybe is None
    with pytest.raises(ProtocolError):
        decode_body(Opt, JSON, b"{}")


def test_nested_containers_are_checked_all_the_way_down() -> None:
    class Deep(Packet, type=61102, register=False):
        rows: list[dict[str, list[int]]]

    assert decode_body(Deep, JSON, b'{"rows":[{"a":[1,2]},{}]}').rows == [{"a": [1, 2]}, {}]
    for bad in (b'{"rows":[{"a":[1,"2"]}]}', b'{"rows":[[1]]}', b'{"rows":{"a":[]}}'):
        with pytest.raises(ProtocolError):
            decode_body(Deep, JSON, bad)


def test_dict_keys_must_be_strings() -> None:
    assert "scores" in invalid({**GOOD, "scores": {b"a": 1}}).message
    with pytest.raises(ProtocolError) as info:  # MessagePack itself refuses int keys
        dec({**GOOD, "scores": {1: 1}})
    assert not info.value.fatal


def test_any_takes_anything() -> None:
    for v in (None, 1, "x", [1, {"a": None}], {"k": [True]}):
        assert dec({**GOOD, "extra": v}).extra == v


def test_unknown_keys_are_ignored() -> None:
    p = dec({**GOOD, "from_the_future": [1, 2, 3], "n": 5})
    assert p.n == 5
    assert not hasattr(p, "from_the_future")


def test_body_must_be_a_map() -> None:
    for body in ([1, 2], "x", None, 3):
        assert "map" in invalid(body).message


@pytest.mark.parametrize("ser", [JSON, MSGPACK])
def test_body_that_does_not_deserialize(ser: int) -> None:
    for raw in (b"", b"\xc1", b"{not json", b"\x81"):
        with pytest.raises(ProtocolError) as info:
            decode_body(Sample, ser, raw, 5)
        assert info.value.code == codes.BAD_BODY
        assert not info.value.fatal
        assert info.value.request_id == 5


def test_json_and_msgpack_bodies() -> None:
    p = Sample(1, 2.5, True, "é", b"\x01", ["a"], {"b": 2}, note="n")
    packed = encode_body(p, MSGPACK)
    assert msgpack.unpackb(packed, raw=False) == p.to_dict()
    assert decode_body(Sample, MSGPACK, packed) == p
    assert orjson.loads(encode_body(Error("c", "é"), JSON)) == {"code": "c", "message": "é"}
    # bytes fields need MessagePack: JSON has no bytes type.
    with pytest.raises(TypeError):
        encode_body(p, JSON)


def test_serializers_by_id_and_name() -> None:
    assert get_serializer("json") is SERIALIZERS[JSON] and get_serializer(1).name == "json"
    assert get_serializer("msgpack") is SERIALIZERS[MSGPACK] and get_serializer(2).id == 2


def test_system_packets() -> None:
    assert (Ping.TYPE, Pong.TYPE, Error.TYPE) == (1, 2, 3)
    assert registry.get(1) is Ping and registry.get(2) is Pong and registry.get(3) is Error
    err = decode_body(Error, JSON, b'{"code":"nope"}')
    assert (err.code, err.message) == ("nope", "")
    assert encode_body(Ping(), JSON) == b"{}"


# -- the registry -----------------------------------------------------------------------------


def test_declaring_a_packet_registers_it() -> None:
    class Registered(Packet, type=61110):
        a: int

    try:
        assert registry.get(61110) is Registered
        assert 61110 in registry
        assert Registered in list(registry)
    finally:
        registry.unregister(Registered)
    assert registry.get(61110) is None


def test_duplicate_type_is_refused() -> None:
    class First(Packet, type=61111):
        a: int

    try:
        with pytest.raises(UsageError, match="61111"):

            class Second(Packet, type=61111):
                b: int

        assert registry.get(61111) is First
        registry.register(First)  # registering the same class again is harmless
    finally:
        registry.unregister(First)


def test_registries_are_independent() -> None:
    class A(Packet, type=61120, register=False):
        pass

    class B(Packet, type=61120, register=False):
        pass

    r1, r2 = Registry(), Registry()
    r1.register(A)
    r2.register(B)
    assert r1.get(61120) is A and r2.get(61120) is B
    assert 61120 not in registry
    with pytest.raises(UsageError):
        r1.register(B)
    r1.unregister(B)  # not its class: nothing happens
    assert r1.get(61120) is A
    r1.unregister(A)
    assert 61120 not in r1 and r2.get(61120) is B


def test_type_must_fit_in_u16() -> None:
    for bad in (-1, 0x10000):
        with pytest.raises(UsageError):

            class Bad(Packet, type=bad, register=False):
                pass


def test_unsupported_field_types_are_refused_where_declared() -> None:
    with pytest.raises(UsageError, match="complex"):

        class Weird(Packet, type=61130, register=False):
            when: complex

    with pytest.raises(UsageError, match="str"):

        class BadKeys(Packet, type=61131, register=False):
            m: dict[int, str]

    with pytest.raises(UsageError, match="None"):

        class BadUnion(Packet, type=61132, register=False):
            u: int | str


def test_pool_default_and_inheritance() -> None:
    class Slow(Packet, type=61140, register=False, pool=True):
        a: int

    class Slower(Slow):
        b: int = 0

    assert Slow.POOL and Slower.POOL
    assert Slower.TYPE == 61140
    assert decode_body(Slower, JSON, b'{"a":1,"b":2}') == Slower(1, 2)
