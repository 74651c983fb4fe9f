"""The bench process: starts or finds the server, drives the load generators, measures.

:func:`run_bench` runs one scenario and returns its :class:`BenchResult`:

- ``p2p``: users in pairs, each sending to its partner with a window of
  unanswered messages; every message is checked at its receiver.
- ``group``: one group; some members post, every other member receives.
- ``connect``: clients connect and log in as fast as they can.
- ``idle``: logged-in connections that only heartbeat: memory per connection.
- ``sync``: users with several devices miss messages while offline, then every
  device comes back at once and catches up (:mod:`bitchat.bench.sync`).

The server's CPU (user + system, all threads) and memory are read from
``/proc/<pid>`` before and after the measured phase; nothing is estimated.
"""

from __future__ import annotations

import array
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import platform
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from bitchat.bench.cluster import ClusterHandle
from bitchat.bench.loadgen import WorkerPlan, worker_main
from bitchat.bench.procstat import ProcSample, raise_nofile_limit, read_proc
from bitchat.bench.serverproc import (
    ServerHandle,
    UserSpec,
    parse_target,
    seed_users,
    start_server,
    wait_listening,
)
from bitchat.bench.stats import percentiles_ms
from bitchat.errors import UsageError
from bitchat.protocol.serializers import get as get_serializer

SCENARIOS = ("p2p", "group", "connect", "idle", "sync")
STANDALONE_CPU_US = 15.0
"""The standalone p2p target for server CPU per message: --cluster compares with it
unless --baseline names a measured standalone run."""
PASSWORD = "bench-password"
BIN_S = 0.1

Progress = Callable[[str, float, float | None, str], None]
"""``progress(phase, done, total, note)``: called as each phase advances."""


def _nothing() -> None:
    pass


def _quiet(phase: str, done: float, total: float | None, note: str = "") -> None:
    pass


