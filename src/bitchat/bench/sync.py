"""The ``sync`` scenario, bench-process side: devices catching up on what they missed.

``users`` users with ``devices`` devices each: every device logs in once with
its own device id, so the server knows it, and goes offline. ``senders``
other users then send ``messages`` messages to them: one-to-one, spread over
every (sender, user) pair, and a ``group_share`` of them into groups (each
sender owns one group, whose members are every ``senders``-th user). Then
every device comes back at once (a token login with its device's token, or a
password login, always with the same device id) and is pushed what it
missed, acking as it goes.

Measured: the time from the first come-back login to the moment the last
device has every message of its user (the catch-up), the deliveries (device,
message) per second, and the server's CPU per delivery over the catch-up.
Checked on every device: each message addressed to its user arrived, none
twice, none not addressed to it, in msg_id order, and ``LoginOk.pending`` was
the number that had to arrive; then every device logs in once more, and
nothing it acked may come again (``pending`` 0, no push).

The worker side is :mod:`bitchat.bench.syncload`.
"""

from __future__ import annotations

import array
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bitchat.bench.runner import (
    BenchConfig,
    BenchResult,
    Progress,
    Workers,
    _plan,
    _sample,
    _server_cost,
    _split,
)
from bitchat.bench.serverproc import ServerHandle, UserSpec
from bitchat.bench.stats import percentiles_ms
from bitchat.im.packets import SendGroup, SendP2P


