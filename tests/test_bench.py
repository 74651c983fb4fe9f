"""``bitchat bench`` on tiny sizes: it runs, checks every message, and says when one is lost.

Speed is never asserted here (the figures live in docs/benchmarks.md); these
tests prove the instrument: its scenarios run end to end against a real server
process, its JSON has every field, its loss accounting reads zero on a good
server and fails loudly on one that drops a message.
"""

from __future__ import annotations

import array
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from bitchat.bench import BenchConfig, run_bench
from bitchat.bench.loadgen import Conn, Worker, WorkerPlan
from bitchat.bench.procstat import raise_nofile_limit, read_proc
from bitchat.bench.report import summary_table, write_json, write_plot
from bitchat.bench.serverproc import UserSpec, parse_target
from bitchat.bench.stats import percentile, percentiles_ms
from bitchat.errors import UsageError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

WAIT = 60.0 * float(os.environ.get("BITCHAT_TEST_TIMEOUT_FACTOR", "1"))

REQUIRED = {
    "scenario",
    "delivered",
    "delivered_per_s",
    "latency_ms",
    "lost",
    "duplicated",
    "reordered",
    "server_cpu_us_per_msg",
    "server_rss_kib",
}


def _bench(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bitchat", "bench", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "120"},
    )


# -- end to end ---------------------------------------------------------------------------------


def test_p2p_runs_checks_every_message_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "p2p.json"
    done = _bench("p2p", "--users", "4", "--duration", "1", "--window", "4", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "delivered messages/s" in done.stdout
    assert "no message lost, duplicated or reordered" in done.stdout
    data = json.loads(out.read_text())
    assert data.keys() >= REQUIRED
    assert set(data["latency_ms"]) >= {"p50", "p90", "p99", "max"}
    assert data["scenario"] == "p2p"
    assert data["delivered"] > 0 and data["delivered_per_s"] > 0
    assert data["delivered"] == data["messages_acked"]  # every acked message arrived
    assert (data["lost"], data["duplicated"], data["reordered"]) == (0, 0, 0)
    assert data["send_errors"] == 0 and data["disconnects"] == 0
    assert data["server_cpu_us_per_msg"] > 0
    assert data["server_rss_kib"] > 1000
    assert data["ok"] is True
    assert data["server"]["self_started"] is True
    assert "--rate-limit" in data["server"]["argv"]  # the bench says how it ran the server
    assert data["latency_ms"]["p50"] <= data["latency_ms"]["p99"] <= data["latency_ms"]["max"]


def test_group_every_member_gets_every_post() -> None:
    r = run_bench(BenchConfig("group", members=5, senders=2, window=4, duration=1.0, procs=2))
    assert r.ok, r.problems
    assert r.extra["fanout"] == 4
    # Each sender's acked messages reach the 4 other members.
    assert r.delivered == r.extra["messages_acked"] * 4
    assert (r.lost, r.duplicated, r.reordered) == (0, 0, 0)
    assert r.server_cpu_us_per_msg is not None


def test_connect_counts_logins() -> None:
    r = run_bench(BenchConfig("connect", connections=12, procs=2))
    assert r.ok, r.problems
    assert r.extra["logins"] == 12 and r.delivered == 12
    assert r.extra["logins_per_s"] > 0
    assert r.latency_ms["p50"] is not None


def test_idle_measures_memory_per_connection(tmp_path: Path) -> None:
    r = run_bench(BenchConfig("idle", connections=20, duration=0.5, procs=1))
    assert r.ok, r.problems
    assert r.extra["connections"] == 20
    assert "rss_kib_per_conn" in r.extra
    path = tmp_path / "idle.json"
    write_json(r, str(path))
    data = json.loads(path.read_text())
    assert REQUIRED | {"rss_kib_per_conn"} <= data.keys()


def test_password_logins_work_too() -> None:
    r = run_bench(BenchConfig("connect", connections=3, procs=1, login="password"))
    assert r.ok, r.problems
    assert r.extra["logins"] == 3


# -- a server that drops a message ----------------------------------------------------------

DROPPING_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from bitchat.im.app import build_standalone_server
    from bitchat.im.memory import MemoryConnectionCenter
    from bitchat.settings import Settings

    class DroppingCenter(MemoryConnectionCenter):
        '''Stores and acks every message, but never pushes the 20th.'''

        def __init__(self):
            super().__init__()
            self.seen = 0

        def deliver(self, message, user_ids, exclude_session=0):
            self.seen += 1
            if self.seen == 20:
                return
            super().deliver(message, user_ids, exclude_session)

    async def main(port_file, data_dir):
        settings = Settings(data_dir=data_dir, rate_limit=0, password_hash_time_cost=1,
                            password_hash_memory_kib=1024)
        server = build_standalone_server("127.0.0.1", 0, settings)
        server.data["im"].connections = DroppingCenter()
        await server.start()
        with open(port_file + ".tmp", "w") as f:
            f.write(str(server.address[1]))
        import os
        os.replace(port_file + ".tmp", port_file)
        await server.serve_forever()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def test_a_lost_message_fails_loudly(tmp_path: Path) -> None:
    script = tmp_path / "dropping_server.py"
    script.write_text(DROPPING_SERVER)
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, str(script), str(port_file), str(tmp_path / "d")], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + WAIT
        while not port_file.exists():
            assert server.poll() is None, "the dropping server died"
            assert time.monotonic() < deadline, "the dropping server did not start"
            time.sleep(0.05)
        port = port_file.read_text()
        out = tmp_path / "lost.json"
        done = _bench(
            "p2p",
            "--users",
            "4",
            "--duration",
            "1",
            "--window",
            "4",
            "--drain-timeout",
            "1",
            "--target",
            f"127.0.0.1:{port}",
            "--server-pid",
            str(server.pid),
            "--json",
            str(out),
        )
    finally:
        server.terminate()
        server.wait(10)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "LOST" in done.stdout
    data = json.loads(out.read_text())
    assert data["lost"] == 1
    assert data["ok"] is False
    assert (data["duplicated"], data["reordered"]) == (0, 0)
    assert data["server"]["self_started"] is False
    assert data["server_cpu_us_per_msg"] is not None  # read from the given pid


