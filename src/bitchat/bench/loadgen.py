"""The load generator: lean clients on the protocol core, in worker processes.

Each worker process runs one event loop (uvloop where installed) holding many
connections. A connection is a bare ``asyncio.Protocol`` over the client side
of the connection core (:mod:`bitchat.protocol.connection`, the frame loop
``bitchat.Client`` and the server use too): no packet objects on the hot
path, bodies serialized by hand, one ``write`` per read (answers, next sends
and acks coalesced), so the machine's CPU goes to the server under test rather
than to its clients.

A chat payload is ``"<seq> <send time ns> <run id> <padding>"``: ``seq``
counts the sender's messages from 1, the time is ``CLOCK_MONOTONIC`` (one
clock for every process on the machine), and the run id tells this run's
messages from any older ones a running server still holds. Each receiver
checks, per sender, that the sequence numbers arrive once each and in order.

The worker talks to the bench process over a pipe, phase by phase:
``ready`` (users logged in) -> ``go`` -> ``sent`` (what each sender had acked)
-> ``expect`` -> ``result`` -> ``close``; ``progress`` notes come in between.
The ``sync`` scenario has phases of its own (:mod:`bitchat.bench.syncload`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import resource
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any, cast

from bitchat.bench.serverproc import UserSpec
from bitchat.errors import BitchatError
from bitchat.im.packets import Ack, ChatMessage, JoinGroup, Login, SendGroup, SendP2P
from bitchat.protocol.connection import Connection as Core
from bitchat.protocol.connection import ProtocolFailure, Response, Role
from bitchat.protocol.frame import FLAG_ERROR, encode_frame
from bitchat.protocol.packets import Ping
from bitchat.protocol.serializers import SERIALIZERS

_now = time.monotonic_ns
_CHAT = ChatMessage.TYPE
_ACK = Ack.TYPE
_LOGIN = Login.TYPE
_JOIN = JoinGroup.TYPE
_PING = Ping()
_PROGRESS_EVERY = 0.25
MAX_ACK_IDS = 1024
"""Most ids in one Ack: the server's default ``max_ack_ids``."""


class BenchRequestError(BitchatError):
    """A set-up request (login, join) was answered with an Error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class WorkerPlan:
    """Everything one worker process needs to know before it starts."""

    index: int
    scenario: str
    host: str
    port: int
    users: list[UserSpec]
    serializer: int = 1
    window: int = 32
    payload: int = 100
    run_id: str = "r"
    login: str = "token"
    """"token" or "password": how users log in (token only when they have one)."""
    concurrency: int = 64
    """Connections being opened at once."""
    heartbeat: float = 5.0
    bin_ns: int = 100_000_000
    warm: int = 0
    """connect/idle: how many of ``users`` (the first ones) connect during set-up."""
    group_id: int = 0
    timeout: float = 30.0
    """Longest wait for one connection or set-up request."""
    senders: list[UserSpec] = field(default_factory=list)
    """sync: the users that send the messages the devices of ``users`` miss."""
    devices: int = 1
    """sync: devices per user of ``users``."""
    groups: bool = False
    """sync: each sender creates a group (some messages go there)."""


@dataclass(eq=False)
class DeviceState:
    """sync: one device of a user, what it should be pushed and what it was."""

    user: UserSpec
    name: str
    """Its device id (``Login.device``)."""
    token: str = ""
    """This device's token, from its first login."""
    missing: set[int] = field(default_factory=set)
    """Expected msg_ids not pushed yet."""
    received: array.array[int] = field(default_factory=lambda: array.array("Q"))
    """Every msg_id pushed in this catch-up, in arrival order (duplicates included)."""
    pending: int = -1
    """``LoginOk.pending`` of this catch-up's login (-1: not logged in)."""
    named: str = ""
    """``LoginOk.device``: the device the server says this session is."""
    done_ns: int = 0
    """When the last missing message arrived (0: not yet)."""