@dataclass
class BenchConfig:
    """One bench run; every field has a command-line option of the same name."""

    scenario: str = "p2p"
    users: int = 0
    """p2p: users, in pairs (0: 200); sync: users whose devices catch up (0: 50)."""
    members: int = 100
    """group: members of the one group."""
    senders: int = 10
    """group: members that post; sync: the users (others) who send the missed messages."""
    devices: int = 2
    """sync: devices per user."""
    messages: int = 5000
    """sync: messages sent in all while the devices are offline."""
    group_share: float = 0.2
    """sync: the share of ``messages`` that go to groups (0 to 1)."""
    timeout: float = 60.0
    """sync: the longest wait for the sending, and then for the catch-up."""
    connections: int = 0
    """connect / idle: connections to open (0: 1,000 for connect, 5,000 for idle)."""
    window: int = 0
    """Unanswered messages a sender may have in flight (0: 32 for p2p, 16 for group)."""
    payload: int = 100
    """Bytes of text per message."""
    duration: float = 10.0
    """Seconds of sending (p2p, group) or of holding the connections (idle)."""
    procs: int = 2
    """Load-generator processes."""
    serializer: str = "json"
    login: str = ""
    """How the measured logins log in: "token" (a reconnect), "password" (argon2), or
    "both" (connect: token logins, then password logins, each measured apart); ""
    means both for connect, token for the others."""
    password_logins: int = 0
    """connect with both kinds: how many password logins (0: a fifth of ``connections``)."""
    target: str | None = None
    """HOST:PORT of a running server; None starts one."""
    server_pid: int | None = None
    data_dir: str | None = None
    """Folder for the self-started server's database (default: a new temporary one)."""
    keep: bool = False
    """Keep the self-started server's folder (database and log) afterwards."""
    uvloop: bool = True
    drain_timeout: float = 5.0
    """After sending stops: the longest wait for acks, then for deliveries."""
    concurrency: int = 64
    """Connections each load generator opens at once."""
    server_args: list[str] = field(default_factory=list)
    """More options for the self-started ``bitchat server``."""
    profile: str | None = None
    """Record the self-started server with py-spy into this file (speedscope JSON)."""
    cluster: int = 0
    """p2p: start this many PostgreSQL-backed nodes and a router instead (0: standalone)."""
    pg: str | None = None
    """--cluster: the PostgreSQL server (an admin URL; default BITCHAT_BENCH_PG or local)."""
    redis: str | None = None
    """--cluster: the Redis server (default BITCHAT_BENCH_REDIS or local)."""
    baseline: str | None = None
    """--cluster: a standalone p2p result (--json) whose CPU per message the run compares to."""

    def resolved(self) -> BenchConfig:
        c = BenchConfig(**asdict(self))
        if c.scenario not in SCENARIOS:
            raise UsageError(f"unknown scenario {c.scenario!r}; choose from {SCENARIOS}")
        if not c.connections:
            c.connections = 5000 if c.scenario == "idle" else 1000
        if not c.window:
            c.window = 16 if c.scenario == "group" else 32
        if not c.users:
            c.users = 50 if c.scenario == "sync" else 200
        if c.scenario == "p2p" and (c.users < 2 or c.users % 2):
            raise UsageError("p2p needs an even number of users, at least 2")
        if c.scenario == "group":
            if c.members < 2:
                raise UsageError("a group needs at least 2 members")
            c.senders = max(1, min(c.senders, c.members))
        if c.scenario == "sync":
            if c.users < 1 or c.senders < 1 or c.messages < 1:
                raise UsageError("sync needs at least 1 user, 1 sender and 1 message")
            if not 1 <= c.devices <= 32:
                raise UsageError("--devices is 1 to 32 (the server's max_devices_per_user)")
            if not 0 <= c.group_share <= 1:
                raise UsageError("--group-share is between 0 and 1")
            if c.timeout <= 0:
                raise UsageError("--timeout must be positive")
        if c.cluster:
            if c.cluster < 2:
                raise UsageError("--cluster N needs at least 2 nodes")
            if c.scenario != "p2p":
                raise UsageError("--cluster runs the p2p scenario only")
            if c.target or c.profile:
                raise UsageError("--cluster starts its own nodes: not with --target or --profile")
            if c.cluster > 1023:
                raise UsageError("--cluster: node ids go up to 1023")
            if c.baseline:
                _baseline(c.baseline)  # refused now rather than after the run
        elif c.pg or c.redis or c.baseline:
            raise UsageError("--pg, --redis and --baseline go with --cluster N")
        if not c.login:
            c.login = "both" if c.scenario == "connect" else "token"
        if c.login not in ("token", "password", "both"):
            raise UsageError("--login is token or password")
        if c.login == "both":
            if c.scenario != "connect":
                raise UsageError("only connect measures both kinds of login in one run")
            if not c.password_logins:
                c.password_logins = max(1, c.connections // 5)
        elif c.password_logins:
            raise UsageError("--password-logins goes with connect measuring both kinds")
        if c.password_logins < 0:
            raise UsageError("--password-logins must be positive")
        if c.window < 1 or c.payload < 1 or c.duration <= 0 or c.procs < 1:
            raise UsageError("window, payload, duration and procs must be positive")
        for arg in c.server_args:
            if _names_the_address(arg):
                raise UsageError(
                    f"--server-arg {arg}: the bench picks the self-started server's "
                    "--host and --port (a free loopback port); use --target for a server "
                    "of your own"
                )
        get_serializer(c.serializer)
        return c


def _names_the_address(arg: str) -> bool:
    """Whether a ``bitchat server`` option sets its host or port: ``--port``,
    ``--port=1``, or a prefix argparse takes for one (``--po``)."""
    name = arg.split("=", 1)[0]
    return len(name) >= 4 and any(full.startswith(name) for full in ("--host", "--port"))


@dataclass
class BenchResult:
    """What a run measured; ``to_json()`` is what ``--json`` writes."""

    scenario: str
    config: dict[str, Any]
    machine: dict[str, Any]
    server: dict[str, Any]
    unit: str
    delivered: int = 0
    delivered_per_s: float = 0.0
    duration_s: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    send_errors: int = 0
    disconnects: int = 0
    server_cpu_s: float | None = None
    server_cpu_us_per_msg: float | None = None
    server_rss_kib: int | None = None
    server_rss_peak_kib: int | None = None
    client_cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Correctness failures (lost, duplicated, reordered, refused, dropped): any fails the run."""
    notes: list[str] = field(default_factory=list)
    """Warnings that do not fail the run (e.g. no --server-pid, so no server figures)."""
    timeline: list[int] = field(default_factory=list)
    latencies_us: list[int] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """No correctness failure; missed performance targets never make a run fail."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("latencies_us", "extra")}
        out.update(self.extra)
        out["ok"] = self.ok
        out["timeline_bin_s"] = BIN_S
        return out


def machine_info(use_uvloop: bool) -> dict[str, Any]:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        version = getattr(uvloop, "__version__", "?")
        uv = version if use_uvloop else f"off ({version} installed)"
    except ImportError:  # pragma: no cover
        uv = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "uvloop": uv,
        "kernel": platform.release(),
        # Other work on the machine skews every figure: say how busy it was.
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- the worker processes ---------------------------------------------------------------------


class Workers:
    """The load-generator processes and their pipes."""

    def __init__(self, plans: list[WorkerPlan]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        for plan in plans:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(plan, theirs),
                daemon=True,
                name=f"bitchat-bench-{plan.index}",
            )
            proc.start()
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(proc)
        self.progress = [0.0] * len(plans)

    def send(self, i: int, *msg: Any) -> None:
        self.pipes[i].send(msg)

    def broadcast(self, *msg: Any) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(msg)

    def gather(
        self, kind: str, timeout: float, on_progress: Callable[[], None], alive: Callable[[], bool]
    ) -> list[Any]:
        """Wait for every worker's ``kind`` message; ``progress`` notes update as they come."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.pipes):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"load generators did not report {kind!r} within {timeout:.0f}s")
            if not alive():
                raise RuntimeError("the server exited during the run")
            ready = multiprocessing.connection.wait(
                [p for i, p in enumerate(self.pipes) if i not in got], min(left, 0.25)
            )
            for item in ready:
                i = self.pipes.index(item)  # type: ignore[arg-type]
                try:
                    msg = self.pipes[i].recv()
                except EOFError:
                    raise RuntimeError(f"load generator {i} died") from None
                if msg[0] == "progress":
                    self.progress[i] = msg[1]
                elif msg[0] == "error":
                    raise RuntimeError(f"load generator {i} failed:\n{msg[1]}")
                elif msg[0] == kind:
                    got[i] = msg[1]
                else:
                    raise RuntimeError(f"load generator {i} sent {msg[0]!r}, not {kind!r}")
            on_progress()
        return [got[i] for i in range(len(self.pipes))]

    def stop(self) -> None:
        self.broadcast("close")
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


# -- running ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _server(cfg: BenchConfig, users: list[UserSpec], progress: Progress) -> Iterator[ServerHandle]:
    if cfg.cluster:
        from bitchat.bench.cluster import start_cluster

        with start_cluster(
            nodes=cfg.cluster,
            users=users,
            password=PASSWORD,
            pg=cfg.pg,
            redis=cfg.redis,
            data_dir=cfg.data_dir,
            keep=cfg.keep,
            use_uvloop=cfg.uvloop,
            extra_args=cfg.server_args,
            progress=progress,
        ) as cluster:
            yield cluster
        return
    if cfg.target:
        host, port = parse_target(cfg.target)
        running = ServerHandle(host, port, cfg.server_pid, False)
        wait_listening(running, 10)
        yield running
        return
    folder = cfg.data_dir or tempfile.mkdtemp(prefix="bitchat-bench-")
    os.makedirs(folder, exist_ok=True)
    handle: ServerHandle | None = None
    try:
        progress("seed users", 0, len(users), "")
        seed_users(os.path.join(folder, "bitchat.db"), users, PASSWORD)
        progress("seed users", len(users), len(users), "")
        progress("start server", 0, 1, "")
        wrap: list[str] = []
        if cfg.profile:
            py_spy = shutil.which("py-spy")
            if py_spy is None:
                raise UsageError("--profile needs py-spy (pip install py-spy)")
            # Collapsed stacks (text: grep, flame graphs) or speedscope JSON.
            fmt = "raw" if cfg.profile.endswith((".txt", ".folded")) else "speedscope"
            wrap = [
                py_spy,
                "record",
                "--format",
                fmt,
                "--rate",
                "250",
                "--threads",
                "--output",
                cfg.profile,
                "--",
            ]
        handle = start_server(folder, use_uvloop=cfg.uvloop, extra_args=cfg.server_args, wrap=wrap)
        progress("start server", 1, 1, f"pid {handle.pid}, port {handle.port}")
        yield handle
    finally:
        if handle is not None:
            if cfg.profile and handle.proc is not None and handle.pid != handle.proc.pid:
                # Stop the server itself so py-spy writes its profile and exits.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid or 0, 15)
                with contextlib.suppress(Exception):
                    handle.proc.wait(30)
            handle.stop()
        if not cfg.keep and not cfg.data_dir:
            shutil.rmtree(folder, ignore_errors=True)


def _make_users(cfg: BenchConfig, n: int, run_id: str) -> list[UserSpec]:
    prefix = f"b{run_id}_" if cfg.target else "u"
    return [UserSpec(i, f"{prefix}{i}", PASSWORD) for i in range(n)]


def _split(items: list[UserSpec], n: int, key: Callable[[UserSpec], int]) -> list[list[UserSpec]]:
    parts: list[list[UserSpec]] = [[] for _ in range(n)]
    for u in items:
        parts[key(u) % n].append(u)
    return parts


def _sample(handle: ServerHandle) -> ProcSample | None:
    return read_proc(handle.pid) if handle.pid else None


def run_bench(config: BenchConfig, progress: Progress = _quiet) -> BenchResult:
    """Run one scenario end to end and return what it measured."""
    cfg = config.resolved()
    run_id = secrets.token_hex(3)
    n_users = {"p2p": cfg.users, "group": cfg.members, "sync": cfg.users + cfg.senders}.get(
        cfg.scenario
    )
    if n_users is None:
        warm = min(50, max(1, cfg.connections // 20))
        n_users = cfg.connections + warm + (cfg.password_logins if cfg.login == "both" else 0)
    else:
        warm = 0
    # Every connection is a file on both ends; the self-started server inherits this.
    conns = n_users * cfg.devices if cfg.scenario == "sync" else n_users
    raise_nofile_limit(2 * conns + 1024)
    users = _make_users(cfg, n_users, run_id)
    result = BenchResult(
        scenario=cfg.scenario,
        config=asdict(cfg),
        machine=machine_info(cfg.uvloop),
        server={},
        unit={
            "p2p": "messages",
            "group": "deliveries",
            "connect": "logins",
            "idle": "connections",
            "sync": "deliveries",
        }[cfg.scenario],
    )
    if cfg.cluster:
        from bitchat.bench.cluster import safe_url

        for key in ("pg", "redis"):  # a URL's password stays out of the report
            if cfg_url := result.config.get(key):
                result.config[key] = safe_url(cfg_url)
    with _server(cfg, users, progress) as handle:
        result.server = {
            "self_started": handle.self_started,
            "pid": handle.pid,
            "address": f"{handle.host}:{handle.port}",
            "argv": handle.argv,
            "data_dir": handle.data_dir,
        }
        if isinstance(handle, ClusterHandle):
            result.server = handle.describe()
            result.notes.extend(handle.notes)
            node_of = {n.port: i + 1 for i, n in enumerate(handle.nodes)}
            per_node = {i + 1: 0 for i in range(len(handle.nodes))}
            for u in users:
                per_node[node_of[u.port]] += 1
            result.extra["users_per_node"] = per_node
            result.extra["pairs_across_nodes"] = sum(
                users[i].port != users[i + 1].port for i in range(0, len(users) - 1, 2)
            )
        elif handle.pid is None:
            result.notes.append("no --server-pid: the server's CPU and memory are not known")
        if cfg.scenario in ("p2p", "group"):
            _run_messages(cfg, handle, users, run_id, result, progress)
        elif cfg.scenario == "sync":
            from bitchat.bench.sync import run_sync  # it builds on this module

            run_sync(cfg, handle, users, run_id, result, progress)
        elif cfg.login == "both":
            _run_both_logins(cfg, handle, users, warm, run_id, result, progress)
        else:
            _run_connect(cfg, handle, users, warm, run_id, result, progress, cfg.login)
    return result


def _plan(
    cfg: BenchConfig,
    index: int,
    handle: ServerHandle,
    users: list[UserSpec],
    run_id: str,
    **kw: Any,
) -> WorkerPlan:
    kw.setdefault("login", cfg.login)
    return WorkerPlan(
        index=index,
        scenario=cfg.scenario,
        host=handle.host,
        port=handle.port,
        users=users,
        serializer=get_serializer(cfg.serializer).id,
        window=cfg.window,
        payload=cfg.payload,
        run_id=run_id,
        concurrency=cfg.concurrency,
        bin_ns=int(BIN_S * 1e9),
        **kw,
    )


def _create_group(handle: ServerHandle, owner: UserSpec) -> int:
    import asyncio

    from bitchat.im.client import IMClient

    async def create() -> int:
        async with IMClient(handle.host, handle.port, reconnect=False) as im:
            if owner.token:
                await im.login(token=owner.token)
            else:
                await im.login(owner.name, owner.password)
            info = await im.create_group(f"bench-{uuid.uuid4().hex[:8]}")
            return int(info.group_id)

    return asyncio.run(create())


def _run_messages(
    cfg: BenchConfig,
    handle: ServerHandle,
    users: list[UserSpec],
    run_id: str,
    result: BenchResult,
    progress: Progress,
) -> None:
    procs = min(cfg.procs, len(users) // 2 if cfg.scenario == "p2p" else len(users))
    group_id = 0
    if cfg.scenario == "group":
        group_id = _create_group(handle, users[0])
        parts = _split(users, procs, lambda u: u.index)
    else:
        parts = _split(users, procs, lambda u: u.index // 2)  # a pair shares a process
    plans = [_plan(cfg, i, handle, p, run_id, group_id=group_id) for i, p in enumerate(parts)]
    workers = Workers(plans)
    try:
        setup_timeout = 60 + len(users) * (0.1 if cfg.login == "token" and not cfg.target else 0.5)
        ready = workers.gather(
            "ready",
            setup_timeout,
            lambda: progress("log in", sum(workers.progress), len(users), ""),
            handle.alive,
        )
        ids: dict[int, int] = {}
        for r in ready:
            ids.update(r)
        progress("log in", len(users), len(users), "")
        if isinstance(handle, ClusterHandle):
            # Partners apart, as the cluster itself sees it: every message crosses nodes.
            wrong = handle.misplaced(users)
            result.extra["placement_checked"] = not wrong
            if wrong:
                result.problems.append(
                    f"PLACEMENT: {len(wrong)} user(s) not online on their node alone in "
                    f"Redis, e.g. {wrong[0].name}"
                )
        if cfg.scenario == "p2p":
            senders = {i: ids[i ^ 1] for i in range(len(users))}
            expect_from = {ids[i]: [ids[i ^ 1]] for i in range(len(users))}
        else:
            senders = {i: group_id for i in range(cfg.senders)}
            sender_ids = [ids[i] for i in range(cfg.senders)]
            expect_from = {
                ids[i]: [s for s in sender_ids if s != ids[i]] for i in range(len(users))
            }
        t0 = time.monotonic_ns() + 300_000_000
        deadline = t0 + int(cfg.duration * 1e9)
        workers.broadcast(
            "go", {"t0": t0, "deadline": deadline, "senders": senders, "drain": cfg.drain_timeout}
        )
        time.sleep(max(0, t0 - time.monotonic_ns()) / 1e9)
        before = _sample(handle)
        cluster_before = handle.sample() if isinstance(handle, ClusterHandle) else None

        delivered = "messages delivered" if cfg.scenario == "p2p" else "deliveries"

        def show() -> None:
            elapsed = min(cfg.duration, (time.monotonic_ns() - t0) / 1e9)
            done = sum(workers.progress)
            rate = done / elapsed if elapsed > 0 else 0.0
            progress(
                "measure",
                elapsed,
                cfg.duration,
                f"{done:,.0f} {delivered}, {rate:,.0f}/s",
            )

        sent = workers.gather("sent", cfg.duration + cfg.drain_timeout + 30, show, handle.alive)
        acked: dict[int, Any] = {}
        for s in sent:
            acked.update(s)
        for i, part in enumerate(parts):
            workers.send(
                i,
                "expect",
                {"acked": acked, "from": {ids[u.index]: expect_from[ids[u.index]] for u in part}},
            )
        results = workers.gather(
            "result",
            cfg.drain_timeout + 60,
            lambda: progress("drain", 1, 1, f"{sum(workers.progress):,.0f} {delivered} in all"),
            handle.alive,
        )
        total = sum(r["delivered"] for r in results)
        progress("drain", 1, 1, f"{total:,} {delivered} in all")
        after = _sample(handle)
        cluster_after = handle.sample() if isinstance(handle, ClusterHandle) else None
    finally:
        workers.stop()
    duration = (deadline - t0) / 1e9
    latencies: array.array[int] = array.array("Q")
    timeline: list[int] = []
    for r in results:
        latencies.frombytes(r["latencies_us"])
        bins = r["bins"]
        if len(timeline) < len(bins):
            timeline.extend([0] * (len(bins) - len(timeline)))
        for i, v in enumerate(bins):
            timeline[i] += v
        result.lost += r["lost"]
        result.duplicated += r["duplicated"]
        result.reordered += r["reordered"]
        result.disconnects += r["disconnects"]
        result.client_cpu_s += r["cpu_s"]
        for example in r["lost_examples"]:
            if len(result.problems) < 10:
                result.problems.append(f"LOST: {example}")
    while timeline and not timeline[-1]:
        timeline.pop()
    result.timeline = timeline
    result.delivered = sum(r["delivered"] for r in results)
    # What arrived by the end of sending (the "measure" bar's last count, and the rate's
    # numerator), and what arrived while the bench drained what was still in flight.
    in_window = sum(r["in_window"] for r in results)
    result.extra["delivered_in_window"] = in_window
    result.extra["delivered_after_window"] = result.delivered - in_window
    result.duration_s = duration
    result.delivered_per_s = in_window / duration
    result.latencies_us = sorted(latencies)
    result.latency_ms = percentiles_ms(result.latencies_us)
    errors: dict[str, int] = {}
    for s in acked.values():
        for code, n in s["errors"].items():
            errors[code] = errors.get(code, 0) + n
    result.send_errors = sum(errors.values())
    messages_sent = sum(s["sent"] for s in acked.values())
    result.extra.update(
        {
            "messages_sent": messages_sent,
            "messages_acked": messages_sent
            - sum(len(s["unacked"]) + len(s["failed"]) for s in acked.values()),
            "send_error_codes": errors,
            "foreign_messages": sum(r["foreign"] for r in results),
            "redelivered": sum(r["redelivered"] for r in results),
        }
    )
    if cfg.scenario == "group":
        result.extra["fanout"] = len(users) - 1
    _server_cost(result, before, after, result.delivered)
    if cluster_before is not None and cluster_after is not None:
        _cluster_cost(cfg, result, cluster_before, cluster_after)
    if result.extra["redelivered"]:
        result.notes.append(
            f"{result.extra['redelivered']:,} push(es) repeated a message its connection "
            "already had (same msg_id, dropped as clients do): a re-sync after an ack "
            "found a gap"
        )
    if result.lost:
        result.problems.insert(0, f"LOST: {result.lost} acked message(s) never arrived")
    if result.duplicated:
        result.problems.append(f"DUPLICATED: {result.duplicated} message(s) arrived twice")
    if result.reordered:
        result.problems.append(f"REORDERED: {result.reordered} message(s) arrived out of order")
    if result.send_errors:
        result.problems.append(f"ERRORS: {result.send_errors} send(s) refused: {errors}")
    if result.disconnects:
        result.problems.append(f"DISCONNECTS: {result.disconnects} connection(s) dropped")
    unacked = sum(len(s["unacked"]) for s in acked.values())
    result.extra["messages_unacked"] = unacked
    if unacked:
        result.problems.append(f"UNACKED: {unacked} send(s) got no answer within the drain")


def _cluster_cost(
    cfg: BenchConfig,
    result: BenchResult,
    before: dict[int, Any],
    after: dict[int, Any],
) -> None:
    """Every counted process's CPU; the server figures are their total (RSS: the nodes')."""
    from bitchat.bench.cluster import cluster_cost

    cost = cluster_cost(before, after, result.delivered)
    result.extra.update(cost)
    result.server_cpu_s = cost["cluster_cpu_s"]
    result.server_cpu_us_per_msg = cost["cluster_cpu_us_per_msg"]
    nodes = [p for p in cost["processes"] if p["role"] == "node"]
    result.server_rss_kib = sum(p["rss_kib"] for p in nodes)
    standalone, source = STANDALONE_CPU_US, "the standalone p2p target"
    if cfg.baseline:
        standalone, source = _baseline(cfg.baseline), cfg.baseline
    result.extra["standalone_cpu_us_per_msg"] = standalone
    result.extra["standalone_from"] = source
    total = cost["cluster_cpu_us_per_msg"]
    result.extra["cpu_vs_standalone"] = (
        None if total is None or not standalone else round(total / standalone, 2)
    )
    if cost["processes_gone"]:
        result.notes.append(
            f"exited during the run, not counted: {', '.join(cost['processes_gone'])}"
        )


def _baseline(path: str) -> float:
    """The server CPU per message of a standalone p2p result file."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        value = float(data["server_cpu_us_per_msg"])
        if data.get("scenario") != "p2p" or data.get("server", {}).get("cluster"):
            raise ValueError("not a standalone p2p result")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--baseline {path}: want the --json of a standalone bench p2p run ({exc})"
        ) from None
    return value


