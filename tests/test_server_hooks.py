"""The Server's lifecycle hooks in order: on_startup, listening, on_started, then
on_stopping, on_shutdown (a cluster node announces itself in on_started)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bitchat import Server, Settings
from conftest import WAIT


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_hooks_run_in_order_and_on_started_once_the_port_listens(
    settings: Settings,
) -> None:
    server = Server("127.0.0.1", 0, settings)
    seen: list[str] = []

    async def startup(s: Server) -> None:
        seen.append("startup")

    async def started(s: Server) -> None:
        seen.append(f"started, listening: {accepts(s.address[1])}")

    async def stopping(s: Server) -> None:
        seen.append("stopping")

    async def shutdown(s: Server) -> None:
        seen.append("shutdown")

    server.on_startup.append(startup)
    server.on_started.append(started)
    server.on_stopping.append(stopping)
    server.on_shutdown.append(shutdown)
    async with server:
        assert seen == ["startup", "started, listening: True"]
    assert seen[2:] == ["stopping", "shutdown"]


async def test_a_failing_started_hook_stops_the_server(settings: Settings) -> None:
    server = Server("127.0.0.1", 0, settings)
    shut: list[bool] = []

    async def broken(s: Server) -> None:
        raise RuntimeError("cannot announce")

    async def shutdown(s: Server) -> None:
        shut.append(True)

    server.on_started.append(broken)
    server.on_shutdown.append(shutdown)
    with pytest.raises(RuntimeError, match="cannot announce"):
        await server.start()
    port = server.address[1]
    assert shut == [True] and not accepts(port)
    server.on_started.clear()
    async with server:  # and it can be started once the cause is gone
        assert accepts(server.address[1])


async def test_a_stop_while_a_started_hook_runs_stops_the_server(
    settings: Settings,
) -> None:
    """stop() called while an on_started hook runs: the server stops cleanly."""
    server = Server("127.0.0.1", 0, settings)
    began, go_on = asyncio.Event(), asyncio.Event()

    async def slow(s: Server) -> None:
        began.set()
        await go_on.wait()

    server.on_started.append(slow)
    starting = asyncio.create_task(server.start())
    await asyncio.wait_for(began.wait(), WAIT)
    await asyncio.wait_for(server.stop(), WAIT)
    go_on.set()
    await asyncio.wait_for(starting, WAIT)
    assert server.stopping
