"""HTTP errors as a peer can provoke them, over raw sockets to a real server: an
answer to HEAD never has a body (errors included), nothing reaches the log as a
traceback, and a request trickled one byte at a time is still cut at http_timeout."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bitchat import Server
from web_helpers import WAIT, running_server

HTTP_TIMEOUT = 0.5


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path, http_timeout=HTTP_TIMEOUT) as srv:
        yield srv


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request``; everything the server says until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


def split(response: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers (lower-case names) and body of one response."""
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep, response[:200]
    status, *lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    return status, headers, body


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert not bad, [f"{r.levelname} {r.getMessage()}" for r in bad]


@pytest.mark.parametrize(
    ("request_bytes", "status_line"),
    [
        (
            b"HEAD / HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n",
            b"HTTP/1.1 413 Content Too Large",
        ),
        (b"HEAD / HTTP/1.9\r\nHost: x\r\n\r\n", b"HTTP/1.1 505 HTTP Version Not Supported"),
        (b"HEAD http://[x/ HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
        (b"HEAD /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", b"HTTP/1.1 405"),
        # Part of a declared body, then nothing: the deadline answers.
        (
            b"HEAD / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
            b"HTTP/1.1 408 Request Timeout",
        ),
    ],
)
async def test_an_error_answer_to_head_has_no_body_and_no_traceback(
    server: Server,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
    status_line: bytes,
) -> None:
    caplog.set_level(logging.INFO, logger="bitchat")
    for _ in range(3):  # one per request would fill the log: none at all
        response = await exchange(server.address[1], request_bytes)
        status, headers, body = split(response)
        assert status.startswith(status_line), status
        assert body == b""  # status line and headers only
        assert headers[b"connection"] == b"close" and int(headers[b"content-length"]) > 0
    no_tracebacks(caplog)
    # The server still answers.
    ok = await exchange(
        server.address[1], b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert split(ok)[0] == b"HTTP/1.1 200 OK"


async def test_505_has_its_reason_phrase_and_a_body_for_get(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    response = await exchange(server.address[1], b"GET / HTTP/1.9\r\nHost: x\r\n\r\n")
    status, headers, body = split(response)
    assert status == b"HTTP/1.1 505 HTTP Version Not Supported"
    assert body == b"HTTP Version Not Supported: HTTP/1.9 is not spoken here\n"
    assert int(headers[b"content-length"]) == len(body)
    no_tracebacks(caplog)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400 + b"\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n" + b"a" * 400,
    ],
    ids=["head", "body"],
)
async def test_a_request_trickled_byte_by_byte_is_cut_at_http_timeout(
    server: Server, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.address[1])
    gap = HTTP_TIMEOUT / 10
    started = time.monotonic()
    try:
        # A byte every tenth of the deadline: were the timer restarted by every byte,
        # the connection would last the whole trickle (about 40 deadlines).
        for i in range(len(request_bytes)):
            if reader.at_eof() or writer.is_closing():
                break
            writer.write(request_bytes[i : i + 1])
            try:
                await writer.drain()
            except ConnectionError:
                break
            with_answer = await _read_for(reader, gap)
            if with_answer:
                rest = await asyncio.wait_for(reader.read(), WAIT)
                response = with_answer + rest
                break
        else:
            pytest.fail("the whole trickled request was read")
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    assert split(response)[0] == b"HTTP/1.1 408 Request Timeout"
    # Cut near one deadline, far from the trickle's ~20 s.
    assert HTTP_TIMEOUT * 0.9 <= elapsed < HTTP_TIMEOUT + 3.0, elapsed
    no_tracebacks(caplog)


async def _read_for(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What arrives within ``seconds`` (the trickle's pace: b"" if nothing)."""
    try:
        return await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return b""
