"""The cluster under test: ``bitchat bench p2p --cluster N``.

The bench starts, on this machine, N ``bitchat server --cluster`` nodes and a
``bitchat router`` on the PostgreSQL and Redis that run here. Each run gets a
database of its own (``bitchat_bench_<random>``, created on the server the
admin URL names and dropped afterwards unless ``--keep``) and a Redis key
prefix of its own (its keys deleted afterwards). Users are written into
PostgreSQL with a login token each before the nodes start, as the standalone
bench writes them into SQLite.

Placement: the two users of a pair log in on different nodes, so every
message is stored by the sender's node and forwarded through Redis to the
partner's. The load generators connect each user straight to its node; the
router is started and asked once per node (its answers are reported), but it
does not place the bench's users: least connections would not keep partners
apart.

Cost: user + system CPU from ``/proc`` of every process that serves the run:
the nodes, the router, the PostgreSQL backends connected to the run's
database (``pg_stat_activity``), PostgreSQL's WAL writer, checkpointer and
background writer (shared by every database on the server: counted, and
marked so) and ``redis-server`` (its ``process_id``, also shared by whatever
else uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bitchat.bench.procstat import ProcSample, read_proc
from bitchat.bench.serverproc import (
    TOKEN_TTL,
    ServerHandle,
    UserSpec,
    free_port,
    wait_listening,
)
from bitchat.errors import UsageError

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
PG_ENV = "BITCHAT_BENCH_PG"
REDIS_ENV = "BITCHAT_BENCH_REDIS"
AUX_TYPES = ("walwriter", "checkpointer", "background writer")
"""PostgreSQL's own processes that work for every database's writes."""

Progress = Callable[[str, float, float | None, str], None]


def pg_url(given: str | None) -> str:
    return given or os.environ.get(PG_ENV) or DEFAULT_PG


def redis_url(given: str | None) -> str:
    return given or os.environ.get(REDIS_ENV) or DEFAULT_REDIS


def safe_url(url: str) -> str:
    """``url`` without its password, for reports and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}@{netloc}", parts.path, parts.query, ""))


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@dataclass(frozen=True, slots=True)
class Member:
    """One process whose CPU the cluster bench counts."""

    role: str
    """"node", "router", "postgres backend", "postgres (shared)" or "redis"."""
    name: str
    pid: int
    shared: bool = False
    """It also serves others (every database of the PostgreSQL server, every Redis user)."""
    group: str = ""
    """Shown as one line with the others of its group (a node's PostgreSQL backends)."""


