"""The connection core: one peer's side of the wire protocol, sans I/O.

Like h11's ``Connection`` and the websockets library's ``Protocol``, a
:class:`Connection` is fed the bytes that arrived (:meth:`~Connection.receive_data`),
hands back events one at a time (:meth:`~Connection.next_event`), and holds the
bytes to send (:meth:`~Connection.data_to_send`).
It imports nothing from asyncio and reads time only from the clock it is given,
so every rule below is tested by feeding bytes, without sockets or sleeps.

The rules it owns, for both ends (the server's sessions over TCP and WebSocket,
:class:`bitchat.Client`, the bench's load generator):

- framing (:class:`~bitchat.protocol.frame.FrameDecoder`); a bad header is a
  :class:`ProtocolFailure` event, after which input is ignored; answered with
  :meth:`~Connection.fail`, the server side queues an Error for the peer
  (framing is lost: the adapter closes);
- Ping is answered with Pong here, once its body is checked like any other;
- server side: responses from the peer are stray and dropped; a request over
  the token bucket (``rate_limit`` per second, ``rate_burst`` deep) is refused
  with ``rate_limited``; a type without a handler is refused with
  ``unknown_type`` or ``no_handler``; requests handed out and not yet
  :meth:`~Connection.complete`\\ d are bounded by ``max_pending_requests``
  (reading pauses at the bound and resumes at half); :meth:`~Connection.admit`
  applies the login gate before a body is parsed, then parses it with the
  length limits of its :class:`~bitchat.protocol.packets.Limits` (a string or
  list over its limit, or a NUL in a string, is refused before any handler);
- client side: request ids are issued here, and a response is handed out only
  for a request still awaited (late answers to timed-out requests are dropped).

Events are :class:`Request` (server side), :class:`Response` and :class:`Push`
(client side): frames, tuples of ``(serializer, flags, type, request_id,
body)`` with the body still serialized, made by the decoder itself so an event
costs no object of its own; and :class:`ProtocolFailure`, always last.

Flow control is a set of :class:`Pause` reasons. The adapter reports its
transport's write buffer (:meth:`~Connection.pause_writing` /
:meth:`~Connection.resume_writing`); the core tells the adapter to stop or start
reading through ``on_reading(paused)`` when the set becomes non-empty or empty.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass
from operator import length_hint
from typing import Protocol

from bitchat.errors import ProtocolError, codes
from bitchat.protocol.frame import (
    FLAG_ERROR,
    FLAG_POOL,
    FLAG_RESPONSE,
    MAX_REQUEST_ID,
    Frame,
    FrameDecoder,
    encode_frame,
)
from bitchat.protocol.packets import Limits, Packet, Ping, Pong, decode_body
from bitchat.protocol.serializers import JSON, SERIALIZER_IDS, SERIALIZERS

PING = Ping.TYPE
PONG = Pong.TYPE
ERROR = 3

_RESP = FLAG_RESPONSE
_RESP_ERR = FLAG_RESPONSE | FLAG_ERROR
_EMPTY_BODIES = {sid: SERIALIZERS[sid].dumps({}) for sid in SERIALIZER_IDS}


class Role(enum.Enum):
    """Which end of the connection the core plays."""

    SERVER = "server"
    CLIENT = "client"


class Pause(enum.Enum):
    """Why reading from the peer is paused."""

    WRITING = "writing"
    """The peer is not reading what we send: the write buffer is above its high mark."""
    REQUESTS = "requests"
    """Too many of the peer's requests are handed out and not yet complete."""


class Request(Frame):
    """Event (server side): a request, or a one-way packet when ``request_id`` is 0."""

    __slots__ = ()

    @property
    def pool(self) -> bool:
        """The POOL flag: handle off the I/O loop, when the handler allows it."""
        return bool(self.flags & FLAG_POOL)


class Response(Frame):
    """Event (client side): the answer to a request still awaited; an Error if
    ``flags`` has ``FLAG_ERROR``."""

    __slots__ = ()


class Push(Frame):
    """Event (client side): a packet the server sent on its own (request id 0)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ProtocolFailure:
    """Event: the peer broke the framing; nothing more is read. Always the last event."""

    error: ProtocolError


Event = Request | Response | Push | ProtocolFailure


class Rule(Protocol):
    """What the core needs of a packet type's handler (``dispatch.Route`` is one)."""

    @property
    def cls(self) -> type[Packet]: ...

    @property
    def login_required(self) -> bool: ...


