"""``bitchat bench`` on tiny sizes: it runs, checks every message, and says when one is lost.

Speed is never asserted here (the figures live in docs/benchmarks.md); these
tests prove the instrument: its scenarios run end to end against a real server
process, its JSON has every field, its loss accounting reads zero on a good
server and fails loudly on one that drops a message.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import select
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bitchat.bench import BenchConfig, run_bench
from bitchat.bench.loadgen import Conn, Worker, WorkerPlan
from bitchat.bench.procstat import raise_nofile_limit, read_proc
from bitchat.bench.report import (
    EXIT_STATUS_NOTE,
    print_report,
    summary_table,
    targets_table,
    write_json,
    write_plot,
)
from bitchat.bench.runner import BenchResult
from bitchat.bench.serverproc import UserSpec, parse_target
from bitchat.bench.stats import percentile, percentiles_ms
from bitchat.bench.sync import check_devices, plan_messages
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
        env={**os.environ, "COLUMNS": "80"},
    )


# -- end to end ---------------------------------------------------------------------------------


def test_p2p_runs_checks_every_message_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "p2p.json"
    done = _bench("p2p", "--users", "4", "--duration", "1", "--window", "4", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "messages delivered per second" in done.stdout
    assert "no message lost, duplicated or reordered (exit status 0)" in done.stdout
    assert "Only a failed check makes the exit status 1" in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 80
    data = json.loads(out.read_text())
    assert data.keys() >= REQUIRED
    assert set(data["latency_ms"]) >= {"p50", "p90", "p99", "max"}
    assert data["scenario"] == "p2p"
    assert data["delivered"] > 0 and data["delivered_per_s"] > 0
    assert data["delivered"] == data["messages_acked"]  # every acked message arrived
    # The total is what arrived in the window plus what arrived while draining.
    assert data["delivered"] == data["delivered_in_window"] + data["delivered_after_window"]
    assert f"{data['delivered_in_window']:,}" in done.stdout
    assert f"{data['delivered']:,}" in done.stdout
    assert (data["lost"], data["duplicated"], data["reordered"]) == (0, 0, 0)
    assert data["send_errors"] == 0 and data["disconnects"] == 0
    assert data["server_cpu_us_per_msg"] > 0
    assert data["server_rss_kib"] > 1000
    assert data["ok"] is True
    assert data["server"]["self_started"] is True
    assert "--rate-limit" in data["server"]["argv"]  # the bench says how it ran the server
    assert data["latency_ms"]["p50"] <= data["latency_ms"]["p99"] <= data["latency_ms"]["max"]


def test_group_every_member_gets_every_post() -> None:
    notes: dict[str, str] = {}
    r = run_bench(
        BenchConfig("group", members=5, senders=2, window=4, duration=1.0, procs=2),
        lambda phase, done, total, note: notes.__setitem__(phase, note),
    )
    assert r.ok, r.problems
    # The progress bars' last counts are the table's: in the window, then in all.
    assert notes["measure"].startswith(f"{r.extra['delivered_in_window']:,} deliveries,")
    assert notes["drain"] == f"{r.delivered:,} deliveries in all"
    assert r.extra["fanout"] == 4
    # Each sender's acked messages reach the 4 other members.
    assert r.delivered == r.extra["messages_acked"] * 4
    assert (r.lost, r.duplicated, r.reordered) == (0, 0, 0)
    assert r.server_cpu_us_per_msg is not None


def test_connect_counts_token_and_password_logins_apart() -> None:
    notes: dict[str, str] = {}
    r = run_bench(
        BenchConfig("connect", connections=12, procs=2),
        lambda phase, done, total, note: notes.__setitem__(phase, note),
    )
    assert r.ok, r.problems
    assert r.config["login"] == "both" and r.config["password_logins"] == 2  # 12 // 5
    assert notes["token logins"].startswith("12 logins, ")
    assert notes["password logins"].startswith("2 logins, ")
    kinds = r.extra["by_login"]
    assert (kinds["token"]["logins"], kinds["password"]["logins"]) == (12, 2)
    for k in kinds.values():
        assert k["logins_per_s"] > 0 and k["login_failures"] == 0
        assert k["latency_ms"]["p50"] is not None
        assert k["server_cpu_s"] is not None
    # The run's own figures are the token logins'.
    assert r.extra["logins"] == 12 and r.delivered == 12
    text = _render(r)
    for kind in ("token", "password"):
        assert f"{kind} logins per second" in text
        assert f"{kind} login latency p50 / p99 (ms)" in text
    assert text.splitlines()[0] == "bitchat bench connect: 12 token logins, then 2 password logins"


def test_connect_login_picks_one_kind() -> None:
    notes: dict[str, str] = {}
    r = run_bench(
        BenchConfig("connect", connections=6, procs=1, login="token"),
        lambda phase, done, total, note: notes.__setitem__(phase, note),
    )
    assert r.ok, r.problems
    assert notes["connect + log in"].startswith("6 logins, ")
    assert "by_login" not in r.extra and "password logins" not in notes
    assert r.extra["logins"] == 6 and r.extra["login"] == "token"


def test_idle_measures_memory_per_connection(tmp_path: Path) -> None:
    r = run_bench(BenchConfig("idle", connections=20, duration=0.5, procs=1))
    assert r.ok, r.problems
    assert r.extra["connections"] == 20
    assert "rss_kib_per_conn" in r.extra
    path = tmp_path / "idle.json"
    write_json(r, str(path))
    data = json.loads(path.read_text())
    assert REQUIRED | {"rss_kib_per_conn"} <= data.keys()


def test_sync_every_device_catches_up_on_every_message(tmp_path: Path) -> None:
    r = run_bench(BenchConfig("sync", users=4, devices=2, senders=2, messages=40, timeout=WAIT / 3))
    assert r.ok, r.problems
    x = r.extra
    assert (x["devices"], x["devices_caught_up"]) == (8, 8)
    assert x["messages_sent"] == 40 and x["group_messages_planned"] == 8  # 20 %
    # 32 one-to-one messages reach both devices of their user; each of the 8 group
    # messages reaches the 2 users of its group (every 2nd user), on 2 devices each.
    assert r.delivered == x["deliveries_expected"] == 32 * 2 + 8 * 2 * 2
    assert x["pending_total"] == r.delivered  # each LoginOk said what was coming
    assert (r.lost, r.duplicated, r.reordered, x["unexpected"]) == (0, 0, 0, 0)
    assert (x["pending_wrong"], x["device_wrong"], x["login_failures"]) == (0, 0, 0)
    # Logged in once more, the devices are pushed nothing: their acks moved their cursors.
    assert (x["devices_again"], x["pending_after_ack"], x["pushed_after_ack"]) == (8, 0, 0)
    assert r.server_cpu_us_per_msg is not None and r.latency_ms["max"] is not None
    path = tmp_path / "sync.json"
    write_json(r, str(path))
    data = json.loads(path.read_text())
    assert REQUIRED | {"catch_up_s", "devices_caught_up", "pending_total"} <= data.keys()
    assert data["ok"] is True


def test_sync_password_come_back() -> None:
    config = BenchConfig("sync", users=2, devices=2, senders=1, messages=6, group_share=0)
    config.login, config.procs, config.timeout = "password", 1, WAIT / 3
    r = run_bench(config)
    assert r.ok, r.problems
    assert r.delivered == 6 * 2 and r.extra["group_messages_planned"] == 0


def test_sync_plan_spreads_messages() -> None:
    plan = plan_messages(users=5, senders=2, messages=100, group_share=0.2)
    assert len(plan) == 100
    groups = [s for s, u in plan if u < 0]
    assert len(groups) == 20 and set(groups) == {0, 1}
    pairs = {(s, u) for s, u in plan if u >= 0}
    assert pairs == {(s, u) for s in range(2) for u in range(5)}  # every sender to every user
    assert all(u >= 0 for _, u in plan_messages(3, 1, 10, 0))
    assert all(u < 0 for _, u in plan_messages(3, 1, 10, 1))


def _device(user: int, got: list[int], pending: int, name: str = "d0") -> dict[str, Any]:
    import array

    return {
        "user_id": user,
        "device": name,
        "named": name,
        "pending": pending,
        "received": array.array("Q", got).tobytes(),
        "done_ns": 1,
    }


def test_sync_checker_counts_every_kind_of_failure() -> None:
    expected = {1: [10, 11, 12], 2: [11, 13]}
    good = check_devices(expected, [_device(1, [10, 11, 12], 3), _device(1, [10, 11, 12], 3, "d1")])
    assert (good.devices, good.caught_up, good.deliveries, good.lost) == (2, 2, 6, 0)
    assert not good.examples
    # A device that misses one message: lost, and not caught up.
    c = check_devices(expected, [_device(1, [10, 12], 3), _device(2, [11, 13], 2)])
    assert (c.lost, c.caught_up, c.deliveries) == (1, 1, 4)
    assert "missing 1 of 3 message(s), the first msg_id 11" in c.examples[0]
    c = check_devices(expected, [_device(1, [10, 11, 11, 12], 3)])
    assert (c.duplicated, c.lost) == (1, 0)
    c = check_devices(expected, [_device(1, [10, 12, 11], 3)])
    assert (c.reordered, c.lost) == (1, 0)
    c = check_devices(expected, [_device(2, [11, 12, 13], 2)])  # 12 is user 1's
    assert (c.unexpected, c.lost) == (1, 0)
    c = check_devices(expected, [_device(1, [10, 11, 12], 5)])
    assert c.pending_wrong == 1 and "told pending 5, missed 3" in c.examples[0]
    rec = _device(1, [10, 11, 12], 3)
    rec["named"] = "other"
    assert check_devices(expected, [rec]).device_wrong == 1
    c = check_devices(expected, [_device(2, [], -1)])  # never logged in
    assert (c.not_logged_in, c.lost, c.caught_up) == (1, 2, 0)


def test_password_logins_work_too() -> None:
    r = run_bench(BenchConfig("connect", connections=3, procs=1, login="password"))
    assert r.ok, r.problems
    assert r.extra["logins"] == 3


# -- a server that drops a message ----------------------------------------------------------

DROPPING_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from bitchat.app import build_server
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

    async def main(data_dir):
        settings = Settings(host="127.0.0.1", port=0, data_dir=data_dir, rate_limit=0,
                            password_hash_time_cost=1, password_hash_memory_kib=1024)
        server = build_server(settings)
        server.data["im"].connections = DroppingCenter()
        # The server would push the lost one again once a later one is acked: not here.
        server.data["im"]._resync_gap = lambda session: None
        await server.start()
        print(server.address[1], flush=True)  # the test waits for this line
        await server.serve_forever()

    asyncio.run(main(sys.argv[1]))
    """
)