def _server_cost(
    result: BenchResult, before: ProcSample | None, after: ProcSample | None, ops: int
) -> None:
    if before is None or after is None:
        return
    result.server_cpu_s = round(after.cpu_s - before.cpu_s, 3)
    if ops:
        result.server_cpu_us_per_msg = round(result.server_cpu_s * 1e6 / ops, 2)
    result.server_rss_kib = after.rss_kib
    result.server_rss_peak_kib = after.hwm_kib


LOGIN_FIGURES = (
    "logins",
    "logins_per_s",
    "login_failures",
    "login_error_codes",
    "warm_connections",
)


def _run_both_logins(
    cfg: BenchConfig,
    handle: ServerHandle,
    users: list[UserSpec],
    warm: int,
    run_id: str,
    result: BenchResult,
    progress: Progress,
) -> None:
    """connect: token logins, then password logins by other users, each measured apart.

    The run's own figures (``delivered``, latency, server CPU) are the token
    logins'; ``by_login`` holds both kinds' figures.
    """
    n_password = cfg.password_logins
    token_users, password_users = users[:-n_password], users[-n_password:]
    _run_connect(cfg, handle, token_users, warm, run_id, result, progress, "token", "token")
    other = BenchResult(result.scenario, result.config, result.machine, result.server, "logins")
    _run_connect(cfg, handle, password_users, 0, run_id, other, progress, "password", "password")
    result.extra["by_login"] = {
        kind: {
            **{k: r.extra[k] for k in LOGIN_FIGURES},
            "latency_ms": r.latency_ms,
            "duration_s": r.duration_s,
            "server_cpu_s": r.server_cpu_s,
            "server_cpu_us_per_login": r.server_cpu_us_per_msg,
        }
        for kind, r in (("token", result), ("password", other))
    }
    result.extra["login"] = "both"
    result.extra["login_failures"] += other.extra["login_failures"]
    result.client_cpu_s += other.client_cpu_s
    result.disconnects += other.disconnects
    result.problems.extend(f"password logins: {p}" for p in other.problems)
    result.notes.extend(other.notes)


