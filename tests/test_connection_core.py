"""The sans-I/O connection core: fed bytes, with a fake clock; no sockets, no sleeps.

Every input is fed whole, byte by byte, and split at every byte: the events and
the bytes the core answers with must not depend on how the peer's bytes came.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from bitchat.errors import codes
from bitchat.protocol.connection import (
    Connection,
    Event,
    Pause,
    ProtocolFailure,
    Push,
    Request,
    Response,
    Role,
)
from bitchat.protocol.frame import FLAG_ERROR, FLAG_POOL, FLAG_RESPONSE, Frame, FrameDecoder
from bitchat.protocol.packets import Packet, Ping
from conftest import make_registry

HEADER = struct.Struct(">BBBBHII")  # DESIGN.md section 2, independent of the code under test


class Hello(Packet, type=61400, register=False):
    name: str


class Secret(Packet, type=61401, register=False):
    pass


class Unhandled(Packet, type=61402, register=False):
    pass


REG = make_registry(Hello, Secret, Unhandled)


@dataclass(frozen=True)
class Rule:
    cls: type[Packet]
    login_required: bool = False


ROUTES: dict[int, Any] = {Hello.TYPE: Rule(Hello), Secret.TYPE: Rule(Secret, True)}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def frame(type_: int, body: Any = None, rid: int = 0, flags: int = 0, ser: int = 1) -> bytes:
    raw = b"{}" if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
    return HEADER.pack(0xBC, 1, ser, flags, type_, rid, len(raw)) + raw


def server(clock: Clock | None = None, **kw: Any) -> Connection:
    return Connection(Role.SERVER, clock=clock or Clock(), routes=ROUTES, known_types=REG, **kw)


def splits(data: bytes) -> Iterator[list[bytes]]:
    """The same bytes whole, byte by byte, and split in two at every byte."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def feed(core: Connection, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        core.receive_data(chunk)
        events.extend(core.events_received())
    return events


def sent(core: Connection) -> list[tuple[int, int, int, dict[str, Any]]]:
    """The frames the core wants to send, as (flags, type, request id, body)."""
    frames = FrameDecoder().feed(core.data_to_send())
    return [(f.flags, f.type, f.request_id, orjson.loads(f.body)) for f in frames]


RESP = FLAG_RESPONSE
ERR = FLAG_RESPONSE | FLAG_ERROR

CONVERSATION = (
    frame(1, rid=1)  # Ping
    + frame(Hello.TYPE, {"name": "gris"}, rid=2)
    + frame(Hello.TYPE, {"name": "houyi"}, rid=0)  # one-way
    + frame(2, rid=9, flags=RESP)  # a stray answer: dropped
    + frame(Unhandled.TYPE, rid=3)
    + frame(4242, rid=4)
    + frame(Hello.TYPE, {"nom": 1}, rid=5, flags=FLAG_POOL)
)


@pytest.mark.parametrize("chunks", list(splits(CONVERSATION)))
def test_server_events_and_answers_do_not_depend_on_the_split(chunks: list[bytes]) -> None:
    core = server()
    events = feed(core, chunks)
    assert [type(e) for e in events] == [Request, Request, Request]
    assert [(e.type, e.request_id, e.pool) for e in events] == [  # type: ignore[union-attr]
        (Hello.TYPE, 2, False),
        (Hello.TYPE, 0, False),
        (Hello.TYPE, 5, True),
    ]
    assert sent(core) == [
        (RESP, 2, 1, {}),
        (ERR, 3, 3, {"code": "no_handler", "message": "no handler for packet type 61402"}),
        (ERR, 3, 4, {"code": "unknown_type", "message": "unknown packet type 4242"}),
    ]
    assert core.unfinished == 3
    assert core.bytes_in == len(CONVERSATION) and core.frames_received == 7