def test_a_lost_message_fails_loudly(tmp_path: Path) -> None:
    script = tmp_path / "dropping_server.py"
    script.write_text(DROPPING_SERVER)
    server = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "d")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        # Wait for the port line (or EOF if the server dies), not by polling.
        ready, _, _ = select.select([server.stdout], [], [], WAIT)
        assert ready, "the dropping server did not start"
        port = server.stdout.readline().strip()
        assert port.isdigit(), "the dropping server died"
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


def test_a_message_pushed_again_is_dropped_by_msg_id_not_a_duplicate() -> None:
    from bitchat.im.packets import ChatMessage
    from bitchat.protocol.frame import encode_frame
    from bitchat.protocol.serializers import SERIALIZERS

    conn = _receiver()
    conn.lost = True  # no socket: the acks it would write stay queued
    run = conn.w.run_id

    def push(msg_id: int, seq: int) -> bytes:
        body = {"msg_id": msg_id, "sender_id": 7, "text": f"{seq} 0 {run} x"}
        return encode_frame(1, 0, ChatMessage.TYPE, 0, SERIALIZERS[1].dumps(body))

    # A re-sync pushes 11 and 12 again (same msg_ids): the client drops them.
    conn.data_received(push(11, 1) + push(12, 2) + push(11, 1) + push(12, 2))
    assert conn.w.redelivered == 2 and conn.rx[7][2] == 0
    # The same message stored twice (another msg_id, same seq) is a duplicate.
    conn.data_received(push(13, 2))
    assert conn.w.redelivered == 2 and conn.rx[7][2] == 1
    assert conn.w.delivered == 2


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
    for config in (
        BenchConfig("p2p", users=3),
        BenchConfig("nope"),
        BenchConfig(window=-1),
        BenchConfig("sync", devices=33),
        BenchConfig("sync", group_share=1.5),
        BenchConfig("sync", messages=0),
        BenchConfig("sync", timeout=0),
        BenchConfig("connect", login="token", password_logins=5),
        BenchConfig("p2p", login="both"),
    ):
        with pytest.raises(UsageError):
            config.resolved()