@dataclass
class ClusterHandle(ServerHandle):
    """The nodes, the router, the database and the key prefix of one run.

    ``host``/``port`` are the first node's (set-up requests go there); ``pid``
    is None: the cost is every member's (:meth:`sample`).
    """

    nodes: list[ServerHandle] = field(default_factory=list)
    router: ServerHandle | None = None
    router_answers: list[int] = field(default_factory=list)
    """The node ids the router handed out, asked once per node."""
    admin_url: str = ""
    database: str = ""
    dsn: str = ""
    redis: str = ""
    prefix: str = ""
    redis_pid: int | None = None
    notes: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return all(n.alive() for n in self.nodes) and (self.router is None or self.router.alive())

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(
            f"-- {os.path.basename(h.log_path or '')}:\n{h.log_tail(lines)}"
            for h in [*self.nodes, *([self.router] if self.router else [])]
            if not h.alive()
        )

    def stop(self, timeout: float = 10.0) -> None:
        for h in [*self.nodes, *([self.router] if self.router else [])]:
            h.stop(timeout)

    def describe(self) -> dict[str, Any]:
        """What ``result.server`` holds for a cluster run."""
        return {
            "self_started": True,
            "cluster": len(self.nodes),
            "pid": None,
            "address": f"{self.host}:{self.port}",
            "nodes": [
                {
                    "node_id": i + 1,
                    "pid": n.pid,
                    "address": f"{n.host}:{n.port}",
                    "argv": [safe_url(a) if "://" in a else a for a in n.argv],
                }
                for i, n in enumerate(self.nodes)
            ],
            "router": None
            if self.router is None
            else {
                "pid": self.router.pid,
                "address": f"{self.router.host}:{self.router.port}",
                "answered": self.router_answers,
            },
            "postgres": safe_url(self.admin_url),
            "database": self.database,
            "redis": safe_url(self.redis),
            "redis_prefix": self.prefix,
            "redis_pid": self.redis_pid,
            "data_dir": self.data_dir,
        }

    def members(self) -> list[Member]:
        """Every process counted, PostgreSQL's read from ``pg_stat_activity`` now."""
        out = [Member("node", f"node {i + 1}", n.pid or 0) for i, n in enumerate(self.nodes)]
        if self.router is not None and self.router.pid:
            out.append(Member("router", "router", self.router.pid))
        out.extend(asyncio.run(self._pg_members()))
        if self.redis_pid:
            out.append(Member("redis", "redis-server", self.redis_pid, shared=True))
        return [m for m in out if m.pid]

    async def _pg_members(self) -> list[Member]:
        import asyncpg

        con = await asyncpg.connect(self.admin_url, timeout=5)
        try:
            rows = await con.fetch(
                "SELECT pid, backend_type, datname, application_name FROM pg_stat_activity "
                "WHERE datname = $1 OR backend_type = ANY($2::text[])",
                self.database,
                list(AUX_TYPES),
            )
        finally:
            await con.close()
        out: list[Member] = []
        for r in rows:
            pid = int(r["pid"])
            if not _is_process(pid, "postgres"):
                continue  # PostgreSQL on another machine or in another pid namespace
            if r["datname"] == self.database:
                app = r["application_name"] or r["backend_type"]
                node = str(app).removeprefix("bitchat-node-")
                group = f"PostgreSQL backends, node {node}" if node.isdigit() else str(app)
                out.append(Member("postgres backend", f"backend {pid} ({app})", pid, group=group))
            else:
                out.append(Member("postgres (shared)", str(r["backend_type"]), pid, shared=True))
        return sorted(out, key=lambda m: (m.role, m.name))

    def misplaced(self, users: Sequence[UserSpec], timeout: float = 10.0) -> list[UserSpec]:
        """The users the cluster's own registry does not show online on their node
        alone (``online:{id}`` in Redis), once every one is or ``timeout`` passed."""
        import redis.asyncio as aioredis

        from bitchat.cluster.registry import Keys

        keys = Keys(self.prefix)
        node_of = {n.port: i + 1 for i, n in enumerate(self.nodes)}

        async def check() -> list[UserSpec]:
            client = aioredis.Redis.from_url(self.redis, socket_timeout=5)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    where: dict[int, set[int]] = {}
                    for node in node_of.values():
                        for field in await client.hkeys(keys.online(node)):
                            where.setdefault(int(field), set()).add(node)
                    wrong = [u for u in users if where.get(u.user_id) != {node_of[u.port]}]
                    if not wrong or time.monotonic() > deadline:
                        return wrong
                    # The nodes mirror their sessions into Redis a moment after a login.
                    await asyncio.sleep(0.05)
            finally:
                await client.aclose()

        return asyncio.run(check())

    def sample(self) -> dict[int, tuple[Member, ProcSample]]:
        out: dict[int, tuple[Member, ProcSample]] = {}
        for m in self.members():
            s = read_proc(m.pid)
            if s is not None:
                out[m.pid] = (m, s)
        return out