def test_a_ping_body_is_checked_like_any_other() -> None:
    core = server()
    core.receive_data(frame(1, b"[1, 2]", rid=7) + frame(1, b"{ }", rid=8) + frame(1, b"{", rid=9))
    assert core.events_received() == []
    out = sent(core)
    assert out[0][:3] == (ERR, 3, 7) and out[0][3]["code"] == codes.INVALID_PACKET
    assert out[1] == (RESP, 2, 8, {})  # an empty map written otherwise is still a Ping
    assert out[2][:3] == (ERR, 3, 9) and out[2][3]["code"] == codes.BAD_BODY


def test_answers_leave_in_the_order_the_frames_came() -> None:
    # The core answers a Ping when its event is asked for, so an application that
    # answers each request before asking for the next keeps the connection's order.
    core = server()
    core.receive_data(frame(Hello.TYPE, {"name": "a"}, rid=1) + frame(1, rid=2))
    first = core.next_event()
    assert isinstance(first, Request)
    packet = core.admit(first, ROUTES[first.type], authenticated=False)
    core.complete(first, Hello(f"hi {packet.name}"))  # type: ignore[union-attr]
    assert core.next_event() is None
    assert sent(core) == [(RESP, Hello.TYPE, 1, {"name": "hi a"}), (RESP, 2, 2, {})]


def test_the_login_gate_comes_before_the_body_is_parsed() -> None:
    core = server()
    core.receive_data(frame(Secret.TYPE, b"not json", rid=1) + frame(Secret.TYPE, rid=2))
    gated, allowed = core.events_received()
    assert isinstance(gated, Request) and isinstance(allowed, Request)
    assert core.admit(gated, ROUTES[Secret.TYPE], authenticated=False) is None
    assert core.admit(allowed, ROUTES[Secret.TYPE], authenticated=True) == Secret()
    assert sent(core) == [(ERR, 3, 1, {"code": "unauthenticated", "message": "log in first"})]
    assert core.unfinished == 1  # the refused one is complete


def test_a_bad_body_is_an_error_on_its_request() -> None:
    core = server()
    core.receive_data(frame(Hello.TYPE, {"name": 5}, rid=3))
    (request,) = core.events_received()
    assert isinstance(request, Request)
    assert core.admit(request, ROUTES[Hello.TYPE], authenticated=False) is None
    ((flags, _, rid, body),) = sent(core)
    assert (flags, rid, body["code"]) == (ERR, 3, codes.INVALID_PACKET)


def test_the_rate_limit_runs_on_the_injected_clock() -> None:
    clock = Clock()
    core = server(clock, rate_limit=2.0, rate_burst=3)
    burst = b"".join(frame(Hello.TYPE, {"name": "x"}, rid=i) for i in range(1, 6))
    core.receive_data(burst)
    assert [e.request_id for e in core.events_received()] == [1, 2, 3]  # type: ignore[union-attr]
    assert [(rid, b["code"]) for _, _, rid, b in sent(core)] == [
        (4, "rate_limited"),
        (5, "rate_limited"),
    ]
    clock.now += 1.0  # two tokens back
    core.receive_data(b"".join(frame(Hello.TYPE, {"name": "x"}, rid=i) for i in range(6, 9)))
    assert [e.request_id for e in core.events_received()] == [6, 7]  # type: ignore[union-attr]
    assert [rid for _, _, rid, _ in sent(core)] == [8]
    clock.now += 1000.0  # a long quiet time refills to the burst, not beyond
    core.receive_data(b"".join(frame(Hello.TYPE, {"name": "x"}, rid=i) for i in range(9, 14)))
    assert len(core.events_received()) == 3


def test_pings_are_not_rate_limited() -> None:
    core = server(rate_limit=0.001, rate_burst=1)
    core.receive_data(b"".join(frame(1, rid=i) for i in range(1, 6)))
    assert core.events_received() == []
    assert [(f, rid) for f, _, rid, _ in sent(core)] == [(RESP, i) for i in range(1, 6)]


