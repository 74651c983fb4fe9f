"""Attacks on connections and memory, against a real server on loopback.

Slow peers (a byte at a time, never logging in), floods of connections from one
address or many, and readers that read nothing while others post: each is run
against a real standalone server, and the test asserts what a user relies on:
the attacker's connections end within the deadline, an honest user is served
throughout, memory comes back.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from bitchat.admission import ConnectionSlots, WriteBudget, release_memory
from bitchat.im.packets import JoinGroup, Login
from conftest import WAIT, RawPeer
from im_helpers import Inbox, clients_of, free_port, im_server, port_of, subprocess_env

PING = 1
HEADER = struct.Struct(">BBBBHII")


def frame(type_: int, body: dict[str, Any], rid: int) -> bytes:
    raw = orjson.dumps(body)
    return HEADER.pack(0xBC, 1, 1, 0, type_, rid, len(raw)) + raw


async def closed_within(peer: RawPeer, seconds: float) -> float:
    """Seconds until the server closes ``peer`` (fails after ``seconds``)."""
    start = time.monotonic()
    await asyncio.wait_for(peer.reader.read(), seconds)  # to EOF; data before it is ignored
    return time.monotonic() - start


async def start_server(
    python_args: list[str], port: int, tmp_path: Path, *options: str
) -> asyncio.subprocess.Process:
    """``bitchat server`` in a process of its own (its memory and descriptors alone)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *python_args,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "data"),
        *options,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )


# -- pure bookkeeping ------------------------------------------------------------------------


def test_slots_cap_in_total_and_per_address() -> None:
    slots: ConnectionSlots[str] = ConnectionSlots(total=3, per_address=2)
    assert slots.acquire("a") is None and slots.acquire("a") is None
    assert "max_connections_per_address" in (slots.acquire("a") or "")
    assert slots.acquire("b") is None
    assert "max_connections" in (slots.acquire("c") or "")
    evicted: list[int] = []
    assert slots.acquire("c", lambda: evicted.append(1) is None) is None  # room was made
    assert evicted == [1]
    slots.release("a")
    slots.release("b")
    slots.release("zzz")  # never held: nothing changes
    assert slots.count == 2 and slots.by_address == {"a": 1, "c": 1}


def test_write_budget_sheds_the_heaviest_until_a_quarter_is_free() -> None:
    budget: WriteBudget[str] = WriteBudget(limit=100)
    assert not budget.update("a", 10)
    assert not budget.update("b", 60)
    assert budget.over() == []
    assert budget.update("c", 40)  # 110 > 100
    assert budget.over() == ["b"]  # 110 - 60 = 50: a quarter of the budget is free
    budget.update("d", 55)  # 165
    assert budget.over() == ["b", "d"]  # 165 -> 105 -> 50
    budget.update("b", 0)
    assert budget.total == 105 and "b" not in budget.sizes
    budget.remove("d")
    assert budget.total == 50 and budget.over() == []
    assert not WriteBudget(0).update("x", 1 << 40)  # 0: no budget


def test_release_memory_runs_here() -> None:
    assert release_memory() in (True, False)  # False only off glibc
    if sys.platform.startswith("linux"):
        assert release_memory()


# -- slow peers ----------------------------------------------------------------------------------


async def test_a_frame_trickled_a_byte_at_a_time_is_cut_off(
    tmp_path: Path, raw_connect: Any
) -> None:
    async with im_server(tmp_path, frame_timeout=0.5, read_idle_timeout=30.0) as server:
        peer = await raw_connect(port_of(server))
        frame = peer.frame(PING, rid=1)
        peer.send(frame)  # a whole frame first: the connection is a session
        assert (await peer.read_frame())[2] == 2

        async def trickle() -> None:
            for byte in frame * 10:  # each byte well inside the idle timeout
                peer.send(bytes([byte]))
                await asyncio.sleep(0.05)  # the attack's pace, not a wait for an event

        attack = asyncio.create_task(trickle())
        try:
            # Without the frame deadline the idle timer, reset by every byte, keeps it.
            assert await closed_within(peer, 5.0) < 3.0
        finally:
            attack.cancel()