def _is_process(pid: int, name: str) -> bool:
    """Whether ``pid`` is a process of this machine called ``name`` (``/proc/<pid>/comm``)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip().startswith(name)
    except OSError:
        return False


def cluster_cost(
    before: dict[int, tuple[Member, ProcSample]],
    after: dict[int, tuple[Member, ProcSample]],
    messages: int,
) -> dict[str, Any]:
    """Per process, per role and in total: CPU seconds and µs per message.

    A process that appeared during the run (a PostgreSQL backend a pool opened
    late) counts all its CPU; one that was gone by the end is listed as such.
    """

    def per(cpu: float) -> float | None:
        return round(cpu * 1e6 / messages, 2) if messages else None

    processes: list[dict[str, Any]] = []
    roles: dict[str, float] = {}
    total = 0.0
    for pid, (m, s) in after.items():
        prior = before.get(pid)
        cpu = s.cpu_s - (prior[1].cpu_s if prior is not None else 0.0)
        processes.append(
            {
                "role": m.role,
                "name": m.name,
                "pid": pid,
                "shared": m.shared,
                "group": m.group or m.name,
                "cpu_s": round(cpu, 3),
                "cpu_us_per_msg": per(cpu),
                "rss_kib": s.rss_kib,
                "new": prior is None,
            }
        )
        roles[m.role] = roles.get(m.role, 0.0) + cpu
        total += cpu
    gone = [m.name for pid, (m, _) in before.items() if pid not in after]
    order = ["node", "router", "postgres backend", "postgres (shared)", "redis"]
    processes.sort(key=lambda p: (order.index(p["role"]), p["name"]))
    return {
        "processes": processes,
        "cpu_by_role": {
            role: {"cpu_s": round(roles[role], 3), "cpu_us_per_msg": per(roles[role])}
            for role in order
            if role in roles
        },
        "cluster_cpu_s": round(total, 3),
        "cluster_cpu_us_per_msg": per(total),
        "processes_gone": gone,
    }


# -- start and stop -----------------------------------------------------------------------------


async def _check_services(admin_url: str, redis: str) -> int | None:
    """Refuse (UsageError) if PostgreSQL or Redis cannot be reached; Redis's pid if local."""
    import asyncpg
    import redis.asyncio as aioredis

    try:
        con = await asyncpg.connect(admin_url, timeout=3)
        await con.close()
    except Exception as exc:
        raise UsageError(
            f"--cluster needs PostgreSQL: cannot connect to {safe_url(admin_url)} "
            f"({type(exc).__name__}: {exc}); start it, or name another with --pg URL "
            f"or {PG_ENV}"
        ) from None
    client = aioredis.Redis.from_url(redis, socket_connect_timeout=3, socket_timeout=3)
    try:
        info = await client.info("server")
    except Exception as exc:
        raise UsageError(
            f"--cluster needs Redis: cannot reach {safe_url(redis)} "
            f"({type(exc).__name__}: {exc}); start it, or name another with --redis URL "
            f"or {REDIS_ENV}"
        ) from None
    finally:
        await client.aclose()
    pid = int(info.get("process_id", 0) or 0)
    return pid if pid and _is_process(pid, "redis") else None


async def _create_database(admin_url: str, name: str) -> None:
    import asyncpg

    con = await asyncpg.connect(admin_url, timeout=5)
    try:
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()


async def _drop_database(admin_url: str, name: str) -> None:
    import asyncpg

    con = await asyncpg.connect(admin_url, timeout=5)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


async def _delete_keys(redis: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis, socket_connect_timeout=3, socket_timeout=5)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def seed_pg(dsn: str, users: Sequence[UserSpec], password: str) -> None:
    """Write ``users`` (all with ``password``), a device and a login token each into
    the new database at ``dsn``, creating its schema first; fills in ids and tokens."""
    from bitchat.cluster.pg import PgDatabase
    from bitchat.im.names import name_keys
    from bitchat.im.passwords import hash_password, new_token, token_digest

    logging.getLogger("bitchat.cluster.pg").setLevel(logging.WARNING)  # no "migrated" lines
    db = PgDatabase(dsn, application_name="bitchat-bench-seed")
    await db.open()  # migrates the schema
    try:
        digest = await hash_password(password)
        now = time.time()
        async with db.connection() as con, con.transaction():
            # COPY: thousands of rows in one round trip each.
            await con.copy_records_to_table(
                "users",
                records=[(u.name, *name_keys(u.name), digest, now) for u in users],
                columns=["name", "name_key", "name_shape", "password_hash", "created_at"],
            )
            ids = {r["name"]: int(r["id"]) for r in await con.fetch("SELECT name, id FROM users")}
            await con.copy_records_to_table(
                "devices",
                records=[(ids[u.name], "bench", now, now) for u in users],
                columns=["user_id", "name", "created_at", "last_seen"],
            )
            device_of = {
                int(r["user_id"]): int(r["id"])
                for r in await con.fetch("SELECT user_id, id FROM devices")
            }
            rows = []
            for u in users:
                u.user_id = ids[u.name]
                u.token = new_token()
                rows.append(
                    (token_digest(u.token), u.user_id, now + TOKEN_TTL, device_of[u.user_id])
                )
            await con.copy_records_to_table(
                "tokens", records=rows, columns=["digest", "user_id", "expires_at", "device_id"]
            )
    finally:
        await db.close()


def _spawn(argv: list[str], log_path: str, host: str, port: int) -> ServerHandle:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return ServerHandle(host, port, proc.pid, True, os.path.dirname(log_path), log_path, argv, proc)