def _run_connect(
    cfg: BenchConfig,
    handle: ServerHandle,
    users: list[UserSpec],
    warm: int,
    run_id: str,
    result: BenchResult,
    progress: Progress,
    login: str,
    label: str = "",
) -> None:
    procs = max(1, min(cfg.procs, len(users)))
    parts = _split(users, procs, lambda u: u.index)
    warm_per = [0] * procs
    for i in range(warm):  # the first ``warm`` users, spread like the rest
        warm_per[i % procs] += 1
    plans = [
        _plan(cfg, i, handle, p, run_id, warm=warm_per[i], login=login) for i, p in enumerate(parts)
    ]
    measured = len(users) - warm
    phase = f"{label} logins" if label else "connect + log in"
    workers = Workers(plans)
    try:
        slow = login == "password" or bool(cfg.target)
        workers.gather(
            "ready",
            60 + len(users) * (0.2 if slow else 0.02),
            (lambda: progress("warm up", sum(workers.progress), warm, "")) if warm else _nothing,
            handle.alive,
        )
        time.sleep(0.5)  # let the warm-up logins finish their work on the server
        t0 = time.monotonic_ns() + 200_000_000
        workers.broadcast("go", {"t0": t0})
        time.sleep(max(0, t0 - time.monotonic_ns()) / 1e9)
        before = _sample(handle)

        def show() -> None:
            done = sum(workers.progress)
            elapsed = (time.monotonic_ns() - t0) / 1e9
            progress(
                phase,
                done,
                measured,
                f"{done:,.0f} logins, {done / elapsed if elapsed > 0 else 0:,.0f}/s",
            )

        opened = workers.gather(
            "opened", 120 + measured * (0.1 if slow else 0.01), show, handle.alive
        )
        after_login = _sample(handle)
        n = sum(o["opened"] for o in opened)
        t_last = max(o["t_last"] for o in opened)
        elapsed = max((t_last - t0) / 1e9, 1e-9)
        progress(phase, n, measured, f"{n:,} logins, {n / elapsed:,.0f}/s")
        lat: array.array[int] = array.array("Q")
        for o in opened:
            lat.frombytes(o["latencies_us"])
            result.client_cpu_s += o["cpu_s"]
        result.latencies_us = sorted(lat)
        result.latency_ms = percentiles_ms(result.latencies_us)
        failed = sum(o["failed"] for o in opened)
        errors: dict[str, int] = {}
        for o in opened:
            for code, k in o["errors"].items():
                errors[code] = errors.get(code, 0) + k
        result.delivered = n
        result.duration_s = round(elapsed, 3)
        result.delivered_per_s = n / elapsed
        result.extra.update(
            {
                "logins": n,
                "logins_per_s": round(n / elapsed, 1),
                "login_failures": failed,
                "login_error_codes": errors,
                "login": login,
                "warm_connections": warm,
            }
        )
        if failed:
            result.problems.append(f"ERRORS: {failed} login(s) failed: {errors}")
            for o in opened:
                for note in o["notes"][:3]:
                    result.problems.append(note)
        _server_cost(result, before, after_login, n)
        if cfg.scenario == "idle":
            result.unit = "connections"
            settle = 2.0
            for k in range(int(settle * 4)):
                progress("settle", (k + 1) / 4, settle, "")
                time.sleep(0.25)
            s1 = _sample(handle)
            start = time.monotonic()
            while (left := cfg.duration - (time.monotonic() - start)) > 0:
                progress("hold idle", cfg.duration - left, cfg.duration, f"{n:,} connections")
                time.sleep(min(0.25, left))
            progress("hold idle", cfg.duration, cfg.duration, f"{n:,} connections")
            s2 = _sample(handle)
            if before is not None and s1 is not None and s2 is not None:
                result.server_rss_kib = s2.rss_kib
                result.server_rss_peak_kib = s2.hwm_kib
                result.extra.update(
                    {
                        "connections": n,
                        "rss_baseline_kib": before.rss_kib,
                        "rss_kib_per_conn": round((s2.rss_kib - before.rss_kib) / max(n, 1), 2),
                        "idle_cpu_pct": round(100 * (s2.cpu_s - s1.cpu_s) / cfg.duration, 2),
                    }
                )
        workers.broadcast("close")
        closed = workers.gather("closed", 30, lambda: None, handle.alive)
        result.disconnects = sum(c["disconnects"] for c in closed)
        if result.disconnects:
            result.problems.append(f"DISCONNECTS: {result.disconnects} connection(s) dropped")
    finally:
        workers.stop()
