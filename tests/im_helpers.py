"""Helpers of the IM tests: a real standalone server on loopback, logged-in clients.

Servers listen on 127.0.0.1 port 0 with their SQLite database in the test's
``tmp_path``; password hashing is made cheap through ``Settings`` (the
production cost is ~50 ms a login); every wait has the suite's ``WAIT`` timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bitchat import Server, Settings
from bitchat.app import build_server
from bitchat.im.client import IMClient
from bitchat.im.packets import ChatMessage
from conftest import WAIT

FAST_HASH = {"password_hash_time_cost": 1, "password_hash_memory_kib": 8}


def im_settings(data_dir: Path | str, **changes: Any) -> Settings:
    """Short timers, cheap password hashing, no rate limit; ``changes`` on top."""
    base: dict[str, Any] = {
        "data_dir": str(data_dir),
        "read_idle_timeout": 5.0,
        "heartbeat_interval": 1.0,
        "request_timeout": WAIT,
        "connect_timeout": WAIT,
        "reconnect_initial_delay": 0.01,
        "reconnect_max_delay": 0.05,
        "shutdown_grace": 2.0,
        "rate_limit": 0,
        "worker_threads": 2,
        **FAST_HASH,
    }
    base.update(changes)
    return Settings(**base)


@contextlib.asynccontextmanager
async def im_server(data_dir: Path | str, port: int = 0, **changes: Any) -> AsyncIterator[Server]:
    """A running standalone IM server; ``changes`` are Settings fields."""
    server = build_server(im_settings(data_dir, host="127.0.0.1", port=port, **changes))
    async with server:
        yield server


def port_of(server: Server) -> int:
    return server.address[1]


class Inbox:
    """Collects the chat messages an IMClient receives; waits for them by count."""

    def __init__(self, im: IMClient) -> None:
        self.messages: list[ChatMessage] = []
        self._changed = asyncio.Event()
        im.on_message(self._add)

    def _add(self, m: ChatMessage) -> None:
        self.messages.append(m)
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = WAIT) -> list[ChatMessage]:
        """The first ``n`` messages, once they have arrived."""

        async def arrived() -> None:
            while len(self.messages) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(arrived(), timeout)
        return self.messages[:n]

    @property
    def texts(self) -> list[str]:
        return [m.text for m in self.messages]


class Clients:
    """Opens IMClients to one server and closes them all at the end."""

    def __init__(self, port: int, settings: Settings) -> None:
        self.port = port
        self.settings = settings
        self.opened: list[IMClient] = []

    async def connect(self, **kw: Any) -> IMClient:
        im = IMClient("127.0.0.1", self.port, self.settings, **kw)
        self.opened.append(im)
        await im.connect(WAIT)
        return im

    async def login(self, name: str, password: str = "secret", **kw: Any) -> IMClient:
        # One device per user unless a test names another: logging in again is the same
        # device coming back (a new device would start at the read position).
        kw.setdefault("device", f"dev-{name}")
        im = await self.connect(**kw)
        await im.login(name, password)
        return im

    async def close(self) -> None:
        for im in self.opened:
            await im.close()


@contextlib.asynccontextmanager
async def clients_of(server: Server) -> AsyncIterator[Clients]:
    c = Clients(port_of(server), server.settings)
    try:
        yield c
    finally:
        await c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env() -> dict[str, str]:
    """The environment of ``python -m bitchat`` child processes."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


async def pending_of(im: Any, user_id: int, device: str) -> int:
    """How many messages the store keeps for the user's device (by its name)."""
    device_id, _ = await im.users.device(user_id, device, im.settings.max_devices_per_user)
    return int(await im.messages.count_pending(user_id, device_id))