def plan_messages(
    users: int, senders: int, messages: int, group_share: float
) -> list[tuple[int, int]]:
    """Who sends what: ``(sender, user)`` per message, ``user`` -1 for the sender's group.

    Group messages are spread evenly among the one-to-one ones (every
    ``1 / group_share``-th message); one-to-one message ``k`` goes to user
    ``k % users`` from sender ``(k // users) % senders``, so every user hears
    from every sender.
    """
    out: list[tuple[int, int]] = []
    k = g = 0
    for i in range(messages):
        if int((i + 1) * group_share) > int(i * group_share):
            out.append((g % senders, -1))
            g += 1
        else:
            out.append(((k // users) % senders, k % users))
            k += 1
    return out


@dataclass
class SyncCheck:
    """What the devices were pushed in one catch-up, against what they should have been."""

    devices: int = 0
    caught_up: int = 0
    """Devices that got every message of their user."""
    deliveries: int = 0
    """Expected (device, message) pairs that arrived."""
    lost: int = 0
    """Expected (device, message) pairs that never arrived."""
    duplicated: int = 0
    """Pushes of a msg_id the device had already been pushed in this catch-up."""
    unexpected: int = 0
    """Pushes of a message not addressed to the device's user."""
    reordered: int = 0
    """Pushes of a msg_id below one pushed before it on the same device."""
    pending_wrong: int = 0
    """Devices whose ``LoginOk.pending`` was not the number of messages they missed."""
    device_wrong: int = 0
    """Devices whose ``LoginOk.device`` was not the device id they logged in with."""
    not_logged_in: int = 0
    examples: list[str] = field(default_factory=list)

    def example(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)


def _ids(value: bytes | Iterable[int]) -> Iterable[int]:
    if isinstance(value, bytes):
        ids: array.array[int] = array.array("Q")
        ids.frombytes(value)
        return ids
    return value


def check_devices(
    expected: Mapping[int, Collection[int]], records: Iterable[Mapping[str, Any]]
) -> SyncCheck:
    """Check each device's record (``user_id``, ``device``, ``named``, ``pending``,
    ``received``: the msg_ids pushed, in order) against ``expected``: user id ->
    the msg_ids addressed to that user."""
    c = SyncCheck()
    for rec in records:
        c.devices += 1
        user, device = int(rec["user_id"]), str(rec["device"])
        want = set(expected.get(user, ()))
        if int(rec["pending"]) < 0:
            c.not_logged_in += 1
            c.lost += len(want)
            c.example(f"device {device} of user {user} could not log in")
            continue
        seen: set[int] = set()
        last = 0
        for mid in _ids(rec["received"]):
            if mid in seen:
                c.duplicated += 1
                continue
            seen.add(mid)
            if mid < last:
                c.reordered += 1
            last = max(last, mid)
            if mid not in want:
                c.unexpected += 1
        arrived = len(want & seen)
        c.deliveries += arrived
        missing = len(want) - arrived
        if missing:
            c.lost += missing
            c.example(
                f"device {device} of user {user} is missing {missing} of {len(want)} "
                f"message(s), the first msg_id {min(want - seen)}"
            )
        else:
            c.caught_up += 1
        if int(rec["pending"]) != len(want):
            c.pending_wrong += 1
            c.example(
                f"device {device} of user {user} was told pending {rec['pending']}, "
                f"missed {len(want)}"
            )
        if str(rec.get("named", device)) != device:
            c.device_wrong += 1
            c.example(f"device {device} of user {user} was given device {rec.get('named')!r}")
    return c


def run_sync(
    cfg: BenchConfig,
    handle: ServerHandle,
    users: list[UserSpec],
    run_id: str,
    result: BenchResult,
    progress: Progress,
) -> None:
    receivers, senders = users[: cfg.users], users[cfg.users :]
    procs = max(1, min(cfg.procs, len(receivers)))
    rparts = _split(receivers, procs, lambda u: u.index)
    sparts = _split(senders, procs, lambda u: u.index)
    plans = [
        _plan(
            cfg,
            i,
            handle,
            rparts[i],
            run_id,
            senders=sparts[i],
            devices=cfg.devices,
            groups=cfg.group_share > 0,
        )
        for i in range(procs)
    ]
    n_devices = len(receivers) * cfg.devices
    slow = bool(cfg.target)  # a running server's users log in by password first
    workers = Workers(plans)
    try:
        ready = workers.gather(
            "ready",
            60 + len(senders) * (0.5 if slow else 0.1),
            lambda: progress("log in senders", sum(workers.progress), len(senders), ""),
            handle.alive,
        )
        groups: dict[int, int] = {}
        for r in ready:
            groups.update(r["groups"])
        progress("log in senders", len(senders), len(senders), "")
        # User r is in the group of sender r % senders.
        member_of: dict[int, int] = {}
        if groups:
            member_of = {u.index: groups[senders[u.index % len(senders)].index] for u in receivers}
        for i, part in enumerate(rparts):
            mine = {u.index: member_of[u.index] for u in part if u.index in member_of}
            workers.send(i, "register", {"groups": mine})
        registered = workers.gather(
            "registered",
            60 + n_devices * 0.2,
            lambda: progress("register devices", sum(workers.progress), n_devices, ""),
            handle.alive,
        )
        ids: dict[int, int] = {}
        for r in registered:
            ids.update(r["ids"])
        progress("register devices", n_devices, n_devices, "every device offline")

        targets: dict[int, list[tuple[int, int]]] = {s.index: [] for s in senders}
        for j, r in plan_messages(len(receivers), len(senders), cfg.messages, cfg.group_share):
            sender = senders[j].index
            if r < 0:
                targets[sender].append((SendGroup.TYPE, groups[sender]))
            else:
                targets[sender].append((SendP2P.TYPE, ids[receivers[r].index]))
        deadline = time.monotonic_ns() + int(cfg.timeout * 1e9)
        for i, part in enumerate(sparts):
            workers.send(
                i,
                "send",
                {"targets": {s.index: targets[s.index] for s in part}, "deadline": deadline},
            )
        sent_parts = workers.gather(
            "sent",
            cfg.timeout + 30,
            lambda: progress("send", sum(workers.progress), cfg.messages, "devices offline"),
            handle.alive,
        )
        sent: dict[int, Any] = {}
        for s in sent_parts:
            sent.update(s)
        members: dict[int, list[int]] = {}
        for u in receivers:
            if u.index in member_of:
                members.setdefault(member_of[u.index], []).append(ids[u.index])
        expected: dict[int, list[int]] = {ids[u.index]: [] for u in receivers}
        stored = 0
        for index, report in sent.items():
            for (kind, target), mid in zip(targets[index], report["msg_ids"], strict=True):
                if not mid:
                    continue
                stored += 1
                for uid in members[target] if kind == SendGroup.TYPE else [target]:
                    expected[uid].append(mid)
        progress("send", stored, cfg.messages, f"{stored:,} stored, devices offline")
        wanted = sum(len(v) for v in expected.values()) * cfg.devices

        t0 = time.monotonic_ns() + 300_000_000
        deadline = t0 + int(cfg.timeout * 1e9)
        for i, part in enumerate(rparts):
            workers.send(
                i,
                "catch_up",
                {
                    "expected": {ids[u.index]: expected[ids[u.index]] for u in part},
                    "t0": t0,
                    "deadline": deadline,
                },
            )
        time.sleep(max(0, t0 - time.monotonic_ns()) / 1e9)
        before = _sample(handle)

        def show() -> None:
            done = sum(workers.progress)
            elapsed = (time.monotonic_ns() - t0) / 1e9
            rate = done / elapsed if elapsed > 0 else 0.0
            progress("catch up", done, wanted, f"{done:,.0f} deliveries, {rate:,.0f}/s")

        caught = workers.gather("caught_up", cfg.timeout + 60, show, handle.alive)
        after = _sample(handle)
        workers.broadcast("again")
        again = workers.gather(
            "again",
            60 + n_devices * (0.2 if cfg.login == "password" or slow else 0.05),
            lambda: progress("log in again", sum(workers.progress), n_devices, ""),
            handle.alive,
        )
        progress("log in again", n_devices, n_devices, "nothing acked may come again")
    finally:
        workers.stop()

    records = [d for c in caught for d in c["devices"]]
    check = check_devices(expected, records)
    progress("catch up", check.deliveries, wanted, f"{check.deliveries:,} deliveries in all")
    done = [d["done_ns"] - t0 for d in records if d["done_ns"]]
    catch_up_s = max(done) / 1e9 if done else (deadline - t0) / 1e9
    result.delivered = check.deliveries
    result.duration_s = round(catch_up_s, 3)
    result.delivered_per_s = check.deliveries / catch_up_s if catch_up_s > 0 else 0.0
    # Per device: how long after the first come-back login it had everything.
    result.latencies_us = sorted(max(0, ns) // 1000 for ns in done)
    result.latency_ms = percentiles_ms(result.latencies_us)
    timeline: list[int] = []
    login_us: array.array[int] = array.array("Q")
    login_errors: dict[str, int] = {}
    for c in caught:
        bins = c["bins"]
        if len(timeline) < len(bins):
            timeline.extend([0] * (len(bins) - len(timeline)))
        for i, v in enumerate(bins):
            timeline[i] += v
        login_us.frombytes(c["login_latencies_us"])
        for code, n in c["login_errors"].items():
            login_errors[code] = login_errors.get(code, 0) + n
        result.disconnects += c["disconnects"]
        result.client_cpu_s += c["cpu_s"]
    while timeline and not timeline[-1]:
        timeline.pop()
    result.timeline = timeline
    result.lost = check.lost
    result.duplicated = check.duplicated
    result.reordered = check.reordered
    errors: dict[str, int] = {}
    for report in sent.values():
        for code, n in report["errors"].items():
            errors[code] = errors.get(code, 0) + n
    result.send_errors = sum(errors.values())
    unanswered = sum(r["unanswered"] + r["unsent"] for r in sent.values())
    group_messages = sum(1 for _, r in plan_messages(1, 1, cfg.messages, cfg.group_share) if r < 0)
    result.extra.update(
        {
            "users": len(receivers),
            "devices_per_user": cfg.devices,
            "devices": check.devices,
            "devices_caught_up": check.caught_up,
            "messages_planned": cfg.messages,
            "group_messages_planned": group_messages,
            "messages_sent": stored,
            "messages_unacked": unanswered,
            "send_error_codes": errors,
            "deliveries_expected": wanted,
            "catch_up_s": result.duration_s,
            "pending_total": sum(max(0, int(d["pending"])) for d in records),
            "pending_wrong": check.pending_wrong,
            "device_wrong": check.device_wrong,
            "unexpected": check.unexpected,
            "login_failures": sum(login_errors.values()),
            "login_error_codes": login_errors,
            "login_latency_ms": percentiles_ms(sorted(login_us)),
            "settle_failures": sum(c["settle_failures"] for c in caught),
            "devices_again": sum(a["logged_in"] for a in again),
            "pending_after_ack": sum(a["pending"] for a in again),
            "pushed_after_ack": sum(a["pushed"] for a in again),
        }
    )
    result.disconnects += sum(a["disconnects"] for a in again)
    _server_cost(result, before, after, check.deliveries)
    if check.lost:
        result.problems.append(
            f"LOST: {check.lost} message(s) never reached a device "
            f"({check.devices - check.caught_up} of {check.devices} devices not caught up)"
        )
    if check.duplicated:
        result.problems.append(f"DUPLICATED: {check.duplicated} message(s) pushed twice")
    if check.reordered:
        result.problems.append(f"REORDERED: {check.reordered} message(s) out of msg_id order")
    if check.unexpected:
        result.problems.append(
            f"MISDELIVERED: {check.unexpected} message(s) pushed to a device of another user"
        )
    if check.pending_wrong:
        result.problems.append(
            f"PENDING: {check.pending_wrong} device(s) told a pending count not what they missed"
        )
    if check.device_wrong:
        result.problems.append(
            f"DEVICE: {check.device_wrong} login(s) answered with another device id"
        )
    repushed = max(result.extra["pending_after_ack"], result.extra["pushed_after_ack"])
    if repushed:
        result.problems.append(
            f"REPUSHED: after the catch-up, the devices logged in again and were told of "
            f"{result.extra['pending_after_ack']} and pushed {result.extra['pushed_after_ack']} "
            "message(s) they had acked"
        )
    if result.extra["devices_again"] != check.devices:
        result.problems.append(
            f"ERRORS: {check.devices - result.extra['devices_again']} device(s) could not "
            "log in again"
        )
    result.problems.extend(check.examples)
    if login_errors:
        result.problems.append(
            f"ERRORS: {sum(login_errors.values())} login(s) failed: {login_errors}"
        )
        for c in caught:
            result.problems.extend(c["notes"][:3])
    if result.send_errors:
        result.problems.append(f"ERRORS: {result.send_errors} send(s) refused: {errors}")
    if unanswered:
        result.problems.append(f"UNACKED: {unanswered} send(s) got no answer within --timeout")
    if result.extra["settle_failures"]:
        result.problems.append(
            f"ACKS: {result.extra['settle_failures']} device(s) got no answer to their "
            "last ack (or ping) after the catch-up"
        )
    if result.disconnects:
        result.problems.append(f"DISCONNECTS: {result.disconnects} connection(s) dropped")