async def test_a_connection_that_never_logs_in_is_closed(tmp_path: Path, raw_connect: Any) -> None:
    settings = {"login_timeout": 0.5, "read_idle_timeout": 30.0}
    async with im_server(tmp_path, **settings) as server, clients_of(server) as clients:
        honest = await clients.login("houyi")
        loiterer = await raw_connect(port_of(server))
        loiterer.send_frame(PING, rid=1)

        async def keep_pinging() -> None:
            for i in range(2, 200):
                loiterer.send_frame(PING, rid=i)
                await asyncio.sleep(0.05)

        pings = asyncio.create_task(keep_pinging())
        try:
            assert await closed_within(loiterer, 5.0) < 3.0
        finally:
            pings.cancel()
        # The logged-in user, past the same deadline, is still served.
        assert [u.name for u in await honest.online_users()] == ["houyi"]


async def test_one_address_gets_at_most_its_share(tmp_path: Path, raw_connect: Any) -> None:
    async with im_server(tmp_path, max_connections_per_address=4) as server:
        port = port_of(server)
        flood = [await raw_connect(port, local_addr=("127.0.0.2", 0)) for _ in range(4)]
        for peer in flood:
            assert (await peer.request(PING, rid=1))[2] == 2
        refused = await raw_connect(port, local_addr=("127.0.0.2", 0))
        assert await closed_within(refused, WAIT) < WAIT  # dropped at once
        async with clients_of(server) as clients:  # another address is served
            gris = await clients.login("gris")
            assert [u.name for u in await gris.online_users()] == ["gris"]
        assert (await flood[0].request(PING, rid=2))[2] == 2  # the first four stay


async def test_at_the_cap_the_oldest_stranger_makes_room_for_a_user(
    tmp_path: Path, raw_connect: Any
) -> None:
    async with im_server(tmp_path, max_connections=4, login_timeout=60.0) as server:
        port = port_of(server)
        strangers = []
        for i in range(4):  # from many addresses: the per-address cap does not help
            peer = await raw_connect(port, local_addr=(f"127.0.0.{10 + i}", 0))
            assert (await peer.request(PING, rid=1))[2] == 2
            strangers.append(peer)
        async with clients_of(server) as clients:
            gris = await clients.login("gris")  # connecting took the oldest's slot
            assert await closed_within(strangers[0], WAIT) < WAIT
            houyi = await clients.login("houyi")  # and again
            assert await closed_within(strangers[1], WAIT) < WAIT
            names = sorted(u.name for u in await houyi.online_users())
            assert names == ["gris", "houyi"]
            assert (await strangers[3].request(PING, rid=2))[2] == 2
            # Only logged-in users left and the cap reached: a newcomer is refused.
            await strangers[2].close()
            await strangers[3].close()
            await clients.login("chang")
            await clients.login("wugang")
            refused = await raw_connect(port)
            assert await closed_within(refused, WAIT) < WAIT
            assert len(await gris.online_users()) == 4