# -- the parts ----------------------------------------------------------------------------------


def _receiver() -> Conn:
    worker = Worker(WorkerPlan(0, "p2p", "127.0.0.1", 1, []), None)  # type: ignore[arg-type]
    worker.t0, worker.deadline = 0, 1 << 62
    worker.bins = [0] * 4
    return Conn(worker, UserSpec(0, "u0", "pw"))


def test_receiver_tells_duplicates_and_reordering_from_loss() -> None:
    conn = _receiver()
    for seq in (1, 2, 4, 3, 3, 6):
        conn.received(7, seq, 0, 1000)
    last, gaps, dups, reordered, distinct = conn.rx[7]
    assert (last, gaps, dups, reordered, distinct) == (6, {5}, 1, 1, 5)
    assert conn.w.delivered == 5
    assert len(conn.w.latencies) == 5


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([], 50) is None
    ms = percentiles_ms([1000, 2000, 3000])
    assert ms["p50"] == 2.0 and ms["max"] == 3.0


def test_proc_sample_of_this_process() -> None:
    sample = read_proc(os.getpid())
    assert sample is not None
    assert sample.cpu_s > 0 and sample.rss_kib > 1000 and sample.hwm_kib >= sample.rss_kib
    assert read_proc(2**22 + 12345) is None  # beyond pid_max: no such process


def test_open_file_limit_is_raised_not_lowered() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_nofile_limit(16) == soft


def test_targets_must_be_on_this_machine() -> None:
    assert parse_target("127.0.0.1:8864") == ("127.0.0.1", 8864)
    assert parse_target("localhost:1") == ("localhost", 1)
    assert parse_target("[::1]:9") == ("::1", 9)
    for bad in ("10.0.0.1:8864", "example.com:80", "127.0.0.1"):
        with pytest.raises(UsageError):
            parse_target(bad)


def test_bad_configs_are_refused() -> None:
    for config in (BenchConfig("p2p", users=3), BenchConfig("nope"), BenchConfig(window=-1)):
        with pytest.raises(UsageError):
            config.resolved()


def test_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bitchat.bench.runner import BenchResult

    r = BenchResult(
        "p2p",
        {"users": 2, "window": 1, "payload": 100, "procs": 1},
        {"nproc": 2},
        {"self_started": True},
        "messages",
        delivered=3,
        delivered_per_s=3.0,
        duration_s=1.0,
        server_cpu_us_per_msg=30.0,
        latency_ms=percentiles_ms([500, 800, 1200]),
        timeline=[1, 2],
        latencies_us=[500, 800, 1200],
    )
    table: Any = summary_table(r)
    assert table.row_count > 5
    png = tmp_path / "plot.png"
    write_plot(r, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert array.array  # the latency sample stays a plain sequence of ints
