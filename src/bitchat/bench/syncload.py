"""The ``sync`` scenario in a load-generator process: devices miss messages, then catch up.

Each user of the plan has ``devices`` devices, each a connection of its own
that logs in with its own device id (``Login.device``). The phases, with the
bench process over the worker's pipe:

1. The senders log in (each creates its group when some messages go to
   groups) -> ``ready`` ``{"ids": {index: user id}, "groups": {index: group id}}``.
2. ``register`` ``{"groups": {user index: group id}}``: every device logs in
   once by password with its device id, so the server knows it (the first
   device joins the user's group), keeps the token it is given, and closes
   -> ``registered`` ``{"ids": {index: user id}}``. From here every device
   is offline.
3. ``send`` ``{"targets": {sender index: [[type, target], ...]}, "deadline"}``:
   the senders send one message to each target in turn, ``window`` unanswered,
   then close -> ``sent`` ``{sender index: {"msg_ids": [...], ...}}``
   (0 for a message that was not stored).
4. ``catch_up`` ``{"expected": {user id: [msg id, ...]}, "t0", "deadline"}``:
   at ``t0`` every device logs in again, all at once, as the same device; it
   is pushed what it missed (``LoginOk.pending``, then ChatMessage pushes) and
   acks as it goes. Once every device has all it should (or at the deadline),
   each makes one ping round trip, so the server has read every ack
   -> ``caught_up`` (what each device was pushed, for the bench process to check).
5. ``again``: every device closes and logs in once more, as the same device:
   what it acked must not come again -> ``again`` ``{"pending", "pushed"}``
   (the LoginOk.pending counts, and the pushes seen before a ping round trip).
6. ``close``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

from bitchat.bench.loadgen import (
    _JOIN,
    _PROGRESS_EVERY,
    BenchRequestError,
    Conn,
    DeviceState,
    Worker,
    _now,
)
from bitchat.im.packets import CreateGroup
from bitchat.protocol.frame import FLAG_ERROR
from bitchat.protocol.packets import Ping


def device_name(run_id: str, index: int) -> str:
    """The device id of a user's ``index``-th device (unique per run on a shared server)."""
    return f"bench-{run_id}-{index}"