def test_unfinished_requests_pause_reading_at_the_bound_and_resume_at_half() -> None:
    core = server(max_pending_requests=4)
    changes: list[bool] = []
    core.on_reading = changes.append
    core.receive_data(b"".join(frame(Hello.TYPE, {"name": "x"}, rid=i) for i in range(1, 6)))
    events = core.events_received()
    assert len(events) == 5  # what arrived is handed out; reading stops for more
    assert changes == [True] and core.paused == {Pause.REQUESTS}
    for e in events[:2]:
        core.complete(e, None)  # type: ignore[arg-type]
    assert changes == [True]  # 3 unfinished: above half of 4
    core.complete_error(events[2], "x", "y")  # type: ignore[arg-type]
    assert changes == [True, False] and core.paused == frozenset()


def test_write_pause_and_request_pause_are_reasons_of_one_state() -> None:
    core = server(max_pending_requests=2)
    changes: list[bool] = []
    core.on_reading = changes.append
    core.pause_writing()
    core.receive_data(frame(Hello.TYPE, {"name": "x"}, rid=1) + frame(Hello.TYPE, {"name": "y"}))
    events = core.events_received()
    assert core.paused == {Pause.WRITING, Pause.REQUESTS} and changes == [True]
    core.resume_writing()
    assert changes == [True] and core.is_paused(Pause.REQUESTS)
    for e in events:
        core.complete(e, None)  # type: ignore[arg-type]
    assert changes == [True, False]


BAD_HEADERS = [
    (b"\x00", codes.BAD_MAGIC),
    (HEADER.pack(0xBC, 2, 1, 0, 1, 0, 0), codes.BAD_VERSION),
    (HEADER.pack(0xBC, 1, 9, 0, 1, 0, 0), codes.BAD_SERIALIZER),
    (HEADER.pack(0xBC, 1, 1, 0x80, 1, 0, 0), codes.BAD_FLAGS),
    (HEADER.pack(0xBC, 1, 1, 0, 1, 0, (1 << 20) + 1), codes.FRAME_TOO_LARGE),
]


@pytest.mark.parametrize(("bad", "code"), BAD_HEADERS)
def test_frames_before_bad_bytes_run_then_the_failure_comes_last(bad: bytes, code: str) -> None:
    data = frame(1, rid=1) + frame(Hello.TYPE, {"name": "a"}, rid=2) + bad
    for chunks in splits(data):
        core = server()
        events = feed(core, chunks)
        assert [type(e) for e in events] == [Request, ProtocolFailure]
        failure = events[-1]
        assert isinstance(failure, ProtocolFailure) and failure.error.code == code
        request = events[0]
        assert isinstance(request, Request)
        core.complete(request, Hello("ok"))
        core.fail(failure.error)  # the application answers the failure after the request
        out = sent(core)
        assert [(f, t, rid) for f, t, rid, _ in out] == [
            (RESP, 2, 1),
            (RESP, Hello.TYPE, 2),
            (ERR, 3, 0),
        ]
        assert out[-1][3]["code"] == code
        core.receive_data(frame(1, rid=3))  # nothing is read after the framing is lost
        assert core.events_received() == [] and core.data_to_send() == b""
        assert core.failed and core.error is failure.error


def test_fail_from_outside_drops_what_was_not_yet_handed_out() -> None:
    core = server()
    core.receive_data(frame(Hello.TYPE, {"name": "a"}, rid=1))
    from bitchat.errors import ProtocolError

    core.fail(ProtocolError(codes.BAD_MESSAGE, "two frames in one message"))
    assert core.next_event() is None
    ((flags, _, rid, body),) = sent(core)
    assert (flags, rid, body["code"]) == (ERR, 0, codes.BAD_MESSAGE)


