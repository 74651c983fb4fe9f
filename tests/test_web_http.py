"""HTTP on the server's port: the page's files, the status API, /healthz, /metrics, bad input.

Requests go through a real HTTP client (httpx) or, for bad input, a raw socket;
the server is the full standalone one on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from bitchat import Server
from bitchat.im.client import IMClient
from bitchat.web.status import authorize, is_loopback
from web_helpers import (
    LOGIN,
    PING,
    PONG,
    RESPONSE,
    WAIT,
    frame,
    running_server,
    server_fixture,  # noqa: F401 (fixture)
    unframe,
)


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    base = f"http://127.0.0.1:{server.address[1]}"
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
        yield client


async def raw_exchange(port: int, *chunks: bytes) -> bytes:
    """Send ``chunks`` on a fresh connection; everything the server says until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


# -- the page ---------------------------------------------------------------------------------


async def test_chat_page_and_its_files(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    # Image previews are blob: URLs the page fetched with its token; still no inline script.
    assert "img-src 'self' data: blob:" in csp and "unsafe-inline" not in csp
    html = page.text
    # Everything it loads is on this server: no CDN, no build step.
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("/static/") for r in refs), refs
    types = {
        "/static/app.js": "text/javascript; charset=utf-8",
        "/static/style.css": "text/css; charset=utf-8",
        "/static/icon.svg": "image/svg+xml",
    }
    for ref in set(refs):
        asset = await http.get(ref)
        assert asset.status_code == 200, ref
        assert asset.headers["content-type"] == types[ref]
        assert asset.content
    app_js = (await http.get("/static/app.js")).text
    assert "http://" not in app_js and "https://" not in app_js
    # Its one import is the JS SDK, from this server; the SDK imports nothing.
    assert re.findall(r"^(?:import|export) .* from '([^']+)';$", app_js, re.MULTILINE) == [
        "./bitchat.js",
        "./bitchat.js",
    ]
    sdk = await http.get("/static/bitchat.js")
    assert sdk.status_code == 200
    assert sdk.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "http://" not in sdk.text and "https://" not in sdk.text
    assert not re.search(r"^(import|export .* from)\b", sdk.text, re.MULTILINE)


