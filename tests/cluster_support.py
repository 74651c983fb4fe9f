"""Helpers of the cluster tests: real Redis and PostgreSQL on loopback, never mocks.

Redis comes from ``BITCHAT_TEST_REDIS`` (default ``redis://127.0.0.1:6379/0``)
and PostgreSQL from ``BITCHAT_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``). Each test gets its own Redis
key prefix (its keys are deleted after it) and its own PostgreSQL database
(``bitchat_test_<random>``, dropped after it). When a service cannot be
reached the test is skipped with the reason, or fails under ``CI=true``.

A test module takes the fixtures by importing them (``*_fixture``; the
fixtures' names are ``redis_prefix``, ``pg_dsn`` and ``own_redis``).

For outages the tests never touch the shared services: they run their own
``redis-server`` on a free port, or put a TCP proxy between a node and
PostgreSQL and cut it (the real server answers everything that passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from bitchat import Settings
from bitchat.im.client import IMClient
from bitchat.im.packets import ChatMessage

FACTOR = float(os.environ.get("BITCHAT_TEST_TIMEOUT_FACTOR", "1"))
WAIT = 10.0 * FACTOR
"""How long a cluster test waits for any event (processes start, messages cross)."""
NODE_TTL = 2.0
"""Node registrations live this long in the tests (a killed node drops out after it)."""

REDIS_URL = os.environ.get("BITCHAT_TEST_REDIS", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("BITCHAT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def unavailable(reason: str) -> None:
    """Skip the test, or fail it on CI, where every service must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: cluster tests must not be skipped)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_settings(**changes: Any) -> Settings:
    """Short timers, cheap password hashes, no rate limit."""
    base = Settings(
        read_idle_timeout=10.0,
        heartbeat_interval=1.0,
        request_timeout=WAIT,
        connect_timeout=WAIT,
        reconnect_initial_delay=0.02,
        reconnect_max_delay=0.3,
        shutdown_grace=2.0,
        rate_limit=0,
        worker_threads=4,
        node_ttl=NODE_TTL,
        backend_timeout=3.0,
        pg_pool_size=4,
        password_hash_time_cost=1,
        password_hash_memory_kib=1024,
    )
    return base.replace(**changes)