class Connection:
    """One end of one bitchat connection (see the module docstring)."""

    __slots__ = (
        "_awaiting",
        "_burst",
        "_decoder",
        "_failed",
        "_failure",
        "_it",
        "_next_id",
        "_out",
        "_out_size",
        "_paused",
        "_rate",
        "_resume_at",
        "_server",
        "_tokens",
        "_tokens_at",
        "_told",
        "bytes_in",
        "bytes_out",
        "clock",
        "error",
        "frame_started",
        "frames_received",
        "known_types",
        "last_received",
        "limits",
        "max_pending",
        "on_error",
        "on_output",
        "on_reading",
        "on_stray",
        "role",
        "routes",
        "serializer",
        "unfinished",
    )

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
        rate_limit: float = 0.0,
        rate_burst: int = 0,
        max_pending_requests: int = 256,
        routes: Mapping[int, Rule] | None = None,
        known_types: Container[int] = (),
        limits: Limits | None = None,
    ) -> None:
        self.role = role
        server = role is Role.SERVER
        self._decoder = FrameDecoder(
            max_frame_size, request_class=Request if server else Push, response_class=Response
        )
        self.clock = clock
        self.routes: Mapping[int, Rule] = routes if routes is not None else {}
        """Server side: the handled packet types (the dispatcher's table)."""
        self.known_types = known_types
        """Server side: registered types, to tell ``no_handler`` from ``unknown_type``."""
        self.limits = limits
        """Server side: the length limits requests are decoded with (None: types only)."""
        self.serializer = JSON
        """The serializer of the peer's last frame: pushes go out in it."""
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_received = 0
        self.frame_started: float | None = None
        """Clock reading when the frame now partly received began (None: none is),
        for the adapter's deadline to complete a frame."""
        self.last_received = clock()
        """Clock reading of the last input (for the adapter's idle timeout)."""
        self.max_pending = max(1, max_pending_requests)
        self._resume_at = self.max_pending // 2
        self.unfinished = 0
        """Requests handed out (server side) and not yet completed."""
        self._rate = float(rate_limit)
        self._burst = float(rate_burst)
        self._tokens = float(rate_burst)
        self._tokens_at = self.last_received
        self._out: list[bytes] = []
        self._out_size = 0
        self._paused: set[Pause] = set()
        self._failed = False
        self.error: ProtocolError | None = None
        """The fatal error, once there was one."""
        self._failure: ProtocolFailure | None = None
        self._it: Iterator[Frame] = iter(())
        self._server = server
        self._told = False
        self._awaiting: set[int] = set()
        self._next_id = 0
        self.on_output: Callable[[], None] | None = None
        """Called when output is queued while none was: the adapter schedules a write
        (every frame queued until then leaves in that one write)."""
        self.on_reading: Callable[[bool], None] | None = None
        """Called with True when reading must pause, False when it may resume."""
        self.on_error: Callable[[str], None] | None = None
        """Called with the code of every Error queued (for the server's metrics)."""
        self.on_stray: Callable[[Frame], None] | None = None
        """Client side: called with a response nobody awaits (a test or a log may care)."""

    # -- state ------------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        """True after a fatal protocol error: input is ignored from then on."""
        return self._failed

    @property
    def paused(self) -> frozenset[Pause]:
        """Why reading is paused (empty: it is not)."""
        return frozenset(self._paused)

    def is_paused(self, reason: Pause) -> bool:
        """Whether reading is paused for ``reason``."""
        return reason in self._paused

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        return self._decoder.buffered

    @property
    def pending_output(self) -> int:
        """Bytes queued and not yet taken by :meth:`data_to_send`."""
        return self._out_size

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since the last input."""
        return (self.clock() if now is None else now) - self.last_received

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; read what they complete with :meth:`next_event`."""
        if self._failed:
            return
        self.bytes_in += len(data)
        self.last_received = self.clock()
        frames, error = self._decoder.receive(data)
        self.frames_received += len(frames)
        if self._decoder.buffered:
            if frames or self.frame_started is None:
                self.frame_started = self.last_received
        else:
            self.frame_started = None
        if length_hint(self._it):  # events not asked for yet (rare): they come first
            self._it = iter([*self._it, *frames])
        else:
            self._it = iter(frames)
        if error is not None:
            self._failed = True
            self.error = error
            self._failure = ProtocolFailure(error)

    def next_event(self) -> Event | None:
        """The next event, or None until more data is received.

        A frame's rules apply when its event is asked for, so what the core answers
        itself (a Pong, a refusal) and what the application answers leave in the
        order the frames came in, as long as the application handles each event
        before asking for the next.
        """
        if self._server:
            for f in self._it:
                ser, flags, t, _, _ = f
                self.serializer = ser
                if flags & _RESP:
                    continue  # the server makes no requests: stray answers are dropped
                if t == PING:
                    self._answer_ping(f)
                    continue
                if self._rate > 0 and not self._take_token(self.last_received):
                    self._error(
                        codes.RATE_LIMITED, "too many requests, slow down", f.request_id, ser
                    )
                    continue
                if t not in self.routes:
                    self._unroutable(f)
                    continue
                n = self.unfinished = self.unfinished + 1
                if n >= self.max_pending and Pause.REQUESTS not in self._paused:
                    self._pause(Pause.REQUESTS)
                return f  # type: ignore[return-value]  # a Request: the decoder made it so
        else:
            awaiting = self._awaiting
            for f in self._it:
                if f.flags & _RESP:
                    rid = f.request_id
                    if rid in awaiting:
                        awaiting.discard(rid)
                        return f  # type: ignore[return-value]  # a Response
                    if self.on_stray is not None:
                        self.on_stray(f)
                elif f.type == PING:
                    self._answer_ping(f)
                else:
                    return f  # type: ignore[return-value]  # a Push
        failure = self._failure
        if failure is not None:
            self._failure = None
            return failure
        return None

    def events_received(self) -> list[Event]:
        """Every event available now (for a peer that needs no ordering with the
        core's own answers, and for tests)."""
        events = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    def fail(self, error: ProtocolError) -> ProtocolFailure:
        """End the connection for a fatal error: input is ignored from now on, and the
        server side queues an Error for the peer (JSON: the header's serializer byte
        may be the bad part).

        The application calls it when it reaches a :class:`ProtocolFailure` event,
        after handling the events before it, so the answers to the frames that came
        before the bad bytes go first; and for a fatal error found outside the core
        (a WebSocket message that is not exactly one frame).
        """
        self._failed = True
        self.error = error
        self._it, self._failure = iter(()), None  # nothing more runs
        if not self._told and self.role is Role.SERVER:
            self._told = True
            self._error(error.code, error.message, 0, JSON)
        return ProtocolFailure(error)

    def _answer_ping(self, f: Frame) -> None:
        # Checked as every body is: a Ping whose body is not an empty map is an Error.
        ser = f.serializer
        if f.body != _EMPTY_BODIES[ser]:
            try:
                decode_body(Ping, ser, f.body)
            except ProtocolError as exc:
                self._error(exc.code, exc.message, f.request_id, ser)
                return
        self.send_frame(encode_frame(ser, _RESP, PONG, f.request_id, _EMPTY_BODIES[ser]))

    def _take_token(self, now: float) -> bool:
        # Refill on every request: refilling only when empty would count the time the
        # bucket sat full, letting a peer quiet for a while burst twice over.
        tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def _unroutable(self, f: Frame) -> None:
        if f.type in self.known_types:
            self._error(
                codes.NO_HANDLER, f"no handler for packet type {f.type}", f.request_id, f.serializer
            )
        else:
            self._error(
                codes.UNKNOWN_TYPE, f"unknown packet type {f.type}", f.request_id, f.serializer
            )

    # -- server side: running requests ----------------------------------------------------

    def admit(self, request: Request, rule: Rule, authenticated: bool) -> Packet | None:
        """The request's packet, or None when it is refused (its Error is queued and
        the request completed). ``rule`` is ``routes[request.type]``. The login gate
        comes first, so an anonymous peer gets no parsing done and learns no schema;
        then the body is parsed and validated.

        Called when the request is about to run, not when it arrives: a pipelined
        request after a Login runs once the login is done.
        """
        if rule.login_required and not authenticated:
            self.complete_error(request, codes.UNAUTHENTICATED, "log in first")
            return None
        try:
            return decode_body(
                rule.cls, request.serializer, request.body, request.request_id, self.limits
            )
        except ProtocolError as exc:
            self.complete_error(request, exc.code, exc.message)
            return None

    def complete(self, request: Request, packet: Packet | None) -> None:
        """A request is done: its response is queued (when it has an id and a packet).

        Raises what encoding raises (a field the serializer cannot carry); the
        request is then still open, for :meth:`complete_error`.
        """
        if packet is not None and request.request_id:
            ser = request.serializer
            body = SERIALIZERS[ser].dumps(packet.to_dict())
            self.send_frame(encode_frame(ser, _RESP, packet.TYPE, request.request_id, body))
        n = self.unfinished = self.unfinished - 1
        if n <= self._resume_at and Pause.REQUESTS in self._paused:
            self._resume(Pause.REQUESTS)

    def complete_error(self, request: Request, code: str, message: str) -> None:
        """A request failed: its Error response is queued."""
        self._error(code, message, request.request_id, request.serializer)
        self._finished()

    def _finished(self) -> None:
        n = self.unfinished = self.unfinished - 1
        if n <= self._resume_at and Pause.REQUESTS in self._paused:
            self._resume(Pause.REQUESTS)

    # -- client side: requests ------------------------------------------------------------

    def send_request(self, packet: Packet, *, pool: bool = False, expect: bool = True) -> int:
        """Queue a request; return its id. ``expect=False``: its answer is not wanted
        (a heartbeat Ping) and is dropped as stray."""
        rid = self.next_request_id()
        if expect:
            self._awaiting.add(rid)
        ser = self.serializer
        body = SERIALIZERS[ser].dumps(packet.to_dict())
        self.send_frame(encode_frame(ser, FLAG_POOL if pool else 0, packet.TYPE, rid, body))
        return rid

    def send_one_way(self, packet: Packet, *, pool: bool = False) -> None:
        """Queue a one-way packet (request id 0: no answer comes)."""
        ser = self.serializer
        body = SERIALIZERS[ser].dumps(packet.to_dict())
        self.send_frame(encode_frame(ser, FLAG_POOL if pool else 0, packet.TYPE, 0, body))

    def send_request_body(self, type_: int, body: bytes, flags: int = 0) -> int:
        """Queue a request whose body is already serialized; return its id."""
        rid = self.next_request_id()
        self._awaiting.add(rid)
        self.send_frame(encode_frame(self.serializer, flags, type_, rid, body))
        return rid

    def next_request_id(self) -> int:
        """A fresh request id: 1 to 2**32-1, wrapping, skipping ids still awaited."""
        n = self._next_id
        while True:
            n = n + 1 if n < MAX_REQUEST_ID else 1
            if n not in self._awaiting:
                self._next_id = n
                return n

    def forget(self, request_id: int) -> None:
        """Stop awaiting a request's answer (it timed out): a late one is dropped."""
        self._awaiting.discard(request_id)

    def forget_all(self) -> None:
        """The connection is gone: no answer is awaited any more."""
        self._awaiting.clear()

    @property
    def awaiting(self) -> int:
        """How many requests await their answer."""
        return len(self._awaiting)

    # -- output -----------------------------------------------------------------------------

    def send_packet(self, packet: Packet, serializer: int | None = None) -> None:
        """Queue a push (request id 0) in the peer's serializer, or the one given."""
        ser = self.serializer if serializer is None else serializer
        body = SERIALIZERS[ser].dumps(packet.to_dict())
        self.send_frame(encode_frame(ser, 0, packet.TYPE, 0, body))

    def send_error(self, code: str, message: str, request_id: int = 0) -> None:
        """Queue an Error packet that answers no request of the peer's in particular."""
        self._error(code, message, request_id, self.serializer)

    def _error(self, code: str, message: str, request_id: int, serializer: int) -> None:
        body = SERIALIZERS[serializer].dumps({"code": code, "message": message})
        self.send_frame(encode_frame(serializer, _RESP_ERR, ERROR, request_id, body))
        if self.on_error is not None:
            self.on_error(code)

    def send_frame(self, data: bytes) -> None:
        """Queue an already encoded frame (e.g. one encoded once for many peers)."""
        out = self._out
        out.append(data)
        self._out_size += len(data)
        if len(out) == 1 and self.on_output is not None:
            self.on_output()

    def data_to_send(self) -> bytes:
        """Every byte queued since the last call, in one ``bytes`` (may be empty)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        self.bytes_out += len(data)
        return data

    def frames_to_send(self) -> list[bytes]:
        """Like :meth:`data_to_send`, one ``bytes`` per frame (for a WebSocket, which
        carries one frame per message)."""
        out = self._out
        if not out:
            return []
        self._out = []
        self.bytes_out += self._out_size
        self._out_size = 0
        return out

    def discard_output(self) -> None:
        """Drop what is queued (the connection is gone)."""
        self._out.clear()
        self._out_size = 0

    # -- flow control -------------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The adapter's write buffer went above its high mark."""
        self._pause(Pause.WRITING)

    def resume_writing(self) -> None:
        """The adapter's write buffer went below its low mark."""
        self._resume(Pause.WRITING)

    def _pause(self, reason: Pause) -> None:
        was = bool(self._paused)
        self._paused.add(reason)
        if not was and self.on_reading is not None:
            self.on_reading(True)

    def _resume(self, reason: Pause) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self.on_reading is not None:
            self.on_reading(False)