class Conn(asyncio.Protocol):
    """One bench user's connection: a sender, a receiver, or both."""

    def __init__(self, worker: Worker, user: UserSpec, device: DeviceState | None = None) -> None:
        self.w = worker
        self.user = user
        self.device = device
        self.transport: asyncio.Transport | None = None
        self.core = Core(Role.CLIENT, max_frame_size=1 << 20)
        self.core.serializer = worker.ser
        self.lost = False
        self.closing = False
        """Closed by the bench on purpose: not a dropped connection."""
        self.gone: asyncio.Future[None] | None = None
        """Done once the connection is closed (made with the connection)."""
        self.final_ack: asyncio.Future[Any] | None = None
        """sync: the answer to the device's last Ack (sent as a request)."""
        self.waiters: dict[int, asyncio.Future[Any]] = {}
        self.last_write = 0
        # sending
        self.send_type = 0
        self.target_key = "to"
        self.target = 0
        self.sending = False
        self.seq = 0
        self.limit = 1 << 62
        """Messages to send in all (sync: the length of ``targets``)."""
        self.targets: list[tuple[int, int]] | None = None
        """sync: (packet type, target) of each message, in sending order."""
        self.msg_ids: dict[int, int] = {}
        """sync: sequence number -> msg_id of each stored message."""
        self.inflight: dict[int, int] = {}
        """Request id -> sequence number of each unanswered send."""
        self.failed: list[int] = []
        self.errors: dict[str, int] = {}
        # receiving: sender id -> [last seq, gaps, duplicates, reordered, distinct]
        self.rx: dict[int, list[Any]] = {}
        self.seen: set[int] = set()
        """msg_ids received: one pushed again is no duplicate (clients drop it by id)."""

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.gone = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.sending = False
        if not self.closing:
            self.w.disconnects += 1
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the server closed the connection"))
        self.waiters.clear()

    def data_received(self, data: bytes) -> None:
        now = _now()
        w = self.w
        core = self.core
        core.receive_data(data)
        acks: list[int] = []
        while (ev := core.next_event()) is not None:
            if type(ev) is Response:
                rid = ev.request_id
                seq = self.inflight.pop(rid, None)
                if seq is not None:
                    if ev.flags & FLAG_ERROR:
                        self.failed.append(seq)
                        code = str(w.loads(ev.body).get("code", "?"))
                        self.errors[code] = self.errors.get(code, 0) + 1
                    elif self.targets is not None:
                        self.msg_ids[seq] = int(w.loads(ev.body)["msg_id"])
                    if self.sending:
                        if now < w.deadline and self.seq < self.limit:
                            self.send_next()
                        else:
                            self.sending = False
                    continue
                fut = self.waiters.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev)
            elif isinstance(ev, ProtocolFailure):
                w.protocol_errors += 1
                w.note(f"protocol error from the server: {ev.error}")
                assert self.transport is not None
                self.transport.abort()
                return
            elif ev.type == _CHAT:
                d = w.loads(ev.body)
                acks.append(d["msg_id"])
                if self.device is not None:
                    self.pushed(self.device, d["msg_id"], now)
                    continue
                parts = d["text"].split(" ", 3)
                if len(parts) < 3 or parts[2] != w.run_id:
                    w.foreign += 1
                    continue
                # Pushed again (a cluster node's re-sync): a client drops it by msg_id.
                msg_id = d["msg_id"]
                if msg_id in self.seen:
                    w.redelivered += 1
                    continue
                self.seen.add(msg_id)
                self.received(d["sender_id"], int(parts[0]), int(parts[1]), now)
        for i in range(0, len(acks), MAX_ACK_IDS):
            chunk = acks[i : i + MAX_ACK_IDS] if len(acks) > MAX_ACK_IDS else acks
            body = w.dumps({"msg_ids": chunk})
            dev = self.device
            last = i + MAX_ACK_IDS >= len(acks)
            if dev is not None and dev.done_ns and self.final_ack is None and last:
                # The device's last ack asks for an answer: once it comes, the server
                # has stored this connection's acks (before it, as they are in order).
                rid = core.send_request_body(_ACK, body)
                self.final_ack = self.waiters[rid] = asyncio.get_running_loop().create_future()
            else:
                core.send_frame(encode_frame(w.ser, 0, _ACK, 0, body))
        if core.pending_output and not self.lost:
            assert self.transport is not None
            self.transport.write(core.data_to_send())
            self.last_write = now

    # -- receiving ----------------------------------------------------------------------------

    def received(self, sender: int, seq: int, sent_ns: int, now: int) -> None:
        st = self.rx.get(sender)
        if st is None:
            st = self.rx[sender] = [0, set(), 0, 0, 0]
        last = st[0]
        if seq == last + 1:
            st[0] = seq
        elif seq > last:
            st[1].update(range(last + 1, seq))  # skipped: late (reordered) or lost
            st[0] = seq
        elif seq in st[1]:
            st[1].discard(seq)
            st[3] += 1
        else:
            st[2] += 1
            return
        st[4] += 1
        w = self.w
        w.latencies.append((now - sent_ns) // 1000)
        b = (now - w.t0) // w.bin_ns
        bins = w.bins
        if 0 <= b < len(bins):
            bins[b] += 1
        w.delivered += 1
        if now <= w.deadline:
            w.in_window += 1

    def pushed(self, dev: DeviceState, msg_id: int, now: int) -> None:
        """sync: a device was pushed a message (checked afterwards by the bench process)."""
        dev.received.append(msg_id)
        if msg_id in dev.missing:
            dev.missing.discard(msg_id)
            w = self.w
            w.delivered += 1
            b = (now - w.t0) // w.bin_ns
            if 0 <= b < len(w.bins):
                w.bins[b] += 1
            if not dev.missing:
                w.device_done(dev, now)

    # -- sending ------------------------------------------------------------------------------

    def send_next(self) -> None:
        """Queue the next chat message on the core (written with the rest of this pass)."""
        w = self.w
        seq = self.seq = self.seq + 1
        if self.targets is not None:
            self.send_type, self.target = self.targets[seq - 1]
            self.target_key = "group_id" if self.send_type == SendGroup.TYPE else "to"
        head = f"{seq} {_now()} {w.run_id} "
        text = head + w.pad[: max(1, w.payload - len(head))]
        body = w.dumps(
            {self.target_key: self.target, "text": text, "client_msg_id": f"{w.run_id}.{seq}"}
        )
        self.inflight[self.core.send_request_body(self.send_type, body)] = seq

    def start_sending(self, send_type: int, target: int, window: int) -> None:
        self.send_type = send_type
        self.target_key = "group_id" if send_type == SendGroup.TYPE else "to"
        self.target = target
        self.sending = True
        for _ in range(window):
            self.send_next()
        self.flush()

    def start_targets(self, targets: list[tuple[int, int]], window: int) -> None:
        """sync: send one message to each of ``targets`` in turn, ``window`` unanswered."""
        self.targets = targets
        self.limit = len(targets)
        if not targets:
            return
        self.sending = True
        for _ in range(min(window, len(targets))):
            self.send_next()
        self.flush()

    # -- set-up requests ----------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the core has queued."""
        if self.lost or self.transport is None:
            self.core.discard_output()
            raise ConnectionError("not connected")
        self.transport.write(self.core.data_to_send())
        self.last_write = _now()

    def ping(self) -> None:
        self.core.send_request(_PING, expect=False)
        self.flush()

    async def request(self, type_: int, body: dict[str, Any]) -> dict[str, Any]:
        w = self.w
        rid = self.core.send_request_body(type_, w.dumps(body))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters[rid] = fut
        self.flush()
        try:
            frame = await asyncio.wait_for(fut, w.plan.timeout)
        finally:
            self.waiters.pop(rid, None)
            self.core.forget(rid)
        data = w.loads(frame.body)
        if frame.flags & FLAG_ERROR:
            raise BenchRequestError(str(data.get("code")), str(data.get("message")))
        return cast(dict[str, Any], data)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    async def close_and_wait(self, timeout: float) -> None:
        """Close on purpose, and return once the server has closed its side too.

        Half-closing first makes the server read the end of the stream and close:
        when that close arrives, the server has seen this connection go.
        """
        self.closing = True
        transport = self.transport
        if transport is None or self.gone is None or self.lost:
            return
        try:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
            await asyncio.wait_for(asyncio.shield(self.gone), timeout)
        except (TimeoutError, OSError):
            transport.abort()


class Channel:
    """The pipe to the bench process, read from the event loop."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(pipe.fileno(), self._readable)
        # uvloop makes a watched fd non-blocking; a large result must not be cut short.
        os.set_blocking(pipe.fileno(), True)

    def _readable(self) -> None:
        try:
            while self.pipe.poll():
                self.queue.put_nowait(self.pipe.recv())
        except (EOFError, OSError):
            self.loop.remove_reader(self.pipe.fileno())
            self.queue.put_nowait(("close",))

    def send(self, *msg: Any) -> None:
        os.set_blocking(self.pipe.fileno(), True)
        self.pipe.send(msg)

    async def recv(self, *kinds: str) -> tuple[Any, ...]:
        # The bench process bounds every phase; this only guards against its death.
        msg = await asyncio.wait_for(self.queue.get(), 3600)
        if msg[0] == "close" and "close" not in kinds:
            raise SystemExit(0)
        if msg[0] not in kinds:
            raise RuntimeError(f"worker expected {kinds}, got {msg[0]!r}")
        return msg


class Worker:
    """One load-generator process: its connections and its counters."""

    def __init__(self, plan: WorkerPlan, chan: Channel) -> None:
        self.plan = plan
        self.chan = chan
        ser = SERIALIZERS[plan.serializer]
        self.ser = plan.serializer
        self.dumps = ser.dumps
        self.loads = ser.loads
        self.run_id = plan.run_id
        self.payload = plan.payload
        self.pad = "x" * max(plan.payload, 1)
        self.bin_ns = plan.bin_ns
        self.t0 = 0
        self.deadline = 1 << 62
        self.bins: list[int] = []
        self.latencies = array.array("Q")
        self.delivered = 0
        self.in_window = 0
        self.foreign = 0
        self.redelivered = 0
        """Pushes of a msg_id the connection already had (a re-sync pushed it again)."""
        self.disconnects = 0
        self.protocol_errors = 0
        self.notes: list[str] = []
        self.conns: list[Conn] = []
        self.login_errors: dict[str, int] = {}
        self.devices_done = 0
        """sync: devices that have every message they should."""
        self.all_done = asyncio.Event()
        self.devices_total = 0

    def device_done(self, dev: DeviceState, now: int) -> None:
        dev.done_ns = now
        self.devices_done += 1
        if self.devices_done >= self.devices_total:
            self.all_done.set()

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text)

    # -- connections --------------------------------------------------------------------------

    async def open_user(
        self, user: UserSpec, login: str, device: DeviceState | None = None
    ) -> Conn:
        """Connect and log in ``user`` (sync: as ``device``, with that device's token)."""
        loop = asyncio.get_running_loop()
        plan = self.plan
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: Conn(self, user, device), plan.host, user.port or plan.port
            ),
            plan.timeout,
        )
        token = user.token if device is None else device.token
        body: dict[str, Any]
        if login == "token" and token:
            body = {"token": token}
        else:
            body = {"name": user.name, "password": user.password}
        if device is not None:
            body["device"] = device.name
        try:
            # The first byte of the stream must be the magic byte: the login frame is it.
            ok = await conn.request(_LOGIN, body)
        except BaseException:
            conn.close()
            raise
        user.user_id = int(ok["user_id"])
        if device is None:
            user.token = str(ok.get("token") or user.token)
        else:
            device.token = str(ok.get("token") or device.token)
            device.pending = int(ok.get("pending", 0))
            device.named = str(ok.get("device", ""))
        return conn

    async def open_many(
        self,
        users: Iterable[UserSpec],
        login: str,
        *,
        report: bool = True,
        latencies: array.array[int] | None = None,
        keep: bool = True,
    ) -> list[Conn]:
        """Connect and log in ``users``, ``concurrency`` at a time."""
        sem = asyncio.Semaphore(self.plan.concurrency)
        opened: list[Conn] = []
        last_report = time.monotonic()

        async def one(user: UserSpec) -> None:
            nonlocal last_report
            async with sem:
                started = _now()
                try:
                    conn = await self.open_user(user, login)
                except (OSError, TimeoutError, BenchRequestError, ConnectionError) as exc:
                    code = exc.code if isinstance(exc, BenchRequestError) else type(exc).__name__
                    self.login_errors[code] = self.login_errors.get(code, 0) + 1
                    self.note(f"login of {user.name} failed: {exc}")
                    return
                if latencies is not None:
                    latencies.append((_now() - started) // 1000)
                if keep:
                    opened.append(conn)
                    self.conns.append(conn)  # heartbeats from now: the rest may take long
                else:
                    conn.close()
                if report and time.monotonic() - last_report >= _PROGRESS_EVERY:
                    last_report = time.monotonic()
                    self.chan.send("progress", len(opened))

        await asyncio.gather(*(one(u) for u in users))
        return opened

    async def heartbeat(self) -> None:
        """Ping connections that wrote nothing lately, as a real client does."""
        interval = int(self.plan.heartbeat * 1e9)
        while True:
            await asyncio.sleep(self.plan.heartbeat / 2)
            now = _now()
            for conn in self.conns:
                if not conn.lost and not conn.closing and now - conn.last_write >= interval:
                    with contextlib.suppress(ConnectionError):
                        conn.ping()

    def cpu_s(self) -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    # -- scenarios ----------------------------------------------------------------------------

    async def run(self) -> None:
        hb = asyncio.get_running_loop().create_task(self.heartbeat())
        try:
            if self.plan.scenario in ("p2p", "group"):
                await self.run_messages()
            elif self.plan.scenario == "sync":
                from bitchat.bench.syncload import run_sync

                await run_sync(self)
            else:
                await self.run_connect()
        finally:
            hb.cancel()
            for conn in self.conns:
                conn.close()
            await asyncio.sleep(0)

    async def run_messages(self) -> None:
        plan = self.plan
        conns = await self.open_many(plan.users, plan.login)
        if len(conns) != len(plan.users):
            raise RuntimeError(
                f"only {len(conns)} of {len(plan.users)} users could log in: "
                + "; ".join(self.notes[:3])
            )
        if plan.scenario == "group":
            for conn in conns:
                await conn.request(_JOIN, {"group_id": plan.group_id})
        self.chan.send("ready", {c.user.index: c.user.user_id for c in conns})
        _, spec = await self.chan.recv("go")
        self.t0, self.deadline = spec["t0"], spec["deadline"]
        self.bins = [0] * ((self.deadline - self.t0) // self.bin_ns + 1 + 600)
        by_index = {c.user.index: c for c in conns}
        senders = [(by_index[i], target) for i, target in spec["senders"].items() if i in by_index]
        send_type = SendGroup.TYPE if plan.scenario == "group" else SendP2P.TYPE
        await asyncio.sleep(max(0, self.t0 - _now()) / 1e9)
        cpu0 = self.cpu_s()
        for conn, target in senders:
            conn.start_sending(send_type, target, plan.window)
        # During sending, progress is what arrived within the window: its last count, sent
        # once the deadline has passed, is exactly ``in_window``, the table's measured count.
        while _now() < self.deadline:
            await asyncio.sleep(min(_PROGRESS_EVERY, max(0.0, (self.deadline - _now()) / 1e9)))
            self.chan.send("progress", self.in_window)
        self.chan.send("progress", self.in_window)
        # Sending stops at the deadline; wait for the answers to what is in flight.
        drain_end = _now() + int(spec["drain"] * 1e9)
        while any(c.inflight and not c.lost for c, _ in senders) and _now() < drain_end:
            await asyncio.sleep(0.01)
        self.chan.send(
            "sent",
            {
                c.user.user_id: {
                    "sent": c.seq,
                    "unacked": sorted(c.inflight.values()),
                    "failed": c.failed,
                    "errors": c.errors,
                }
                for c, _ in senders
            },
        )
        _, expect = await self.chan.recv("expect")
        acked: dict[int, tuple[int, set[int]]] = {
            s: (v["sent"], set(v["unacked"]) | set(v["failed"])) for s, v in expect["acked"].items()
        }
        wanted = [(c, s) for c in conns for s in expect["from"][c.user.user_id]]

        def missing() -> int:
            return sum(
                max(0, acked[s][0] - len(acked[s][1]) - (c.rx[s][4] if s in c.rx else 0))
                for c, s in wanted
            )

        drain_end = _now() + int(spec["drain"] * 1e9)
        while missing() and _now() < drain_end:
            await asyncio.sleep(0.01)
            self.chan.send("progress", self.delivered)
        lost = dup = reordered = 0
        examples: list[str] = []
        for c, s in wanted:
            sent, excluded = acked[s]
            last, gaps, d, r, _ = c.rx.get(s, (0, set(), 0, 0, 0))
            dup += d
            reordered += r
            n = max(0, sent - last) - sum(1 for e in excluded if e > last)
            n += len(gaps - excluded)
            if n:
                lost += n
                if len(examples) < 5:
                    first = min(
                        [q for q in gaps if q not in excluded]
                        + [q for q in range(last + 1, sent + 1) if q not in excluded]
                    )
                    examples.append(
                        f"user {c.user.user_id} is missing {n} message(s) from "
                        f"user {s}, the first with seq {first}"
                    )
        self.chan.send(
            "result",
            {
                "delivered": self.delivered,
                "in_window": self.in_window,
                "latencies_us": self.latencies.tobytes(),
                "bins": self.bins,
                "lost": lost,
                "lost_examples": examples,
                "duplicated": dup,
                "reordered": reordered,
                "disconnects": self.disconnects,
                "protocol_errors": self.protocol_errors,
                "foreign": self.foreign,
                "redelivered": self.redelivered,
                "cpu_s": self.cpu_s() - cpu0,
                "notes": self.notes,
            },
        )
        await self.chan.recv("close")

    async def run_connect(self) -> None:
        plan = self.plan
        warm, rest = plan.users[: plan.warm], plan.users[plan.warm :]
        if plan.login == "token" and any(not u.token for u in rest):
            # A running server: get every user a token first, by password (not measured).
            await self.open_many([u for u in rest if not u.token], "password", keep=False)
        await self.open_many(warm, plan.login, report=False)
        self.chan.send("ready", {u.index: u.user_id for u in warm})
        _, spec = await self.chan.recv("go")
        self.t0 = spec["t0"]
        await asyncio.sleep(max(0, self.t0 - _now()) / 1e9)
        cpu0 = self.cpu_s()
        lat = array.array("Q")
        opened = await self.open_many(rest, plan.login, latencies=lat)
        t_last = _now()
        self.chan.send(
            "opened",
            {
                "opened": len(opened),
                "failed": len(rest) - len(opened),
                "errors": self.login_errors,
                "latencies_us": lat.tobytes(),
                "t_last": t_last,
                "cpu_s": self.cpu_s() - cpu0,
                "notes": self.notes,
            },
        )
        await self.chan.recv("close")
        # Counted before our own close: these are connections the server dropped.
        self.chan.send("closed", {"disconnects": self.disconnects})


def worker_main(plan: WorkerPlan, pipe: Pipe) -> None:
    """Entry point of a load-generator process."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        runner = asyncio.run

    async def main() -> None:
        chan = Channel(pipe)
        try:
            await Worker(plan, chan).run()
        except SystemExit:
            pass
        except BaseException:
            chan.send("error", traceback.format_exc())

    try:
        runner(main())
    finally:
        with contextlib.suppress(OSError):
            pipe.close()
        os._exit(0)  # skip interpreter teardown of thousands of sockets
