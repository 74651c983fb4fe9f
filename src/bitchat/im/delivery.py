"""Pushing chat messages to sessions: encode once per serializer, hold during sync."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
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
DEVICE = "bitchat.device"
"""Session data key: the :class:`DeviceState` of a logged-in session."""


class GapWait:
    """A gap an ack showed in one conversation, waiting to be decided."""

    __slots__ = ("due", "first", "sends", "session", "timer")

    def __init__(self, first: int, sends: int, session: Session) -> None:
        self.first = first
        """Its first seq missing: still missing when decided, it was lost."""
        self.sends = sends
        """The device's sends started at the ack: all answered before it is decided."""
        self.session = session
        self.due = False
        """The wait is over; decided once those sends are answered."""
        self.timer: asyncio.TimerHandle | None = None


class DeviceState:
    """What the server knows of a logged-in device's connection: which pushed messages
    it may still ack (msg id -> conversation and seq, the newest ``window``), and how
    far it has each conversation with no gap (``seqs``; its own messages count), from
    where each sync found the device (:meth:`seed`). An ack moves the device's cursor
    no further than that, so a push lost in transit between nodes is never skipped: a
    gap still open at an ack calls ``on_gap`` (the service pushes what the device
    misses)."""

    __slots__ = (
        "ahead",
        "device_id",
        "gap_checks",
        "gap_wait",
        "name",
        "on_gap",
        "receipted",
        "seeded",
        "sends_done",
        "sends_started",
        "seqs",
        "unacked",
        "window",
    )

    def __init__(
        self,
        device_id: int,
        name: str,
        window: int,
        on_gap: Callable[[Session], None],
        gap_wait: float = 0.0,
    ) -> None:
        self.device_id = device_id
        self.name = name
        self.window = window
        self.on_gap = on_gap
        self.unacked: dict[int, tuple[str, int]] = {}
        self.seqs: dict[str, int] = {}
        self.ahead: dict[str, set[int]] = {}
        """Seqs seen past a gap (the commit of its own message may come after a push)."""
        self.receipted: dict[str, int] = {}
        """The last "delivered" receipt this connection sent per conversation."""
        self.seeded = False
        """Whether ``seqs`` holds where the device was in each of its conversations."""
        self.sends_started = 0
        self.sends_done = 0
        """The device's own sends queued for storing, and those answered by the store: a
        partner's message can be pushed before the commit of one sent before it (in
        a cluster, by another node), so a gap at an ack is final only once the sends
        in flight then are answered (:meth:`gap_at_ack`)."""
        self.gap_wait = gap_wait
        self.gap_checks: dict[str, GapWait] | None = None
        """The gaps acks showed, by conversation, each decided on its own once
        ``gap_wait`` has passed (:meth:`gap_due`) and the sends in flight at its ack
        are answered (:meth:`sent`)."""

    def seed(self, cursors: dict[str, int]) -> None:
        """Where the device is in each conversation, as a sync is about to push from
        there: the first push there must follow on, or it is past a gap. (One of its
        own messages noted before keeps its place: the sync pushes what is below.)"""
        seqs = self.seqs
        for conv, seq in cursors.items():
            seqs.setdefault(conv, seq)
        self.seeded = True

    def note(self, conv: str, seq: int) -> None:
        """The connection has message ``seq`` of ``conv`` (pushed, or its own)."""
        seqs = self.seqs
        last = seqs.get(conv)
        if last is None and self.seeded and conv.startswith("p:"):
            last = 0  # a pair that came after the seed: the device has none of it
        if last is None or seq == last + 1:
            seqs[conv] = seq
            if self.ahead:
                self._close_gap(conv, seq)
        elif seq > last + 1:
            self.ahead.setdefault(conv, set()).add(seq)

    def gap_at_ack(self, session: Session, convs: list[str]) -> None:
        """An ack found a gap in each of ``convs``. Each is decided ``gap_wait``
        seconds after its own ack (:meth:`gap_due`), and not before the sends in
        flight then are answered: the missing message may be on its way from
        another node, or be one of the device's own."""
        checks = self.gap_checks
        if checks is None:
            checks = self.gap_checks = {}
        later = asyncio.get_running_loop().call_later
        seqs = self.seqs
        for conv in convs:
            if conv not in checks:
                wait = GapWait(seqs.get(conv, 0) + 1, self.sends_started, session)
                wait.timer = later(self.gap_wait, self.gap_due, conv, wait)
                checks[conv] = wait

    def gap_due(self, conv: str, wait: GapWait) -> None:
        """The wait after a gap in ``conv`` is over: decide it, once the sends that
        were in flight at its ack are answered."""
        checks = self.gap_checks
        if checks is None or checks.get(conv) is not wait:
            return  # a re-sync came first
        if self.sends_done < wait.sends:
            wait.due = True  # their answers may fill it: decided at the last one
            return
        self._gap_decided(conv, wait)

    def sent(self, conv: str, seq: int) -> None:
        """One of the device's own sends was answered by the store (``seq`` 0: it failed)."""
        self.sends_done += 1
        if seq:
            self.note(conv, seq)
        checks = self.gap_checks
        if checks:
            done = self.sends_done
            for c, wait in list(checks.items()):
                if wait.due and done >= wait.sends:
                    self._gap_decided(c, wait)

    def _gap_decided(self, conv: str, wait: GapWait) -> None:
        checks = self.gap_checks
        if checks is None or checks.get(conv) is not wait:
            return  # decided already (a re-sync it started reset the device)
        del checks[conv]
        if conv not in self.ahead:
            return  # it arrived
        if self.seqs.get(conv, 0) < wait.first:
            self.on_gap(wait.session)  # still missing after the wait: lost in transit
        else:
            self.gap_at_ack(wait.session, [conv])  # it closed, a later one opened: wait

    def _close_gap(self, conv: str, seq: int) -> None:
        ahead = self.ahead.get(conv)
        if ahead:
            while seq + 1 in ahead:
                seq += 1
                ahead.discard(seq)
            self.seqs[conv] = seq
            if not ahead:
                del self.ahead[conv]

    def pushed(self, message: Message) -> None:
        # note(), written out: this runs for every message pushed to every device.
        conv = message.conv or message.conversation_key
        seq = message.seq
        seqs = self.seqs
        last = seqs.get(conv)
        if last is None and self.seeded and conv.startswith("p:"):
            last = 0
        if last is None or seq == last + 1:
            seqs[conv] = seq
            if self.ahead:
                self._close_gap(conv, seq)
        elif seq > last + 1:
            self.ahead.setdefault(conv, set()).add(seq)
        unacked = self.unacked
        unacked[message.id] = (conv, seq)
        if len(unacked) > self.window:
            del unacked[next(iter(unacked))]  # the oldest: it comes again next login

    def forget(self, conv: str) -> None:
        """The user left ``conv`` (a group): should they join again, the device starts
        at that join, and the seqs it skipped meanwhile are no gap."""
        self.seqs.pop(conv, None)
        ahead = self.ahead
        if ahead:
            ahead.pop(conv, None)

    def reset(self) -> None:
        """Before pushing again what the device misses: it is all found again."""
        self.seqs.clear()
        self.ahead.clear()
        self.seeded = False
        checks, self.gap_checks = self.gap_checks, None
        if checks:
            for wait in checks.values():
                if wait.timer is not None:
                    wait.timer.cancel()


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
        data = session.data
        held = data.get(SYNCING)
        if held is not None:
            # Offline messages are still going out: keep this one for after them.
            held.append(message)
            n += 1
            continue
        device = data.get(DEVICE)
        if device is not None:
            device.pushed(message)
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
