"""Property-based fuzzing (hypothesis) of the decoder and of every handler.

Random packets of every registered type, with random field values of random
types, and random bodies, in JSON and MessagePack, go over real sockets to a
real standalone server with the IM service (its limits made small so that
random values cross them), from a logged-in connection and from an anonymous
one; each handled type gets examples of its own, then frames of any type. No
answer may be ``internal_error``, the server logs no error, and it keeps
serving an honest client. The server runs on a loop in a thread of its own,
so the examples are plain blocking socket calls; about 10 s in all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import struct
import threading
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from bitchat import Packet, Settings
from bitchat.app import build_server
from bitchat.errors import ProtocolError, codes
from bitchat.im.packets import (
    ChatMessage,
    CreateGroup,
    GroupInfo,
    JoinGroup,
    ListOnline,
    Login,
    LoginOk,
    Logout,
    OnlineUsers,
    Register,
    SendAck,
    SendP2P,
)
from bitchat.protocol import FLAG_POOL, Limits, decode_body
from bitchat.protocol.packets import registry
from conftest import WAIT
from im_helpers import im_settings

_HEADER = struct.Struct(">BBBBHII")
JSON, MSGPACK = 1, 2
ERROR = 3

SMALL_LIMITS: dict[str, Any] = {
    "max_string_length": 64,
    "max_list_length": 8,
    "max_message_length": 40,
    "max_name_length": 12,
    "max_password_length": 16,
    "max_group_name_length": 12,
    "max_client_msg_id_length": 16,
    "max_token_length": 48,
    "max_ack_ids": 8,
    "history_max_page": 5,
    "max_groups_per_user": 5,
}

CLASSES = sorted((c for c in registry if c.__module__.startswith("bitchat.")), key=lambda c: c.TYPE)
HANDLED = [
    route.cls
    for route in build_server(Settings(host="127.0.0.1", port=0)).dispatcher.routes.values()
]
"""The requests the server handles (the other types are refused before any handler)."""


# -- values -------------------------------------------------------------------------------------

texts = st.one_of(
    st.sampled_from(["houyi", "fuzzer", "secret", "moon", "hi", "c1", "", " ", "\x00"]),
    st.text(alphabet="abc\x00 é😀\t-", max_size=14),
    st.text(max_size=20),
    st.integers(0, 120).map(lambda n: "x" * n),  # across the limits
)
ints = st.one_of(
    st.sampled_from([0, 1, 2, 3, -1]),  # ids that exist, and none
    st.sampled_from([0, 1, 2, 3, -1]),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.integers(-(1 << 64), (1 << 64) - 1),  # past 64 bits
)
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), texts)
wild = st.recursive(
    scalars | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=12) | st.dictionaries(texts, inner, max_size=6),
    max_leaves=24,
)


def of_type(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a field's annotation (within or across its limits)."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = tp.__origin__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        return ints
    if tp is str:
        return texts
    if tp is bool:
        return st.booleans()
    if tp is float:
        return st.floats()
    if tp is bytes:
        return st.binary(max_size=80)
    if origin in (types.UnionType, typing.Union):
        return st.one_of(*(st.none() if a is type(None) else of_type(a) for a in args))
    if origin is list:
        return st.lists(of_type(args[0]), max_size=12)
    if origin is dict:
        return st.dictionaries(texts, of_type(args[1]), max_size=6)
    return wild


@st.composite
def bodies(draw: Any, cls: type[Packet]) -> Any:
    """A body map for ``cls``: mostly well-typed fields, some missing, some of another
    type, junk keys; or any value at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(wild)
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        how = draw(st.integers(0, 19))
        optional = f.default is not dataclasses.MISSING
        if how == 0 or (optional and how < 7):  # defaults are left out a third of the time
            continue
        out[f.name] = draw(wild if how == 1 else of_type(hints[f.name]))
    if draw(st.integers(0, 9)) == 0:
        out.update(draw(st.dictionaries(texts, wild, max_size=3)))
    return out


