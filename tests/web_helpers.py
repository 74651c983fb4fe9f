"""Shared pieces of the web tests: a real standalone server, raw frames, headless Chromium.

Servers listen on 127.0.0.1 port 0 with the full web frontend (the one
``bitchat server`` runs). Frames are packed by hand from DESIGN.md section 2.
Chromium is Debian's ``/usr/bin/chromium``, driven by Playwright; it is never
downloaded. Without it the browser tests skip, except under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bitchat import Server, Settings
from bitchat.app import build_server

WAIT = 5.0 * float(os.environ.get("BITCHAT_TEST_TIMEOUT_FACTOR", "1"))
"""Seconds any test waits for an event before failing."""
WAIT_MS = WAIT * 1000

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

_HEADER = struct.Struct(">BBBBHII")
RESPONSE, ERROR = 2, 4
PING, PONG, ERR = 1, 2, 3
LOGIN, LOGIN_OK, LIST_ONLINE, SEND_P2P, SEND_ACK, CHAT, ACK = 103, 104, 106, 110, 112, 113, 114


def web_settings(tmp_path: Path, **changes: Any) -> Settings:
    """Settings of a test server: its own data folder, no rate limit, quick timers."""
    base = Settings(
        data_dir=str(tmp_path),
        rate_limit=0,
        request_timeout=WAIT,
        connect_timeout=WAIT,
        reconnect_initial_delay=0.01,
        reconnect_max_delay=0.2,
        shutdown_grace=1.0,
        worker_threads=4,
    )
    return base.replace(**changes)


@contextlib.asynccontextmanager
async def running_server(tmp_path: Path, **changes: Any) -> AsyncIterator[Server]:
    """A started standalone server (web frontend included) on 127.0.0.1, port 0."""
    server = build_server(web_settings(tmp_path, host="127.0.0.1", port=0, **changes))
    async with server:
        yield server


def frame(
    type_: int,
    body: Any = None,
    *,
    rid: int = 0,
    flags: int = 0,
    ser: int = 1,
    magic: int = 0xBC,
    version: int = 1,
    raw: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """One frame packed by hand (JSON body unless ``raw``)."""
    payload = orjson.dumps({} if body is None else body) if raw is None else raw
    n = len(payload) if length is None else length
    return _HEADER.pack(magic, version, ser, flags, type_, rid, n) + payload


def unframe(data: bytes) -> tuple[int, int, int, Any]:
    """(flags, type, request id, body) of exactly one JSON frame."""
    magic, version, ser, flags, type_, rid, n = _HEADER.unpack_from(data)
    assert (magic, version, ser) == (0xBC, 1, 1)
    assert len(data) == 14 + n, "a WebSocket message holds exactly one frame"
    return flags, type_, rid, orjson.loads(data[14:]) if n else {}


def chromium_or_skip() -> str:
    """The Chromium binary, or skip (fail under CI=true) when it is not installed."""
    if os.path.exists(CHROMIUM) or shutil.which(CHROMIUM):
        return CHROMIUM
    reason = f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium browser (Playwright), closed afterwards."""
    path = chromium_or_skip()
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # pragma: no cover - playwright is a dev dependency
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("playwright is not installed")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


def artifact(name: str) -> Path:
    """A path in test-artifacts/ (git-ignored) for screenshots and the like."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


# Fixtures a test module takes by importing them (their names: ``server``, ``browser``).


@pytest.fixture(name="server")
async def server_fixture(tmp_path: Path) -> AsyncIterator[Server]:
    """A running standalone server on loopback, its data in the test's folder."""
    async with running_server(tmp_path) as srv:
        yield srv


@pytest.fixture(name="browser")
async def browser_fixture() -> AsyncIterator[Any]:
    """Debian's headless Chromium, through Playwright."""
    async with chromium() as b:
        yield b