@pytest.mark.parametrize(
    "arg", ["--port", "--port=9000", "--host", "--host=0.0.0.0", "--po", "--hos=::"]
)
def test_the_server_address_is_the_benchs_to_pick(arg: str) -> None:
    with pytest.raises(UsageError, match="picks the self-started server's --host and --port"):
        BenchConfig(server_args=[arg]).resolved()


def test_server_args_naming_the_address_are_a_usage_error() -> None:
    BenchConfig(server_args=["--workers=2", "--max-message-length", "100"]).resolved()
    for args in (["--server-arg=--port=9000"], ["--server-arg=--host", "--server-arg=::1"]):
        done = _bench("p2p", *args)
        assert done.returncode == 2, done.stderr
        said = " ".join(done.stderr.split())  # as wrapped to the terminal's width
        assert said.startswith(f"bitchat bench: --server-arg {args[0].split('=', 1)[1]}: ")
        assert "picks the self-started server's --host and --port" in said
        assert done.stdout == ""


def _result(scenario: str, **config: Any) -> BenchResult:
    """A made-up result of ``scenario`` with figures as large as real runs give."""
    cfg = {
        "users": 200,
        "members": 100,
        "senders": 10,
        "window": 32,
        "payload": 100,
        "procs": 2,
        "connections": 5000,
        "login": "token",
        "duration": 10.0,
        **config,
    }
    unit = {"p2p": "messages", "group": "deliveries", "sync": "deliveries"}.get(scenario, "logins")
    r = BenchResult(
        scenario,
        cfg,
        {"nproc": 2, "loadavg_at_start": [1.3, 1.2, 1.1]},
        {"self_started": True, "pid": 4242},
        unit,
        delivered=257_792,
        delivered_per_s=25_139.2,
        duration_s=10.0,
        server_cpu_s=8.1,
        server_cpu_us_per_msg=31.4,
        server_rss_kib=92_000,
        server_rss_peak_kib=93_000,
        client_cpu_s=5.2,
        latency_ms=percentiles_ms([200_000, 250_000, 1_699_000, 1_730_000]),
        timeline=[1, 2],
        latencies_us=[200_000, 250_000, 1_699_000, 1_730_000],
    )
    if scenario in ("p2p", "group"):
        r.extra.update(delivered_in_window=251_392, delivered_after_window=6_400)
    elif scenario == "sync":
        r.config.update(users=1000, devices=32, messages=100_000, group_share=0.2)
        r.extra.update(devices=32_000, devices_caught_up=32_000, messages_sent=100_000)
    else:
        r.extra.update(login_failures=0)
    if scenario == "idle":
        r.extra.update(rss_kib_per_conn=5.9, idle_cpu_pct=2.3)
    return r