# -- readers that read nothing ---------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "hard_limit",
    [1 << 20, 8 << 20],
    ids=["per-connection-limit", "global-budget"],
)
async def test_readers_that_read_nothing_cannot_take_the_memory(
    tmp_path: Path, hard_limit: int
) -> None:
    # A server process of its own, so its memory is measured alone. With the old
    # per-connection limit of 8 MiB, 60 sleepers would hold 480 MiB but for the budget.
    port = free_port()
    budget = int(os.environ.get("BITCHAT_TEST_UNSENT_BUDGET", 48 << 20))
    proc = await start_server(
        ["-m", "bitchat"],
        port,
        tmp_path,
        "--max-unsent-bytes",
        str(budget),
        "--write-hard-limit",
        str(hard_limit),
        "--rate-limit",
        "0",
        "--password-hash-time-cost",
        "1",
        "--password-hash-memory-kib",
        "8",
    )
    assert proc.stderr is not None
    try:
        while b"started on" not in await asyncio.wait_for(proc.stderr.readline(), 4 * WAIT):
            pass
        stderr_lines: list[bytes] = []

        async def drain_stderr() -> None:
            assert proc.stderr is not None
            while line := await proc.stderr.readline():
                stderr_lines.append(line)

        logger = asyncio.create_task(drain_stderr())
        from bitchat import Settings
        from bitchat.im.client import IMClient

        settings = Settings(request_timeout=WAIT, connect_timeout=WAIT, heartbeat_interval=1.0)
        owner = IMClient("127.0.0.1", port, settings)
        await owner.connect(WAIT)
        await owner.login("owner", "secret")
        group = await owner.create_group("crowd")
        honest = IMClient("127.0.0.1", port, settings)
        await honest.connect(WAIT)
        await honest.login("honest", "secret")
        await honest.join_group(group.group_id)
        inbox = Inbox(honest)

        # 60 members that never read, with the smallest receive buffers.
        sleepers: list[socket.socket] = []
        for i in range(60):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
            login = frame(Login.TYPE, {"name": f"sleeper{i}", "password": "secret"}, 1)
            join = frame(JoinGroup.TYPE, {"group_id": group.group_id}, 2)
            await asyncio.get_running_loop().sock_sendall(s, login + join)
            sleepers.append(s)
        members = 0
        for _ in range(200):  # bounded: wait until the sleepers are in the group
            members = len(await owner.group_members(group.group_id))
            if members >= 62:
                break
            await asyncio.sleep(0.05)
        assert members >= 62
        base = rss_kib(proc.pid)

        # Four posters, 4,096 control characters a message (24 KiB a push in JSON).
        text = "\x01" * 4096
        peak = base
        sent = 0
        start = time.monotonic()
        while time.monotonic() - start < 6.0 and sent < 400:
            await asyncio.gather(*(owner.send_group(group.group_id, text) for _ in range(4)))
            sent += 4
            peak = max(peak, rss_kib(proc.pid))
        await inbox.wait_for(sent, timeout=4 * WAIT)  # the honest member got every one
        # Every sleeper was shed: the budget, then the hard limit, never 60 x 1 MiB kept.
        for _ in range(200):
            if len([ln for ln in stderr_lines if b"over the budget" in ln or b"unread" in ln]):
                break
            await asyncio.sleep(0.05)
        shed = [ln for ln in stderr_lines if b"over the budget" in ln or b"unread" in ln]
        assert shed, b"".join(stderr_lines[-10:]).decode()
        grown_mib = (peak - base) / 1024
        assert grown_mib < budget / (1 << 20) + 64, f"RSS grew {grown_mib:.0f} MiB"
        for s in sleepers:
            s.close()
        after = base
        for _ in range(100):  # the freed pages go back soon after the shedding
            after = rss_kib(proc.pid)
            if after - base < 64 * 1024:
                break
            await asyncio.sleep(0.05)
        assert (after - base) / 1024 < 64, (
            f"RSS stayed {after / 1024:.0f} MiB (base {base / 1024:.0f})"
        )
        await honest.close()
        await owner.close()
        logger.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 4 * WAIT)


# -- out of file descriptors ------------------------------------------------------------------

