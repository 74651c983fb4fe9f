"""Length limits of packet fields: declared with Limit, enforced at decode with one
side's values (Limits), and U+0000 refused in every string."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bitchat.cluster.packets
import bitchat.im.packets
from bitchat import Limit, Packet, Server, Settings
from bitchat.errors import ProtocolError, UsageError, codes
from bitchat.im.packets import Ack, ChatMessage, Login, SendP2P
from bitchat.protocol import JSON, MSGPACK, Limits, decode_body
from bitchat.protocol.packets import MAX_LIST, MAX_STRING, registry
from conftest import make_registry


class Tagged(Packet, type=61200, register=False):
    name: Annotated[str, Limit("max_name_length")]
    labels: Annotated[list[str], Limit("max_labels")]  # a key of Settings.extra
    note: str = ""
    blob: bytes = b""
    scores: dict[str, int] | None = None
    tags: Annotated[list[str], Limit("max_labels")] | None = None
    extra: Any = None


def body(ser: int, data: Any) -> bytes:
    return orjson.dumps(data) if ser == JSON else msgpack.packb(data, use_bin_type=True)


def refused(limits: Limits, cls: type[Packet], data: Any, ser: int = MSGPACK) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        limits.decode_body(cls, ser, body(ser, data), 9)
    assert not info.value.fatal and info.value.request_id == 9
    return info.value


SMALL = Settings(max_name_length=4, max_string_length=5, max_list_length=2, extra={"max_labels": 3})


@pytest.mark.parametrize("ser", [JSON, MSGPACK])
def test_each_field_is_held_to_its_named_limit(ser: int) -> None:
    limits = Limits(SMALL)
    ok = {"name": "abcd", "labels": ["x", "y", "z"], "note": "12345", "scores": {"a": 1, "b": 2}}
    assert limits.decode_body(Tagged, ser, body(ser, ok)).labels == ["x", "y", "z"]
    cases = [
        ({"name": "abcde"}, "field 'name' must be at most 4 characters (max_name_length), not 5"),
        ({"labels": ["a"] * 4}, "a list of at most 3 items (max_labels), not 4"),
        ({"note": "123456"}, "field 'note' must be at most 5 characters (max_string_length)"),
        ({"labels": ["123456"]}, "items are each at most 5 characters (max_string_length)"),
        ({"scores": {"a": 1, "b": 2, "c": 3}}, "a map of at most 2 items (max_list_length)"),
        ({"scores": {"123456": 1}}, "keys are each at most 5 characters"),
        ({"tags": ["a", "b", "c", "d"]}, "field 'tags' must be a list of at most 3 items"),
    ]
    for change, message in cases:
        exc = refused(limits, Tagged, {**ok, **change}, ser)
        assert exc.code == codes.INVALID_PACKET
        assert message in exc.message, (change, exc.message)


def test_bytes_count_bytes() -> None:
    limits = Limits(SMALL)
    good = {"name": "a", "labels": [], "blob": b"\x00" * 5}  # NUL is fine in bytes
    assert limits.decode_body(Tagged, MSGPACK, body(MSGPACK, good)).blob == b"\x00" * 5
    exc = refused(limits, Tagged, {**good, "blob": b"123456"})
    assert "at most 5 bytes (max_string_length), not 6" in exc.message


@pytest.mark.parametrize("ser", [JSON, MSGPACK])
@pytest.mark.parametrize(
    "change",
    [
        {"name": "a\x00"},
        {"note": "\x00"},
        {"labels": ["ok", "no\x00"]},
        {"scores": {"k\x00": 1}},
        {"tags": ["\x00"]},
    ],
)
def test_nul_is_refused_in_every_string(ser: int, change: dict[str, Any]) -> None:
    exc = refused(Limits(SMALL), Tagged, {"name": "a", "labels": [], **change}, ser)
    assert exc.code == codes.INVALID_PACKET
    assert "U+0000" in exc.message


def test_a_limit_may_carry_its_own_code() -> None:
    limits = Limits(Settings(max_message_length=3))
    exc = refused(limits, SendP2P, {"to": 1, "text": "abcd"})
    assert exc.code == codes.MESSAGE_TOO_LONG
    assert "(max_message_length)" in exc.message
    # NUL is invalid_packet whatever the limit's code.
    assert refused(limits, SendP2P, {"to": 1, "text": "a\x00"}).code == codes.INVALID_PACKET


def test_without_limits_decoding_checks_types_only() -> None:
    huge = {"to": 1, "text": "x" * 10_000 + "\x00", "client_msg_id": "c" * 900_000}
    assert decode_body(SendP2P, MSGPACK, body(MSGPACK, huge)).text.endswith("\x00")
    assert SendP2P.from_dict(huge).client_msg_id == "c" * 900_000


def test_two_sides_in_one_process_decode_with_their_own_values() -> None:
    strict, lax = Limits(Settings(max_client_msg_id_length=8)), Limits(Settings())
    data = {"to": 1, "text": "hi", "client_msg_id": "c" * 9}
    assert lax.decode_body(SendP2P, MSGPACK, body(MSGPACK, data)).client_msg_id == "c" * 9
    assert "(max_client_msg_id_length)" in refused(strict, SendP2P, data).message
    # The values are read once, when a class's decoder is built.
    source = {"max_name_length": 4, MAX_STRING: 5, MAX_LIST: 2, "max_labels": 3}
    limits = Limits(source)
    limits.prepare([Tagged])
    source["max_name_length"] = 100
    assert "(max_name_length)" in refused(limits, Tagged, {"name": "abcde", "labels": []}).message


def test_a_limit_naming_no_setting_fails_where_the_decoder_is_built() -> None:
    with pytest.raises(UsageError, match="no setting 'max_labels'"):
        Limits(Settings()).prepare([Tagged])
    with pytest.raises(UsageError, match="must be an integer"):
        Limits({"max_name_length": "4"}).prepare([Tagged])


async def test_a_server_checks_its_handlers_limits_at_start() -> None:
    server = Server("127.0.0.1", 0, Settings(), registry=make_registry())

    @server.handler(Tagged)
    def tagged(session: Any, p: Tagged) -> None:
        return None

    with pytest.raises(UsageError, match="max_labels"):
        await server.start()
    server = Server("127.0.0.1", 0, Settings(extra={"max_labels": 2}), registry=make_registry())
    server.add_handler(Tagged, tagged)
    async with server:
        exc = refused(server.limits, Tagged, {"name": "a", "labels": ["a"] * 3})
        assert "max_labels" in exc.message


def test_a_limit_on_a_type_it_cannot_bound_is_refused_where_declared() -> None:
    with pytest.raises(UsageError, match="a Limit bounds str, bytes, list or dict"):

        class Bad(Packet, type=61201, register=False):
            n: Annotated[int, Limit("max_list_length")]


def test_a_class_with_its_own_from_dict_is_still_held_to_its_limits() -> None:
    class Legacy(Packet, type=61202, register=False):
        text: Annotated[str, Limit("max_name_length")]

        @classmethod
        def from_dict(cls, data: Any) -> Legacy:
            return cls(str(data.get("text", data.get("old_text", ""))))

    limits = Limits(Settings(max_name_length=3))
    assert limits.decode_body(Legacy, JSON, b'{"old_text": "abc"}').text == "abc"
    assert "(max_name_length)" in refused(limits, Legacy, {"old_text": "abcd"}).message


def _fields(cls: type[Packet]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def _bounded_kinds(tp: Any) -> list[tuple[Any, Limit | None]]:
    """Every str/bytes/list/dict inside an annotation, with the Limit it has."""
    limit = None
    if typing.get_origin(tp) is typing.Annotated:
        limit = next((m for m in tp.__metadata__ if isinstance(m, Limit)), None)
        tp = tp.__origin__
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return [
            (kind, limit or own)
            for a in typing.get_args(tp)
            if a is not type(None)
            for kind, own in _bounded_kinds(a)
        ]
    if tp in (str, bytes) or origin in (list, dict):
        return [(tp, limit)]
    return []


BUILT_IN = [
    cls
    for cls in registry
    if cls.__module__ in (bitchat.im.packets.__name__, bitchat.cluster.packets.__name__)
]


def test_every_built_in_packet_decodes_with_the_default_settings() -> None:
    assert len(BUILT_IN) > 20
    # Every class of the package, system ones too.
    Limits(Settings()).prepare(c for c in registry if c.__module__.startswith("bitchat."))


@pytest.mark.parametrize("cls", BUILT_IN, ids=lambda c: c.__name__)
def test_every_string_of_a_built_in_request_names_its_own_setting(cls: type[Packet]) -> None:
    settings = {f.name for f in dataclasses.fields(Settings)}
    for name, tp in _fields(cls).items():
        for kind, limit in _bounded_kinds(tp):
            if limit is not None:
                assert limit.setting in settings, (cls.__name__, name)
            elif kind is str:
                # Only fields the server itself writes may fall back to max_string_length.
                assert (cls.__name__, name) in {
                    ("ChatMessage", "kind"),
                    ("ChatMessage", "op"),
                    ("Receipt", "kind"),
                    ("GroupInfo", "role"),
                    ("GroupEvent", "event"),
                    ("GroupEvent", "role"),
                    ("NodeAddress", "host"),
                }, f"{cls.__name__}.{name} has no limit of its own"


def test_acks_and_client_ids_are_bounded() -> None:
    limits = Limits(Settings(max_ack_ids=3))
    assert limits.decode_body(Ack, MSGPACK, body(MSGPACK, {"msg_ids": [1, 2, 3]})).msg_ids
    assert "(max_ack_ids)" in refused(limits, Ack, {"msg_ids": [1, 2, 3, 4]}).message
    assert "(max_token_length)" in refused(limits, Login, {"token": "t" * 129}).message
    push = {"msg_id": 1, "kind": "p2p", "sender_id": 1, "sender_name": "a", "to": 2}
    exc = refused(limits, ChatMessage, {**push, "text": "", "ts": 0, "client_msg_id": "c" * 65})
    assert "(max_client_msg_id_length)" in exc.message


# -- the JSON fast path (msgspec): the same packets, or "decode the usual way" --------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)  # what orjson writes
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _near(cls: type[Packet]) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies of ``cls``'s own field names (some left out) with values of any kind."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return st.dictionaries(
        st.sampled_from([*names, "other"]), _json_values, max_size=len(names) + 1
    )


_SMALL = Limits(
    {
        **{k: v for k, v in dataclasses.asdict(Settings()).items() if type(v) is int},
        # Small bounds, so that the bodies drawn pass them too.
        "max_message_length": 10,
        "max_client_msg_id_length": 5,
        "max_ack_ids": 3,
        "max_name_length": 8,
        "max_fields_keys": 2,
        "max_password_length": 6,
        MAX_STRING: 6,
        MAX_LIST: 3,
    }
)


@pytest.mark.parametrize(
    "cls",
    [
        SendP2P,
        Ack,
        bitchat.im.packets.SendGroup,
        bitchat.im.packets.History,
        Login,
        bitchat.im.packets.ListOnline,
        bitchat.im.packets.Typing,
    ],
)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_json_fast_path_agrees_with_the_usual_decoder(
    cls: type[Packet], data: st.DataObject
) -> None:
    fast = _SMALL.fast_json(cls)
    assert fast is not None
    drawn = data.draw(_near(cls))
    raw = orjson.dumps(drawn)
    got = fast(raw)
    try:
        usual: Packet | ProtocolError = _SMALL.from_dict(cls)(orjson.loads(raw))
    except ProtocolError as exc:
        usual = exc
    if got is not None:  # what it takes, the usual way takes, as the same packet
        assert usual == got
    # And decode_body, the fast path first, decides as the usual way alone does.
    if isinstance(usual, ProtocolError):
        assert str(refused(_SMALL, cls, drawn, JSON)) == str(usual)
    else:
        assert decode_body(cls, JSON, raw, 0, _SMALL) == usual


def test_the_json_fast_path_takes_the_common_bodies() -> None:
    fast = _SMALL.fast_json(SendP2P)
    assert fast is not None
    assert fast(b'{"to": 3, "text": "hello", "client_msg_id": "c1"}') == SendP2P(3, "hello", "c1")
    assert _SMALL.fast_json(Ack) is not None
    assert _SMALL.fast_json(Ack)(b'{"msg_ids": [1, 2]}') == Ack([1, 2])  # type: ignore[misc]
    # What it leaves to the usual way: a NUL, a bound passed, typed fields, a bool for an int.
    for raw in (
        b'{"to": 3, "text": "a\\u0000"}',
        b'{"to": 3, "text": "12345678901"}',
        b'{"to": 3, "text": "x", "fields": {"a": 1}}',
        b'{"to": true, "text": "x"}',
        b'{"to": 9223372036854775808, "text": "x"}',
        b"[]",
        # Unknown keys, whose values msgspec would skip unchecked.
        b'{"to": 3, "text": "x", "other": 1}',
    ):
        assert fast(raw) is None, raw
    # Bodies orjson refuses that msgspec could skip over or choke on: refused, as before.
    deep = b"[" * 5000 + b"]" * 5000
    for raw in (
        b'{"to": 3, "text": "x", "other": "\xff"}',
        b'{"to": 3, "text": "x", "\xff": 1}',
        b'{"to": 3, "text": "x", "other": 1e400}',
        b'{"to": 3, "text": "x", "other": ' + deep + b"}",
        b'{"to": 3, "text": "x", "fields": {"a": ' + deep + b"}}",
    ):
        assert fast(raw) is None, raw[:60]
        with pytest.raises(ProtocolError) as refusal:
            decode_body(SendP2P, JSON, raw, 0, _SMALL)
        assert refusal.value.code == codes.BAD_BODY, raw[:60]
    # And the usual way names the error, as it always did.
    with pytest.raises(ProtocolError) as info:
        decode_body(SendP2P, JSON, b'{"to": 3, "text": "12345678901"}', 7, _SMALL)
    assert info.value.code == codes.MESSAGE_TOO_LONG and info.value.request_id == 7