def _render(r: BenchResult) -> str:
    out = io.StringIO()
    print_report(r, Console(file=out, width=80, force_terminal=False, color_system=None))
    return out.getvalue()


@pytest.mark.parametrize("scenario", ["p2p", "group", "connect", "idle", "sync"])
def test_report_fits_80_columns_without_empty_rows(scenario: str) -> None:
    text = _render(_result(scenario))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].startswith(f"bitchat bench {scenario}: ")  # the heading is not wrapped
    assert lines[1].startswith("self-started server (pid 4242); 2 load processes, 2 cores")
    rows = [line.split("│") for line in lines if "│" in line]
    assert rows, text
    for cells in rows:
        # Every row has its label and its value: nothing wrapped onto a second line.
        assert cells[0].strip() and cells[1].strip() not in ("", "-"), text
    assert "server CPU / load generators' CPU (s)" in text
    assert text.count("ok") >= 2  # the correctness checks
    assert EXIT_STATUS_NOTE.split("\n")[0] in text


def test_report_labels_delivered_counts() -> None:
    text = _render(_result("p2p"))
    assert "messages delivered in the 10 s of sending" in text and "251,392" in text
    assert "messages delivered in all, drain included" in text and "257,792" in text
    assert "250.0 / 1,730.0" in text  # p50 / p90 in ms, with the same decimals


def test_a_missed_target_is_reported_but_not_a_failure() -> None:
    r = _result("p2p")  # 31.4 µs per message: the < 15 µs target is missed
    assert r.ok
    text = _render(r)
    assert "target (informational)" in text and "measured" in text
    assert "missed" in text and "MISSED" not in text
    assert "every check passed" in text and "(exit status 0)" in text
    # A run without --server-pid has no server figures: a note, not a failure, no empty rows.
    r.server_cpu_s = r.server_cpu_us_per_msg = r.server_rss_kib = None
    r.notes.append("no --server-pid: the server's CPU and memory are not known")
    assert r.ok
    text = _render(r)
    assert "server CPU" not in text and "server RSS" not in text
    assert targets_table(r) is None  # nothing measured to compare with
    assert "note: no --server-pid" in text