def encode(ser: int, body: Any) -> bytes:
    if ser == JSON:
        # The standard module writes what orjson would not (integers past 64 bits,
        # Infinity): the server must refuse it cleanly.
        try:
            return json.dumps(body, ensure_ascii=False).encode()
        except (TypeError, ValueError):  # bytes inside
            assume(False)
    try:
        return msgpack.packb(body, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        assume(False)
    raise AssertionError("unreachable")


@st.composite
def frames(draw: Any) -> tuple[int, int, int, bytes]:
    """(serializer, flags, type, body bytes)."""
    ser = draw(st.sampled_from([JSON, MSGPACK]))
    flags = draw(st.sampled_from([0, FLAG_POOL]))
    pick = draw(st.integers(0, 19))
    if pick == 0:
        return ser, flags, draw(st.integers(0, 0xFFFF)), draw(st.binary(max_size=40))
    cls = draw(st.sampled_from(CLASSES if pick < 4 else HANDLED))
    if pick == 1:
        return ser, flags, cls.TYPE, draw(st.binary(max_size=40))
    return ser, flags, cls.TYPE, encode(ser, draw(bodies(cls)))


# -- the decoder alone --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(frames())
def test_the_decoder_raises_only_protocol_errors(frame: tuple[int, int, int, bytes]) -> None:
    ser, _, type_, body = frame
    cls = registry.get(type_)
    assume(cls is not None)
    assert cls is not None
    for limits in (None, Limits(Settings(**SMALL_LIMITS))):
        try:
            packet = decode_body(cls, ser, body, 7, limits)
        except ProtocolError as exc:
            assert not exc.fatal and exc.request_id == 7
            assert exc.code in (codes.BAD_BODY, codes.INVALID_PACKET, codes.MESSAGE_TOO_LONG)
        else:
            assert isinstance(packet, cls)


# -- the server ---------------------------------------------------------------------------------


class Peer:
    """A blocking socket that frames packets by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.rid = 0

    def request(self, ser: int, flags: int, type_: int, body: bytes) -> tuple[int, Any]:
        """Send one request; the type and body of its answer (pushes are skipped)."""
        self.rid += 1
        self.sock.sendall(_HEADER.pack(0xBC, 1, ser, flags, type_, self.rid, len(body)) + body)
        while True:
            head = self._read(14)
            _, _, fser, _, ftype, frid, n = _HEADER.unpack(head)
            raw = self._read(n)
            got = json.loads(raw) if fser == JSON else msgpack.unpackb(raw, raw=False)
            if ftype == ERROR:
                assert got["code"] != codes.INTERNAL, got
            if frid == self.rid:
                return ftype, got

    def login(self, name: str) -> None:
        body = json.dumps({"name": name, "password": "secret"}).encode()
        type_, got = self.request(JSON, 0, Login.TYPE, body)
        assert type_ == LoginOk.TYPE, got

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise AssertionError("the server closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


class Errors(logging.Handler):
    """The error records of the server's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Fuzzed:
    """The fuzzed server (on a loop in a thread of its own), its error log, and two
    connections to it: one anonymous, one logged in."""

    RELOGGING = frozenset({Login.TYPE, Logout.TYPE, Register.TYPE})

    def __init__(self, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        # The anonymous connection lives through every fuzzed handler: no login deadline
        # (nor idle one) may close it meanwhile.
        settings = im_settings(
            data_dir,
            host="127.0.0.1",
            port=0,
            login_timeout=0,
            read_idle_timeout=0,
            **SMALL_LIMITS,
        )
        self.server = build_server(settings)
        self.errors = Errors()
        self.thread = threading.Thread(target=self._run, name="fuzzed-server", daemon=True)
        self.peers: dict[str, Peer] = {}

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        for name in ("bitchat", "asyncio"):
            logging.getLogger(name).addHandler(self.errors)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(WAIT)
        self.port = self.server.address[1]
        for who in ("anonymous", "logged in"):
            self.reconnect(who)
        # Something for small ids to find: users 1 and 2, group 1 of both, a message.
        me, other = self.peers["logged in"], Peer(self.port)
        other.login("other")
        assert me.request(JSON, 0, CreateGroup.TYPE, b'{"name": "moon"}')[0] == GroupInfo.TYPE
        assert other.request(JSON, 0, JoinGroup.TYPE, b'{"group_id": 1}')[0] == GroupInfo.TYPE
        assert me.request(JSON, 0, SendP2P.TYPE, b'{"to": 2, "text": "hi"}')[0] == SendAck.TYPE
        other.close()

    def reconnect(self, who: str) -> None:
        if who in self.peers:
            self.peers[who].close()
        self.peers[who] = peer = Peer(self.port)
        if who == "logged in":
            peer.login("fuzzer")

    def send(self, who: str, frame: tuple[int, int, int, bytes]) -> None:
        """One request; it must not be answered ``internal_error``."""
        ser, flags, type_, body = frame
        answered, got = self.peers[who].request(ser, flags, type_, body)
        event(f"{who}: {got['code'] if answered == ERROR else answered}")
        if type_ in self.RELOGGING or answered == LoginOk.TYPE:
            self.reconnect(who)  # it may have logged the connection in or out

    def stop(self) -> None:
        try:
            for peer in self.peers.values():
                peer.close()
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(WAIT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
            self.loop.close()
            for name in ("bitchat", "asyncio"):
                logging.getLogger(name).removeHandler(self.errors)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    f = Fuzzed(tmp_path_factory.mktemp("fuzzed"))
    f.start()
    try:
        yield f
    finally:
        f.stop()


FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
PEERS = st.sampled_from(["anonymous", "logged in", "logged in", "logged in"])


@st.composite
def requests_of(draw: Any, cls: type[Packet]) -> tuple[int, int, int, bytes]:
    ser = draw(st.sampled_from([JSON, MSGPACK]))
    flags = draw(st.sampled_from([0, FLAG_POOL]))
    return ser, flags, cls.TYPE, encode(ser, draw(bodies(cls)))


# Each handler gets its share of examples (one random stream gives a few to most).
@pytest.mark.parametrize("cls", HANDLED, ids=lambda c: c.__name__)
def test_no_request_to_a_handler_gets_internal_error(fuzzed: Fuzzed, cls: type[Packet]) -> None:
    @settings(FUZZ, max_examples=80)
    @given(requests_of(cls), PEERS)
    def one(frame: tuple[int, int, int, bytes], who: str) -> None:
        fuzzed.send(who, frame)

    logged = len(fuzzed.errors.records)
    one()
    assert not fuzzed.errors.records[logged:], [r.getMessage() for r in fuzzed.errors.records]


def test_no_frame_of_any_type_gets_internal_error(fuzzed: Fuzzed) -> None:
    @settings(FUZZ, max_examples=200)
    @given(frames(), PEERS)
    def one(frame: tuple[int, int, int, bytes], who: str) -> None:
        fuzzed.send(who, frame)

    logged = len(fuzzed.errors.records)
    one()
    assert not fuzzed.errors.records[logged:], [r.getMessage() for r in fuzzed.errors.records]


def test_after_the_fuzzing_an_honest_pair_is_served(fuzzed: Fuzzed) -> None:
    a, b = Peer(fuzzed.port), Peer(fuzzed.port)
    try:
        a.login("honest-a")
        b.login("honest-b")
        type_, online = b.request(JSON, 0, ListOnline.TYPE, b"{}")
        assert type_ == OnlineUsers.TYPE
        ids = {u["name"]: u["id"] for u in online["users"]}
        send = json.dumps({"to": ids["honest-b"], "text": "still served"}).encode()
        assert a.request(JSON, 0, SendP2P.TYPE, send)[0] == SendAck.TYPE
        _, _, _, _, type_, _, n = _HEADER.unpack(b._read(14))
        assert type_ == ChatMessage.TYPE and json.loads(b._read(n))["text"] == "still served"
    finally:
        a.close()
        b.close()
