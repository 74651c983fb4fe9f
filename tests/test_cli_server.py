"""``bitchat server`` as a user runs it: a subprocess, a raw Ping, then SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import sys
from pathlib import Path

import pytest

from conftest import WAIT as BASE_WAIT

WAIT = 4 * BASE_WAIT  # a cold interpreter start, imports, database setup
H = struct.Struct(">BBBBHII")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("loop_flag", [[], ["--no-uvloop"]], ids=["uvloop", "asyncio"])
async def test_bitchat_server_starts_answers_and_stops(
    tmp_path: Path, loop_flag: list[str]
) -> None:
    pytest.importorskip("bitchat.app")
    port = free_port()
    data_dir = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bitchat",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *loop_flag,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:

        async def line_with(text: str) -> str:
            while True:
                raw = await proc.stderr.readline()  # type: ignore[union-attr]
                if not raw:
                    raise AssertionError(f"no {text!r} before exit:\n" + "".join(log))
                log.append(raw.decode())
                if text in log[-1]:
                    return log[-1]

        started = await asyncio.wait_for(line_with("bitchat server started on"), WAIT)
        assert f"127.0.0.1:{port}" in started and "mode: standalone" in started
        if not loop_flag:
            assert "loop: uvloop" in started

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(H.pack(0xBC, 1, 1, 0, 1, 4242, 2) + b"{}")
        head = await asyncio.wait_for(reader.readexactly(14), WAIT)
        assert H.unpack(head)[:6] == (0xBC, 1, 1, 2, 2, 4242)  # Pong, RESPONSE, same id
        await asyncio.wait_for(reader.readexactly(H.unpack(head)[6]), WAIT)

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # our connection is closed
        writer.close()
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        log.extend(line.decode() for line in (await proc.stderr.read()).splitlines(True))
        text = "".join(log)
        assert "received SIGTERM" in text
        assert "bitchat server stopped" in text
        assert "Traceback" not in text and "ERROR" not in text, text
        assert data_dir.is_dir()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