def test_output_is_coalesced_and_announced_once() -> None:
    core = server()
    calls: list[int] = []
    core.on_output = lambda: calls.append(core.pending_output)
    core.send_packet(Hello("a"))
    core.send_packet(Hello("b"))
    core.send_frame(frame(Hello.TYPE, {"name": "c"}))
    assert len(calls) == 1  # the adapter schedules one write for all three
    frames = core.frames_to_send()
    assert [orjson.loads(f[14:])["name"] for f in frames] == ["a", "b", "c"]
    assert core.pending_output == 0 and core.data_to_send() == b""
    core.send_packet(Hello("d"))
    assert len(calls) == 2


def test_pushes_go_out_in_the_serializer_the_peer_used_last() -> None:
    core = server()
    core.receive_data(frame(1, rid=1, body=b"\x80", ser=2))  # a MessagePack Ping
    assert core.events_received() == []
    core.data_to_send()
    core.send_packet(Hello("x"))
    (f,) = FrameDecoder().feed(core.data_to_send())
    assert f.serializer == 2 and f.body == b"\x81\xa4name\xa1x"


def test_idle_time_comes_from_the_clock() -> None:
    clock = Clock()
    core = server(clock)
    clock.now += 4.0
    assert core.idle_for() == 4.0
    core.receive_data(frame(1)[:3])  # any byte counts, even half a header
    assert core.idle_for() == 0.0


# -- client side ---------------------------------------------------------------------------


def client() -> Connection:
    return Connection(Role.CLIENT, clock=Clock())


@pytest.mark.parametrize("split", [0, 1, 2])
def test_client_gets_answers_it_awaits_and_pushes(split: int) -> None:
    core = client()
    a = core.send_request(Hello("a"))
    b = core.send_request(Hello("b"), pool=True)
    ping = core.send_request(Ping(), expect=False)
    assert (a, b, ping) == (1, 2, 3)
    out = FrameDecoder().feed(core.data_to_send())
    assert [(f.flags, f.request_id) for f in out] == [(0, 1), (FLAG_POOL, 2), (0, 3)]
    stray: list[Frame] = []
    core.on_stray = stray.append
    core.forget(b)  # timed out
    data = (
        frame(Hello.TYPE, {"name": "A"}, rid=a, flags=RESP)
        + frame(Hello.TYPE, {"name": "B"}, rid=b, flags=RESP)  # late: dropped
        + frame(2, rid=ping, flags=RESP)  # the heartbeat's Pong: not awaited
        + frame(Hello.TYPE, {"name": "pushed"})
        + frame(1, rid=77)  # the server may ping too: answered here
        + frame(Hello.TYPE, {"name": "again"}, rid=a, flags=RESP)  # answered already
    )
    chunks = list(splits(data))[split]
    events = feed(core, chunks)
    assert [type(e) for e in events] == [Response, Push]
    assert [e.request_id for e in events] == [a, 0]  # type: ignore[union-attr]
    assert [f.request_id for f in stray] == [b, ping, a]
    assert [(f.flags, f.type, f.request_id) for f in FrameDecoder().feed(core.data_to_send())] == [
        (RESP, 2, 77)
    ]
    assert core.awaiting == 0


def test_client_request_ids_wrap_and_skip_ids_still_awaited() -> None:
    core = client()
    core._next_id = 0xFFFFFFFE
    assert core.send_request(Hello("x")) == 0xFFFFFFFF
    first = core.send_request(Hello("y"))
    assert first == 1
    core._next_id = 0xFFFFFFFF
    assert core.send_request(Hello("z")) == 2  # 1 still awaits its answer
    core.forget_all()
    assert core.awaiting == 0


def test_client_side_failure_ends_input_without_an_error_to_the_server() -> None:
    core = client()
    core.receive_data(frame(Hello.TYPE, {"name": "p"}) + b"\x00garbage")
    events = core.events_received()
    assert [type(e) for e in events] == [Push, ProtocolFailure]
    assert core.data_to_send() == b""