def test_a_failed_check_is_a_failure() -> None:
    r = _result("p2p", window=1)
    r.lost = 1
    r.problems.append("LOST: 1 acked message(s) never arrived")
    assert not r.ok
    text = _render(r)
    assert "FAIL" in text and "a check failed (exit status 1)" in text
    assert "p99 latency, --window 1 (ms)" in text  # the window-1 target applies


def test_help_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitchat.cli import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = sub.choices["bench"]
    text = bench.format_help()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "(default:" not in text  # no ArgumentDefaultsHelpFormatter duplicates
    for action in bench._actions:
        assert action.help, action.option_strings  # every option says what it does
        assert action.help.count("(default") <= 1, action.help
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.dest != "help":
            assert "default" in action.help, action.option_strings
    assert "exit status:" in text and "never an error" in text
    for command in ("bitchat bench p2p", "bitchat bench group", "bitchat bench sync", "--json"):
        assert command in text


def test_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    r = _result("p2p", users=2, window=1, procs=1)
    table: Any = summary_table(r)
    assert table.row_count > 5
    png = tmp_path / "plot.png"
    write_plot(r, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- a cluster: nodes on PostgreSQL and Redis ---------------------------------------------------


def _services() -> tuple[str, str]:
    """The test PostgreSQL and Redis (as the cluster tests use them), or skip."""
    import asyncio

    import asyncpg
    import redis.asyncio as aioredis

    from cluster_support import PG_URL, REDIS_URL, unavailable

    async def check() -> str | None:
        try:
            con = await asyncpg.connect(PG_URL, timeout=3)
            await con.close()
        except Exception as exc:
            return f"PostgreSQL at {PG_URL} is unreachable ({exc}); set BITCHAT_TEST_PG"
        client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
        try:
            await client.ping()
        except Exception as exc:
            return f"Redis at {REDIS_URL} is unreachable ({exc}); set BITCHAT_TEST_REDIS"
        finally:
            await client.aclose()
        return None

    reason = asyncio.run(check())
    if reason:
        unavailable(reason)
    return PG_URL, REDIS_URL


def _leftovers(pg: str, redis_url: str, database: str, prefix: str) -> tuple[bool, int]:
    """Whether ``database`` still exists, and how many keys ``prefix`` still has."""
    import asyncio

    import asyncpg
    import redis.asyncio as aioredis

    async def look() -> tuple[bool, int]:
        con = await asyncpg.connect(pg, timeout=5)
        try:
            found = await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        finally:
            await con.close()
        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        finally:
            await client.aclose()
        return found is not None, len(keys)

    return asyncio.run(look())


def test_p2p_on_a_two_node_cluster(tmp_path: Path) -> None:
    pg, redis_url = _services()
    out = tmp_path / "cluster.json"
    done = _bench(
        "p2p",
        "--cluster",
        "2",
        "--pg",
        pg,
        "--redis",
        redis_url,
        "--users",
        "6",
        "--window",
        "4",
        "--duration",
        "1",
        "--procs",
        "1",
        "--json",
        str(out),
        timeout=2 * WAIT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert max(len(line) for line in done.stdout.splitlines()) <= 80, done.stdout
    lines = done.stdout.splitlines()
    assert lines[1].startswith("2 nodes (pids ") and lines[1].endswith("on different nodes")
    assert re.fullmatch(r"router \(pid \d+\) started, answered nodes \[(1, 2|2, 1)\]", lines[2])
    assert lines[3].startswith("database bitchat_bench_")  # nothing wrapped
    assert lines[4].startswith("1 load processes, ")
    assert "no message lost, duplicated or reordered (exit status 0)" in done.stdout
    assert "CPU per message, every process (µs)" in done.stdout
    assert "messages/s across the nodes" in done.stdout  # the cluster's targets
    assert "server CPU per message (µs)" not in done.stdout  # not the standalone one
    assert "…" not in done.stdout  # no column cut short
    data = json.loads(out.read_text())
    assert data.keys() >= REQUIRED | {"processes", "cpu_by_role", "cluster_cpu_us_per_msg"}
    server = data["server"]
    assert server["cluster"] == 2 and [n["node_id"] for n in server["nodes"]] == [1, 2]
    assert sorted(server["router"]["answered"]) == [1, 2]  # started, and it answered
    # Every pair is split over the two nodes, so every message crossed nodes.
    assert data["pairs_across_nodes"] == 3
    assert data["placement_checked"] is True  # Redis's online:{node} hashes agree
    assert data["users_per_node"] == {"1": 3, "2": 3}
    # Every message was checked: all acked ones arrived, once each, in order.
    assert data["delivered"] > 0 and data["delivered"] == data["messages_acked"]
    assert (data["lost"], data["duplicated"], data["reordered"]) == (0, 0, 0)
    assert data["send_errors"] == 0 and data["messages_unacked"] == 0 and data["ok"]
    assert data["redelivered"] >= 0  # a re-sync's pushes of a msg_id again: reported
    procs = data["processes"]
    assert [p["name"] for p in procs if p["role"] == "node"] == ["node 1", "node 2"]
    assert {p["pid"] for p in procs if p["role"] == "node"} == {n["pid"] for n in server["nodes"]}
    backends = [p for p in procs if p["role"] == "postgres backend"]
    assert {p["group"] for p in backends} == {
        "PostgreSQL backends, node 1",
        "PostgreSQL backends, node 2",
    }
    assert any(p["role"] == "redis" for p in procs) == (server["redis_pid"] is not None)
    for p in procs:
        assert p["cpu_s"] >= 0 and p["cpu_us_per_msg"] is not None
    # The per-role figures and the total are the processes' sums.
    total = sum(p["cpu_s"] for p in procs)
    assert abs(data["cluster_cpu_s"] - total) < 0.01
    assert data["server_cpu_us_per_msg"] == data["cluster_cpu_us_per_msg"] > 0
    nodes = data["cpu_by_role"]["node"]
    assert nodes["cpu_s"] > 0 and nodes["cpu_us_per_msg"] > 0
    assert data["standalone_cpu_us_per_msg"] == 15.0
    assert data["cpu_vs_standalone"] == round(data["cluster_cpu_us_per_msg"] / 15.0, 2)
    # Nothing is left behind: the run's database is dropped, its keys deleted.
    assert _leftovers(pg, redis_url, server["database"], server["redis_prefix"]) == (False, 0)


def test_cluster_refuses_unreachable_services(tmp_path: Path) -> None:
    from cluster_support import free_port

    closed = free_port()  # nothing listens there
    done = _bench("p2p", "--cluster", "2", "--pg", f"postgresql://postgres@127.0.0.1:{closed}/x")
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join(done.stderr.split())
    assert "--cluster needs PostgreSQL: cannot connect to postgresql://postgres@127.0.0.1" in said
    assert "--pg URL or BITCHAT_BENCH_PG" in said
    pg, _ = _services()
    done = _bench("p2p", "--cluster", "2", "--pg", pg, "--redis", f"redis://127.0.0.1:{closed}/0")
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join(done.stderr.split())
    assert f"--cluster needs Redis: cannot reach redis://127.0.0.1:{closed}/0" in said
    assert "--redis URL or BITCHAT_BENCH_REDIS" in said


def test_cluster_configs_are_checked(tmp_path: Path) -> None:
    for config, says in (
        (BenchConfig("p2p", cluster=1), "at least 2 nodes"),
        (BenchConfig("group", cluster=2), "p2p scenario only"),
        (BenchConfig("p2p", cluster=2, target="127.0.0.1:1"), "not with --target"),
        (BenchConfig("p2p", pg="postgresql://x"), "go with --cluster"),
        (BenchConfig("p2p", cluster=2, baseline=str(tmp_path / "none.json")), "--baseline"),
    ):
        with pytest.raises(UsageError, match=says):
            config.resolved()
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps({"scenario": "p2p", "server_cpu_us_per_msg": 30.5, "server": {}}))
    BenchConfig("p2p", cluster=2, baseline=str(alone)).resolved()
    grouped = tmp_path / "group.json"
    grouped.write_text(json.dumps({"scenario": "group", "server_cpu_us_per_msg": 3.0}))
    with pytest.raises(UsageError, match="standalone bench p2p"):
        BenchConfig("p2p", cluster=2, baseline=str(grouped)).resolved()