def _wait_for_line(handle: ServerHandle, text: str, timeout: float) -> None:
    """Wait until ``handle``'s log holds ``text`` (the process tells nothing else)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            name = os.path.basename(handle.log_path or "").removesuffix(".log")
            raise RuntimeError(f"{name} exited during start-up:\n{handle.log_tail()}")
        with contextlib.suppress(OSError), open(handle.log_path or "", encoding="utf-8") as f:
            if text in f.read():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not logged within {timeout:.0f}s:\n{handle.log_tail()}")


def _ask_router(router: ServerHandle, nodes: int) -> list[int]:
    """Ask the router for a node ``nodes`` times, each time avoiding those it named."""
    from bitchat.cluster.discovery import where_to

    async def ask() -> list[int]:
        got: list[int] = []
        for _ in range(nodes):
            answer = await where_to(router.host, router.port, avoid=list(got))
            got.append(int(answer.node_id))
        return got

    return asyncio.run(ask())


def place(users: Sequence[UserSpec], ports: Sequence[int]) -> None:
    """Put the two users of each pair on different nodes, pairs spread evenly."""
    n = len(ports)
    for u in users:
        pair = u.index // 2
        u.port = ports[(pair + (u.index & 1)) % n]


@contextlib.contextmanager
def start_cluster(
    *,
    nodes: int,
    users: list[UserSpec],
    password: str,
    pg: str | None,
    redis: str | None,
    data_dir: str | None,
    keep: bool,
    use_uvloop: bool,
    extra_args: Sequence[str],
    progress: Progress,
    timeout: float = 30.0,
) -> Iterator[ClusterHandle]:
    """The cluster of one run, torn down (database, keys, processes) afterwards."""
    admin = pg_url(pg)
    rurl = redis_url(redis)
    redis_pid = asyncio.run(_check_services(admin, rurl))
    run = secrets.token_hex(5)
    name = f"bitchat_bench_{run}"
    prefix = f"bitchat-bench-{run}:"
    folder = data_dir or tempfile.mkdtemp(prefix="bitchat-bench-")
    os.makedirs(folder, exist_ok=True)
    host = "127.0.0.1"
    handle = ClusterHandle(
        host,
        0,
        None,
        True,
        folder,
        admin_url=admin,
        database=name,
        dsn=with_database(admin, name),
        redis=rurl,
        prefix=prefix,
        redis_pid=redis_pid,
    )
    if redis_pid is None:
        handle.notes.append(
            "redis-server is not a process of this machine (or not visible): its CPU is not counted"
        )
    if keep:
        handle.notes.append(
            f"--keep: database {name} is kept (dropdb {name} when done), and the logs in {folder}"
        )
    created = False
    try:
        progress("create database", 0, 1, name)
        asyncio.run(_create_database(admin, name))
        created = True
        progress("seed users", 0, len(users), "")
        asyncio.run(seed_pg(handle.dsn, users, password))
        progress("seed users", len(users), len(users), "")
        progress("start nodes", 0, nodes, "")
        common = [
            "--cluster",
            "--redis",
            rurl,
            "--redis-prefix",
            prefix,
            "--pg",
            handle.dsn,
            "--rate-limit",
            "0",
            "--max-connections-per-address",
            "1000000",
            "--max-connections",
            "1000000",
            *(["--no-uvloop"] if not use_uvloop else []),
        ]
        for i in range(1, nodes + 1):
            port = free_port(host)
            argv = [sys.executable, "-m", "bitchat", "server", "--node-id", str(i)]
            argv += ["--host", host, "--port", str(port), *common, *extra_args]
            handle.nodes.append(_spawn(argv, os.path.join(folder, f"node{i}.log"), host, port))
        for i, node in enumerate(handle.nodes, start=1):
            wait_listening(node, timeout)
            _wait_for_line(node, f"node {i} announced at", timeout)
            progress("start nodes", i, nodes, f"node {i}: pid {node.pid}, port {node.port}")
        handle.port = handle.nodes[0].port
        rport = free_port(host)
        argv = [sys.executable, "-m", "bitchat", "router", "--host", host, "--port", str(rport)]
        argv += ["--redis", rurl, "--redis-prefix", prefix]
        handle.router = _spawn(argv, os.path.join(folder, "router.log"), host, rport)
        wait_listening(handle.router, timeout)
        handle.router_answers = _ask_router(handle.router, nodes)
        progress("start router", 1, 1, f"answered nodes {handle.router_answers}")
        place(users, [n.port for n in handle.nodes])
        yield handle
    finally:
        handle.stop()
        with contextlib.suppress(Exception):
            asyncio.run(_delete_keys(rurl, prefix))
        if created and not keep:
            with contextlib.suppress(Exception):
                asyncio.run(_drop_database(admin, name))
        if not keep and not data_dir:
            shutil.rmtree(folder, ignore_errors=True)