async def open_devices(
    w: Worker,
    devices: Iterable[DeviceState],
    login: str,
    latencies: array.array[int] | None = None,
    *,
    catching_up: bool = False,
) -> list[Conn]:
    """Connect and log in ``devices``, ``concurrency`` at a time; failures are counted.

    ``catching_up``: progress is the deliveries so far, and a device with nothing
    to catch up on is done once logged in."""
    sem = asyncio.Semaphore(w.plan.concurrency)
    opened: list[Conn] = []
    last_report = time.monotonic()

    async def one(dev: DeviceState) -> None:
        nonlocal last_report
        async with sem:
            started = _now()
            try:
                conn = await w.open_user(dev.user, login, dev)
            except (OSError, TimeoutError, BenchRequestError, ConnectionError) as exc:
                code = exc.code if isinstance(exc, BenchRequestError) else type(exc).__name__
                w.login_errors[code] = w.login_errors.get(code, 0) + 1
                w.note(f"login of {dev.user.name} as device {dev.name} failed: {exc}")
                return
            now = _now()
            if latencies is not None:
                latencies.append((now - started) // 1000)
            opened.append(conn)
            w.conns.append(conn)  # heartbeats from now: the rest may take long
            if catching_up and not dev.missing and not dev.done_ns:
                w.device_done(dev, now)
            if time.monotonic() - last_report >= _PROGRESS_EVERY:
                last_report = time.monotonic()
                w.chan.send("progress", w.delivered if catching_up else len(opened))

    await asyncio.gather(*(one(d) for d in devices))
    return opened


async def close_all(w: Worker, conns: Iterable[Conn]) -> None:
    await asyncio.gather(*(c.close_and_wait(w.plan.timeout) for c in conns))


async def settle(w: Worker, c: Conn) -> None:
    """Wait for the answer to the device's last Ack: then its acks are stored. A device
    that had nothing to ack (or never got everything) makes a ping round trip instead."""
    if c.final_ack is None:
        await c.request(Ping.TYPE, {})
        return
    answer = await asyncio.wait_for(asyncio.shield(c.final_ack), w.plan.timeout)
    if answer.flags & FLAG_ERROR:
        raise BenchRequestError("ack", str(w.loads(answer.body)))


async def run_sync(w: Worker) -> None:
    plan = w.plan
    # 1. The senders, online throughout the sending.
    senders = await w.open_many(plan.senders, plan.login, report=False)
    if len(senders) != len(plan.senders):
        raise RuntimeError(
            f"only {len(senders)} of {len(plan.senders)} senders could log in: "
            + "; ".join(w.notes[:3])
        )
    groups: dict[int, int] = {}
    if plan.groups:
        for c in senders:
            info = await c.request(
                CreateGroup.TYPE, {"name": f"bench-{plan.run_id}-{c.user.index}"}
            )
            groups[c.user.index] = int(info["group_id"])
    w.chan.send("ready", {"ids": {c.user.index: c.user.user_id for c in senders}, "groups": groups})

    # 2. Every device logs in once, so the server knows it, then goes offline.
    _, spec = await w.chan.recv("register")
    devices = [
        DeviceState(u, device_name(plan.run_id, d)) for u in plan.users for d in range(plan.devices)
    ]
    # First devices first: on a running server, a user's first login registers it.
    first = device_name(plan.run_id, 0)
    conns = await open_devices(w, [d for d in devices if d.name == first], "password")
    conns += await open_devices(w, [d for d in devices if d.name != first], "password")
    if len(conns) != len(devices):
        raise RuntimeError(
            f"only {len(conns)} of {len(devices)} devices could log in: " + "; ".join(w.notes[:3])
        )
    for c in conns:
        assert c.device is not None
        gid = spec["groups"].get(c.user.index)
        if gid and c.device.name == device_name(plan.run_id, 0):
            await c.request(_JOIN, {"group_id": gid})
    await close_all(w, conns)
    w.chan.send("registered", {"ids": {u.index: u.user_id for u in plan.users}})

    # 3. The senders send what the devices will miss.
    _, spec = await w.chan.recv("send")
    w.deadline = spec["deadline"]
    by_index = {c.user.index: c for c in senders}
    sending = [
        (by_index[i], [(int(t[0]), int(t[1])) for t in ts]) for i, ts in spec["targets"].items()
    ]
    for c, targets in sending:
        c.start_targets(targets, plan.window)

    def answered() -> int:
        return sum(len(c.msg_ids) + len(c.failed) for c, _ in sending)

    while _now() < w.deadline and any((c.sending or c.inflight) and not c.lost for c, _ in sending):
        await asyncio.sleep(0.01)
        w.chan.send("progress", answered())
    w.chan.send("progress", answered())
    report = {
        c.user.index: {
            "user_id": c.user.user_id,
            "msg_ids": [c.msg_ids.get(i + 1, 0) for i in range(len(targets))],
            "failed": len(c.failed),
            "errors": c.errors,
            "unanswered": len(c.inflight),
            "unsent": len(targets) - c.seq,
        }
        for c, targets in sending
    }
    await close_all(w, senders)
    w.chan.send("sent", report)

    # 4. Every device comes back at once and is pushed what it missed.
    _, spec = await w.chan.recv("catch_up")
    expected: dict[int, list[int]] = spec["expected"]
    for dev in devices:
        dev.missing = set(expected.get(dev.user.user_id, ()))
        dev.received = array.array("Q")
        dev.pending = -1
        dev.done_ns = 0
    w.t0, w.deadline = spec["t0"], spec["deadline"]
    w.bins = [0] * ((w.deadline - w.t0) // w.bin_ns + 2)
    w.delivered = 0
    w.devices_done = 0
    w.devices_total = len(devices)
    w.all_done.clear()
    before_disconnects = w.disconnects
    await asyncio.sleep(max(0, w.t0 - _now()) / 1e9)
    cpu0 = w.cpu_s()
    login_us = array.array("Q")
    conns = await open_devices(w, devices, plan.login, login_us, catching_up=True)
    t_logged_in = _now()
    w.devices_total = len(conns)  # a device that could not log in is never caught up
    if w.devices_done >= w.devices_total:
        w.all_done.set()
    while not w.all_done.is_set() and (left := w.deadline - _now()) > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.all_done.wait(), min(_PROGRESS_EVERY, left / 1e9))
        w.chan.send("progress", w.delivered)
    w.chan.send("progress", w.delivered)
    # The server has stored every ack before the CPU is read (and before "again").
    settled = await asyncio.gather(
        *(settle(w, c) for c in conns if not c.lost), return_exceptions=True
    )
    settle_failures = sum(1 for p in settled if isinstance(p, BaseException))
    records: list[dict[str, Any]] = [
        {
            "user_id": d.user.user_id,
            "device": d.name,
            "named": d.named,
            "pending": d.pending,
            "received": d.received.tobytes(),
            "done_ns": d.done_ns,
        }
        for d in devices
    ]
    w.chan.send(
        "caught_up",
        {
            "devices": records,
            "login_errors": w.login_errors,
            "login_latencies_us": login_us.tobytes(),
            "t_logged_in": t_logged_in,
            "bins": w.bins,
            "disconnects": w.disconnects - before_disconnects,
            "settle_failures": settle_failures,
            "protocol_errors": w.protocol_errors,
            "cpu_s": w.cpu_s() - cpu0,
            "notes": w.notes,
        },
    )

    # 5. Once more: what every device acked is not pushed to it again.
    await w.chan.recv("again")
    await close_all(w, conns)
    for dev in devices:
        dev.missing = set()
        dev.received = array.array("Q")
        dev.pending = -1
    before_disconnects = w.disconnects
    conns = await open_devices(w, devices, plan.login)
    await asyncio.gather(
        *(c.request(Ping.TYPE, {}) for c in conns if not c.lost), return_exceptions=True
    )
    # Had a device been told of messages, wait (briefly) for them to say which came.
    told = sum(max(0, d.pending) for d in devices)
    end = _now() + int(min(5.0, plan.timeout) * 1e9)
    while sum(len(d.received) for d in devices) < told and _now() < end:
        await asyncio.sleep(0.01)
    w.chan.send(
        "again",
        {
            "logged_in": len(conns),
            "pending": sum(max(0, d.pending) for d in devices),
            "pushed": sum(len(d.received) for d in devices),
            "disconnects": w.disconnects - before_disconnects,
        },
    )
    await w.chan.recv("close")