_FD_HOG = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
hog = [os.open(os.devnull, os.O_RDONLY) for _ in range(90)]  # what else a process holds
from bitchat.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, rlimits")
@pytest.mark.parametrize("loop_flag", [[], ["--no-uvloop"]], ids=["uvloop", "asyncio"])
async def test_running_out_of_file_descriptors_is_survived(
    tmp_path: Path, loop_flag: list[str]
) -> None:
    port = free_port()
    proc = await start_server(["-c", _FD_HOG], port, tmp_path, *loop_flag)
    assert proc.stderr is not None
    lines: list[bytes] = []
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        while b"started on" not in (
            line := await asyncio.wait_for(proc.stderr.readline(), 4 * WAIT)
        ):
            lines.append(line)

        async def read_log() -> None:
            assert proc.stderr is not None
            while line := await proc.stderr.readline():
                lines.append(line)

        logger = asyncio.create_task(read_log())
        import psutil

        cpu_before = sum(psutil.Process(proc.pid).cpu_times()[:2])
        for _ in range(100):  # far more than the ~30 descriptors left
            flood.append(await asyncio.open_connection("127.0.0.1", port))
        # The server drops what it cannot take: some of the flood sees its end at once.
        ends = [asyncio.ensure_future(r.read()) for r, _ in flood]
        done, _ = await asyncio.wait(ends, timeout=4 * WAIT, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no connection of the flood was closed"
        cpu = sum(psutil.Process(proc.pid).cpu_times()[:2]) - cpu_before
        assert cpu < 2.0, f"{cpu:.2f}s of CPU: a busy loop"
        for _, w in flood:
            w.close()
        for end in ends:
            end.cancel()
        flood.clear()
        # Served again once descriptors are free (the client retries as a real one does).
        reply = b""
        deadline = time.monotonic() + 4 * WAIT
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # a client's retry pace
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(HEADER.pack(0xBC, 1, 1, 0, PING, 1, 2) + b"{}")
            try:
                reply = await asyncio.wait_for(r.readexactly(16), 1.0)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                reply = b""
            w.close()
            if reply:
                break
        assert reply[4:6] == b"\x00\x02"  # a Pong
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 4 * WAIT)
        await asyncio.wait_for(logger, WAIT)  # the whole log, the stop included
        errors = [ln for ln in lines if b"ERROR" in ln or b"Traceback" in ln]
        assert len(errors) <= 1, b"".join(errors[:5]).decode()
    finally:
        for _, w in flood:
            w.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_cli_waits_past_the_login_deadline_without_a_word(tmp_path: Path) -> None:
    # `bitchat client` connects at start and a person types -lo when ready: the login
    # deadline cuts the idle connection, the client connects again quietly.
    async with im_server(tmp_path, login_timeout=0.3) as server:
        opened: asyncio.Queue[Any] = asyncio.Queue()
        closed: asyncio.Queue[Any] = asyncio.Queue()
        server.on_session_open.append(opened.put_nowait)
        server.on_session_close.append(closed.put_nowait)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bitchat",
            "client",
            "--port",
            str(port_of(server)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=subprocess_env(),
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            first = await asyncio.wait_for(opened.get(), 4 * WAIT)
            assert await asyncio.wait_for(closed.get(), 4 * WAIT) is first  # the deadline
            await asyncio.wait_for(opened.get(), 4 * WAIT)  # and back, by itself
            proc.stdin.write(b"-lo houyi secret\n-lu\n")
            await proc.stdin.drain()
            proc.stdin.close()
            out = (await asyncio.wait_for(proc.stdout.read(), 4 * WAIT)).decode()
            await asyncio.wait_for(proc.wait(), 4 * WAIT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert "Login success" in out and "houyi(1)" in out, out
        assert "Connection lost" not in out and "Reconnected" not in out, out
        assert out.count("Connected to") == 1, out


async def test_a_burst_at_the_cap_evicts_one_stranger_per_newcomer(
    tmp_path: Path, raw_connect: Any
) -> None:
    async with im_server(tmp_path, max_connections=4, login_timeout=60.0) as server:
        port = port_of(server)
        strangers = []
        for i in range(4):
            peer = await raw_connect(port, local_addr=(f"127.0.0.{10 + i}", 0))
            assert (await peer.request(PING, rid=1))[2] == 2
            strangers.append(peer)
        # Three newcomers at once (connected while the loop is held, so the server
        # accepts them in one pass): each takes the slot of another, oldest first.
        socks = [
            socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{20 + i}", 0))
            for i in range(3)
        ]
        burst = [RawPeer(*await asyncio.open_connection(sock=s)) for s in socks]
        for peer in burst:
            peer.send_frame(PING, rid=1)
        for peer in burst:
            assert (await peer.read_frame())[2] == 2
        for peer in strangers[:3]:
            assert await closed_within(peer, WAIT) < WAIT
        assert (await strangers[3].request(PING, rid=2))[2] == 2
        assert server.slots.count == 4 and len(server.sessions) == 4
        for peer in burst:
            await peer.close()