async def test_etag_and_head(http: httpx.AsyncClient) -> None:
    first = await http.get("/static/style.css")
    etag = first.headers["etag"]
    again = await http.get("/static/style.css", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    head = await http.head("/")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len((await http.get("/")).content)


async def test_healthz(http: httpx.AsyncClient) -> None:
    r = await http.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["mode"] == "standalone"


# -- the status API ---------------------------------------------------------------------------


async def test_status_channels_and_sessions(server: Server, http: httpx.AsyncClient) -> None:
    port = server.address[1]
    started = time.time()
    async with IMClient("127.0.0.1", port) as tcp, connect(f"ws://127.0.0.1:{port}/ws") as ws:
        me = await tcp.login("tina", "pw")
        await ws.send(frame(LOGIN, {"name": "walt", "password": "pw"}, rid=1))
        flags, _, _, walt = unframe(await asyncio.wait_for(ws.recv(), WAIT))
        assert flags == RESPONSE
        async with connect(f"ws://127.0.0.1:{port}/ws") as anonymous:
            await anonymous.send(frame(PING, rid=2))
            assert unframe(await asyncio.wait_for(anonymous.recv(), WAIT))[1] == PONG

            r = await http.get("/status/channels")
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/json"
            channels = r.json()
            assert channels["count"] == 3
            rows = channels["channels"]
            assert [(c["transport"], c["user_name"]) for c in rows] == [
                ("tcp", "tina"),
                ("ws", "walt"),
                ("ws", None),
            ]
            assert [c["user_id"] for c in rows] == [me.user_id, walt["user_id"], None]
            for c in rows:
                assert set(c) == {
                    "id",
                    "remote",
                    "transport",
                    "user_id",
                    "user_name",
                    "connected_since",
                    "bytes_in",
                    "bytes_out",
                }
                assert c["remote"].startswith("127.0.0.1:")
                assert started - 1 <= c["connected_since"] <= time.time()
                assert c["bytes_in"] > 0 and c["bytes_out"] > 0
            assert rows[0]["id"] < rows[1]["id"] < rows[2]["id"]

            r = await http.get("/status/sessions")
            sessions = r.json()
            assert (sessions["count"], sessions["users"]) == (2, 2)
            assert [(s["user_name"], s["transport"]) for s in sessions["sessions"]] == [
                ("tina", "tcp"),
                ("walt", "ws"),
            ]
            assert all(s["login_at"] >= s["connected_since"] for s in sessions["sessions"])


async def test_status_needs_the_admin_token_when_one_is_set(tmp_path: Path) -> None:
    async with running_server(tmp_path, admin_token="s3cret-token") as server:
        base = f"http://127.0.0.1:{server.address[1]}"
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
            for path in ("/status/channels", "/status/sessions"):
                missing = await http.get(path)
                assert missing.status_code == 401
                assert missing.headers["www-authenticate"].startswith("Bearer")
                wrong = await http.get(path, headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 403
                basic = await http.get(path, headers={"Authorization": "Basic czNjcmV0"})
                assert basic.status_code == 401
                ok = await http.get(path, headers={"Authorization": "Bearer s3cret-token"})
                assert ok.status_code == 200 and ok.json()["count"] == 0
            # Health and metrics stay open to monitoring.
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/metrics")).status_code == 200


def test_status_without_a_token_is_for_loopback_clients_only() -> None:
    assert authorize(None, None, "127.0.0.1") is None
    assert authorize(None, None, "127.8.9.10") is None
    assert authorize(None, None, "::1") is None
    assert authorize(None, None, "::ffff:127.0.0.1") is None
    for outside in ("10.1.2.3", "192.168.0.9", "2001:db8::1", "::ffff:10.0.0.1", ""):
        refused = authorize(None, None, outside)
        assert refused is not None and refused[0] == 403
    # With a token, the address does not matter, only the token.
    assert authorize("t", b"Bearer t", "10.1.2.3") is None
    assert authorize("t", None, "127.0.0.1") == (401, authorize("t", None, "::1")[1])  # type: ignore[index]
    assert is_loopback("127.0.0.1") and not is_loopback("not an address")


def _outside_address() -> str | None:
    """This machine's own non-loopback IPv4 address, if it has one (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


async def test_status_refuses_a_non_loopback_client_over_the_network(tmp_path: Path) -> None:
    addr = _outside_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    from bitchat.app import build_server
    from web_helpers import web_settings

    server = build_server(web_settings(tmp_path, host=addr, port=0))
    async with server:
        base = f"http://{addr}:{server.address[1]}"
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
            r = await http.get("/status/channels")
            assert r.status_code == 403 and "loopback" in r.json()["error"]
            assert (await http.get("/healthz")).status_code == 200


# -- metrics ----------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics(server: Server, http: httpx.AsyncClient) -> None:
    port = server.address[1]
    async with IMClient("127.0.0.1", port) as a, IMClient("127.0.0.1", port) as b:
        await a.login("mia", "pw")
        me_b = await b.login("max", "pw")
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send(frame(LOGIN, {"name": "mo", "password": "pw"}, rid=1))
            await asyncio.wait_for(ws.recv(), WAIT)
            await a.send_p2p(me_b.user_id, "one")
            group = await a.create_group("metrics")
            await b.join_group(group.group_id)
            await a.send_group(group.group_id, "two")
            with pytest.raises(Exception, match="not_found"):
                await a.send_p2p(999_999, "nobody")
            r = await http.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=")
            m = _samples(r.text)
    assert m[("bitchat_connections", (("transport", "tcp"),))] == 2
    assert m[("bitchat_connections", (("transport", "ws"),))] == 1
    assert m[("bitchat_connections_opened_total", (("transport", "ws"),))] == 1
    assert m[("bitchat_logins_total", ())] == 3
    assert m[("bitchat_messages_total", (("kind", "p2p"),))] == 1
    assert m[("bitchat_messages_total", (("kind", "group"),))] == 1
    assert m[("bitchat_errors_total", (("code", "not_found"),))] == 1
    assert m[("bitchat_handler_seconds_count", (("packet", "Login"),))] >= 3
    assert m[("bitchat_handler_seconds_bucket", (("le", "+Inf"), ("packet", "SendP2P")))] >= 1
    assert m[("bitchat_http_requests_total", (("route", "/ws"), ("status", "101")))] == 1


# -- bad HTTP input ---------------------------------------------------------------------------


def _status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:80]
    return int(response[9:12])


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",  # a header line without a colon
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",  # a control byte in the target
        b"GET\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / FTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\rHost: x\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400_and_a_close(server: Server, request_bytes: bytes) -> None:
    response = await raw_exchange(server.address[1], request_bytes)
    assert _status_of(response) == 400
    assert b"\r\nconnection: close\r\n" in response.lower()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
)
async def test_unsupported_http_gets_its_status_and_a_close(
    server: Server, request_bytes: bytes, status: int
) -> None:
    response = await raw_exchange(server.address[1], request_bytes)
    assert _status_of(response) == status
    assert b"\r\nconnection: close\r\n" in response.lower()


async def test_oversized_headers_get_431(server: Server) -> None:
    limit = server.settings.max_http_header_size
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (limit + 10) + b"\r\n\r\n"
    response = await raw_exchange(server.address[1], big[:100], big[100:])
    assert _status_of(response) == 431
    # Many small headers add up the same way.
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * (limit // 8 + 10) + b"\r\n"
    assert _status_of(await raw_exchange(server.address[1], many)) == 431


async def test_unknown_paths_are_404_and_wrong_methods_405(http: httpx.AsyncClient) -> None:
    for path in ("/nope", "/static/", "/static/missing.js", "/static/../server.py", "/status"):
        r = await http.get(path)
        assert r.status_code == 404, path
    for method, path in [
        ("POST", "/"),
        ("PUT", "/static/app.js"),
        ("DELETE", "/status/channels"),
        ("POST", "/metrics"),
        ("OPTIONS", "/healthz"),
        ("PATCH", "/ws"),
    ]:
        r = await http.request(method, path, content=b"{}" if method != "OPTIONS" else None)
        assert r.status_code == 405, (method, path)
        assert r.headers["allow"] == "GET, HEAD"
    # The connection stays usable after a 404 or a 405.
    assert (await http.get("/healthz")).status_code == 200


async def test_large_bodies_are_refused_with_413(server: Server) -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    assert _status_of(await raw_exchange(server.address[1], head)) == 413


async def test_not_http_and_not_bitchat_is_closed(server: Server) -> None:
    port = server.address[1]
    for first in (b"\x16\x03\x01\x02\x00\x01", b"hello\r\n", b"GETX / HTTP/1.1\r\n\r\n", b"\x00"):
        assert await raw_exchange(port, first) == b"", first


async def test_a_request_fed_byte_by_byte(server: Server) -> None:
    request_bytes = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    chunks = [request_bytes[i : i + 1] for i in range(len(request_bytes))]
    response = await raw_exchange(server.address[1], *chunks)
    assert _status_of(response) == 200 and b'"status": "ok"' in response


async def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    two = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    response = await raw_exchange(server.address[1], two)
    statuses = [int(m) for m in re.findall(rb"HTTP/1.1 (\d{3}) ", response)]
    assert statuses == [200, 404, 200]


async def test_slow_and_idle_http_connections_are_closed(tmp_path: Path) -> None:
    async with running_server(tmp_path, http_timeout=0.3) as server:
        port = server.address[1]
        # Half a request, then nothing: 408.
        assert _status_of(await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n")) == 408
        # A keep-alive connection left idle after its answer: closed without a word more.
        response = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status_of(response) == 200 and response.count(b"HTTP/1.1") == 1


async def test_bad_input_does_not_disturb_other_connections(server: Server) -> None:
    port = server.address[1]
    async with IMClient("127.0.0.1", port) as tcp, connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await tcp.login("steady", "pw")
        await ws.send(frame(LOGIN, {"name": "calm", "password": "pw"}, rid=1))
        _, _, _, calm = unframe(await asyncio.wait_for(ws.recv(), WAIT))

        bad: list[Any] = [
            raw_exchange(port, b"GET / HTTP/1.1\r\nHost x\r\n\r\n"),
            raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n"),
            raw_exchange(
                port, b"DELETE /status/channels HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            ),
            raw_exchange(port, b"\x16\x03\x01garbage"),
            raw_exchange(port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"),
        ]
        results = await asyncio.gather(*bad)
        assert [_status_of(r) if r else None for r in results] == [400, 431, 405, None, 400]

        # Both steady connections still work, both ways.
        ack = await tcp.send_p2p(calm["user_id"], "still here?")
        _, _, _, pushed = unframe(await asyncio.wait_for(ws.recv(), WAIT))
        assert (pushed["msg_id"], pushed["text"]) == (ack.msg_id, "still here?")
        await ws.send(frame(PING, rid=9))
        assert unframe(await asyncio.wait_for(ws.recv(), WAIT)) == (RESPONSE, PONG, 9, {})