@contextlib.asynccontextmanager
async def node_maker(
    redis_prefix: str, pg_dsn: str
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``make(node_id, *, redis_url=..., dsn=..., **settings)``: an in-process cluster
    node on loopback, started through the composition root; all stopped after."""
    from bitchat.app import build_server

    servers: list[Any] = []

    async def make(
        node_id: int, *, redis_url: str = REDIS_URL, dsn: str | None = None, **changes: Any
    ) -> Any:
        settings = cluster_settings(
            host="127.0.0.1",
            port=0,
            mode="cluster",
            redis_url=redis_url,
            pg_dsn=dsn or pg_dsn,
            node_id=node_id,
            redis_prefix=redis_prefix,
            **changes,
        )
        server = build_server(settings)
        await server.start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in reversed(servers):
            await asyncio.wait_for(server.stop(), 4 * WAIT)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = WAIT, what: str = "condition"
) -> None:
    """Poll ``check`` until true. Only for state kept in another engine or process
    (a key's TTL running out in Redis), where there is no event to wait on."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 2):
        if await check():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout:.1f}s")


class Inbox:
    """Chat messages pushed to one client, awaitable by text."""

    def __init__(self, im: IMClient) -> None:
        self.got: list[ChatMessage] = []
        self._waiters: list[tuple[str, asyncio.Future[ChatMessage]]] = []
        im.on_message(self._on)

    def _on(self, m: ChatMessage) -> None:
        self.got.append(m)
        for text, fut in list(self._waiters):
            if m.text == text and not fut.done():
                fut.set_result(m)

    async def wait(self, text: str, timeout: float = WAIT) -> ChatMessage:
        for m in self.got:
            if m.text == text:
                return m
        fut: asyncio.Future[ChatMessage] = asyncio.get_running_loop().create_future()
        self._waiters.append((text, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            got = [m.text for m in self.got]
            raise AssertionError(f"{text!r} not received; got {got}") from None


# -- Redis ----------------------------------------------------------------------------------


async def _redis_reachable(url: str) -> str | None:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        return f"Redis at {url} is unreachable ({exc}); set BITCHAT_TEST_REDIS"
    finally:
        await client.aclose()
    return None


@pytest.fixture(name="redis_prefix")
async def redis_prefix_fixture() -> AsyncIterator[str]:
    """A fresh key prefix on the test Redis; its keys are deleted afterwards."""
    reason = await _redis_reachable(REDIS_URL)
    if reason:
        unavailable(reason)
    prefix = f"bitchat-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


class RedisServer:
    """A throwaway ``redis-server`` of our own, to stop and restart at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            unavailable("redis-server is not installed")
        assert exe is not None
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            await eventually(lambda: _pings(client), WAIT, "redis-server start")
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(WAIT)
        self.proc = None


async def _pings(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False


@pytest.fixture(name="own_redis")
async def own_redis_fixture() -> AsyncIterator[RedisServer]:
    server = RedisServer(free_port())
    await server.start()
    try:
        yield server
    finally:
        server.stop()


# -- PostgreSQL -----------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture(name="pg_dsn")
async def pg_dsn_fixture() -> AsyncIterator[str]:
    """The DSN of a fresh database ``bitchat_test_<random>``, dropped afterwards."""
    try:
        admin = await asyncpg.connect(PG_URL, timeout=3)
    except Exception as exc:
        unavailable(f"PostgreSQL at {PG_URL} is unreachable ({exc}); set BITCHAT_TEST_PG")
    name = f"bitchat_test_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(PG_URL, name)
    admin = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def terminate_backends(dsn: str, application_name: str) -> int:
    """``pg_terminate_backend`` on a node's connections; how many were cut."""
    con = await asyncpg.connect(dsn, timeout=3)
    try:
        rows = await con.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()",
            application_name,
        )
    finally:
        await con.close()
    return len(rows)


class TcpProxy:
    """Forwards 127.0.0.1:port to a real server; ``cut()`` drops everything and
    refuses new connections until ``restore()``: a server outage, seen from the node."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_w))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._writers.discard(writer)
        self._writers.discard(up_w)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        await self.cut()


def proxied_dsn(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    creds = f"{netloc[0]}@" if len(netloc) == 2 else ""
    return urlunsplit(
        (parts.scheme, f"{creds}127.0.0.1:{port}", parts.path, parts.query, parts.fragment)
    )


def pg_host_port(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


# -- processes ------------------------------------------------------------------------------


class Proc:
    """A ``python -m bitchat ...`` child whose stderr is read line by line."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._waiters: list[tuple[re.Pattern[str], asyncio.Future[str]]] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, ready: str | None, timeout: float = WAIT) -> None:
        """Start, and wait for a stderr line matching ``ready`` (a regex)."""
        waiter = self.expect(ready) if ready else None
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bitchat",
            "--log-level",
            "info",
            *self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        if waiter is not None:
            await self.wait_line(waiter, timeout)

    def expect(self, pattern: str) -> asyncio.Future[str]:
        """A future of the first line (from now on) matching ``pattern``."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append((re.compile(pattern), fut))
        return fut

    async def wait_line(self, fut: asyncio.Future[str], timeout: float = WAIT) -> str:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: expected line not seen within {timeout:.1f}s; stderr:\n"
                + "\n".join(self.lines[-40:])
            ) from None

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.lines.append(text)
            for pattern, fut in list(self._waiters):
                if not fut.done() and pattern.search(text):
                    fut.set_result(text)
                    self._waiters.remove((pattern, fut))

    async def wait_exit(self, timeout: float = WAIT) -> int:
        assert self.proc is not None
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout)
        return rc

    def kill9(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), WAIT)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


class ProcessCluster:
    """Server and router processes of one test cluster (own prefix and database)."""

    def __init__(self, redis_url: str, prefix: str, pg_dsn: str) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.pg_dsn = pg_dsn
        self.procs: list[Proc] = []
        self.nodes: dict[int, tuple[Proc, int]] = {}

    async def node(
        self,
        node_id: int,
        port: int | None = None,
        *,
        wait: bool = True,
        extra: list[str] | None = None,
        redis_url: str | None = None,
    ) -> Proc:
        """Start node ``node_id``; ``redis_url`` overrides the cluster's (a proxy to cut)."""
        port = port or free_port()
        proc = Proc(
            f"node {node_id}",
            [
                "server",
                "--cluster",
                "--redis",
                redis_url or self.redis_url,
                "--redis-prefix",
                self.prefix,
                "--pg",
                self.pg_dsn,
                "--node-id",
                str(node_id),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--node-ttl",
                str(NODE_TTL),
                "--rate-limit",
                "0",
                *(extra or []),
            ],
        )
        self.procs.append(proc)
        await proc.start(rf"node {node_id} announced at" if wait else None)
        self.nodes[node_id] = (proc, port)
        return proc

    async def router(self, port: int | None = None) -> tuple[Proc, int]:
        port = port or free_port()
        proc = Proc(
            "router",
            [
                "router",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--redis",
                self.redis_url,
                "--redis-prefix",
                self.prefix,
            ],
        )
        self.procs.append(proc)
        await proc.start(r"bitchat router started on")
        return proc, port

    def port_of(self, node_id: int) -> int:
        return self.nodes[node_id][1]

    async def close(self) -> None:
        for proc in reversed(self.procs):
            await proc.stop()


async def pg_schema_at(con: asyncpg.Connection, version: int) -> None:
    """Write schema ``version`` (the first ``version`` of ``pg.MIGRATIONS``) into an
    empty database, as that release left it: the start of an upgrade test."""
    from bitchat.cluster import pg

    await con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    await con.execute("INSERT INTO schema_version VALUES ($1)", version)
    for script in pg.MIGRATIONS[:version]:
        if isinstance(script, str):
            await con.execute(script)
        else:
            await script(con)
