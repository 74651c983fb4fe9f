"""The server under test: one the bench starts itself, or one already running.

A self-started server is a separate process (``python -m bitchat server``), so
its CPU and memory are its own in ``/proc``. It is the standalone server with
SQLite in a temporary folder on disk (``synchronous=FULL``: an ack means the
message is on disk) and everything at its defaults except the per-connection
rate limit, which is off (``--rate-limit 0``): the bench's clients send
hundreds of requests per second each, far over the default 50/s; and the caps
on connections, which the bench's thousands of loopback connections from one
address would meet (``--max-connections-per-address``, ``--max-connections``).

Users of a self-started server are written into its database before it starts
(one argon2 hash shared by all, and a login token each), so hundreds or
thousands of users can log in within seconds; a running server gets its users
by ordinary password logins (auto-register), at argon2's deliberate pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bitchat.errors import UsageError

TOKEN_TTL = 24 * 3600.0


@dataclass(slots=True)
class UserSpec:
    """One bench user: its name, password, (when seeded) id and token, and its node."""

    index: int
    name: str
    password: str
    user_id: int = 0
    token: str = ""
    port: int = 0
    """The port its connection goes to (a cluster node); 0: the server's."""


@dataclass
class ServerHandle:
    """Where the server under test listens, and which process it is."""

    host: str
    port: int
    pid: int | None
    self_started: bool
    data_dir: str | None = None
    log_path: str | None = None
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        if self.pid is None:
            return True
        return os.path.exists(f"/proc/{self.pid}")

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a self-started server (SIGTERM, then SIGKILL after ``timeout``)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def parse_target(target: str) -> tuple[str, int]:
    """``HOST:PORT`` of a running server; only this machine's loopback is allowed.

    The bench reads the server's ``/proc`` entry, so it must run on the same
    machine anyway; refusing other addresses keeps it from loading anyone else.
    """
    host, sep, port_s = target.rpartition(":")
    if not sep or not port_s.isdigit():
        raise UsageError(f"--target wants HOST:PORT, got {target!r}")
    host = host.strip("[]") or "127.0.0.1"
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise UsageError(f"--target must be a loopback address (127.0.0.1, ::1), not {host}")
    return host, int(port_s)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(handle: ServerHandle, timeout: float) -> None:
    """Return once ``handle`` accepts TCP connections; raise if it died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            raise RuntimeError(f"the server exited during start-up:\n{handle.log_tail()}")
        try:
            with socket.create_connection((handle.host, handle.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the server did not listen within {timeout:.0f}s:\n{handle.log_tail()}")


def start_server(
    data_dir: str,
    *,
    use_uvloop: bool = True,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
    wrap: Sequence[str] = (),
) -> ServerHandle:
    """Start ``python -m bitchat server`` on a free loopback port with ``data_dir``.

    ``wrap`` prefixes the command (e.g. a profiler: ``py-spy record -o f --``);
    the handle's pid is then the server's own, found among the wrapper's children.
    """
    host = "127.0.0.1"
    port = free_port(host)
    argv = [
        sys.executable,
        "-m",
        "bitchat",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--data-dir",
        data_dir,
        "--rate-limit",
        "0",
        "--max-connections-per-address",
        "1000000",
        "--max-connections",
        "1000000",
    ]
    if not use_uvloop:
        argv.append("--no-uvloop")
    argv.extend(extra_args)
    log_path = os.path.join(data_dir, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*wrap, *argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    handle = ServerHandle(host, port, proc.pid, True, data_dir, log_path, argv, proc)
    try:
        wait_listening(handle, timeout)
        if wrap:
            handle.pid = _server_child(proc.pid)
    except BaseException:
        handle.stop()
        raise
    return handle


def _server_child(parent: int) -> int:
    import psutil

    for child in psutil.Process(parent).children(recursive=True):
        if "bitchat" in " ".join(child.cmdline()):
            return int(child.pid)
    return parent


def seed_users(db_path: str, users: Sequence[UserSpec], password: str) -> None:
    """Write ``users`` (all with ``password``) and a login token each into a new database.

    Fills in each user's ``user_id`` and ``token``. The server must not be
    running yet: it loads its user cache at start.
    """
    asyncio.run(_seed(db_path, users, password))


async def _seed(db_path: str, users: Sequence[UserSpec], password: str) -> None:
    from bitchat.im.names import name_keys
    from bitchat.im.passwords import hash_password, new_token, token_digest
    from bitchat.im.sqlite import SqliteUserCenter

    logging.getLogger("bitchat.sqlite").setLevel(logging.WARNING)  # no "migrated" line
    center = SqliteUserCenter(db_path)
    await center.start()  # creates the schema
    try:
        digest = await hash_password(password)
        now = time.time()
        db = center.db
        await db.execute("BEGIN IMMEDIATE")
        await db.executemany(
            "INSERT INTO users (name, name_key, name_shape, password_hash, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [(u.name, *name_keys(u.name), digest, now) for u in users],
        )
        found = await db.execute_fetchall("SELECT name, id FROM users")
        ids: dict[str, int] = {str(r[0]): int(r[1]) for r in found}
        # One device each, its token bound to it: a token login is that device.
        await db.executemany(
            "INSERT INTO devices (user_id, name, created_at, last_seen) VALUES (?, 'bench', ?, ?)",
            [(ids[u.name], now, now) for u in users],
        )
        devices = await db.execute_fetchall("SELECT user_id, id FROM devices")
        device_of: dict[int, int] = {int(r[0]): int(r[1]) for r in devices}
        rows = []
        for u in users:
            u.user_id = int(ids[u.name])
            u.token = new_token()
            rows.append((token_digest(u.token), u.user_id, now + TOKEN_TTL, device_of[u.user_id]))
        await db.executemany(
            "INSERT INTO tokens (digest, user_id, expires_at, device_id) VALUES (?, ?, ?, ?)", rows
        )
        await db.execute("COMMIT")
    finally:
        with contextlib.suppress(Exception):
            await center.close()
