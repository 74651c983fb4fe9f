"""`bitchat client --tls-ca` against a standalone server speaking TLS."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from bitchat.app import build_server
from bitchat.settings import Settings
from test_server import self_signed

WAIT = 30.0


async def run_client(port: int, *extra: str, script: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bitchat",
        "client",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(script.encode()), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_client_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    settings = Settings(
        host="127.0.0.1",
        port=0,
        data_dir=str(tmp_path / "data"),
        tls_cert=cert,
        tls_key=key,
        password_hash_time_cost=1,
        password_hash_memory_kib=8,
    )
    server = build_server(settings)
    async with server:
        port = server.address[1]
        code, out, err = await run_client(port, "--tls-ca", cert, script="-lo houyi 123456\n-lu\n")
        assert code == 0, (out, err)
        assert "Login success" in out
        assert "houyi(1)" in out

        # Without trusting the self-signed certificate the client cannot get in, and
        # says why once, instead of "Cannot reach ...; retrying..." for ever.
        code, out, _ = await run_client(port, "--tls", script="-lo houyi 123456\n")
        assert code == 1
        assert out.splitlines() == [
            f"Cannot connect to 127.0.0.1:{port}: certificate verify failed: "
            "self-signed certificate; not retrying",
            "Login failed cause: certificate verify failed: self-signed certificate",
        ]

        # A client without TLS at the TLS port: named, never "Connected".
        code, out, _ = await run_client(port, script="-lo houyi 123456\n-lu\n")
        assert code == 1
        assert out.splitlines() == [
            f"Cannot connect to 127.0.0.1:{port}: the server speaks TLS: use --tls; not retrying",
            "Login failed cause: the server speaks TLS: use --tls",
            "List online user failed cause: the server speaks TLS: use --tls",
        ]


async def test_client_with_tls_at_a_plain_port(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    settings = Settings(host="127.0.0.1", port=0, data_dir=str(tmp_path / "data"))
    server = build_server(settings)
    async with server:
        port = server.address[1]
        code, out, err = await run_client(port, "--tls-ca", cert, script="-lo houyi 123456\n")
        assert code == 1, (out, err)
        assert out.splitlines() == [
            f"Cannot connect to 127.0.0.1:{port}: the server does not speak TLS: "
            "connect without --tls; not retrying",
            "Login failed cause: the server does not speak TLS: connect without --tls",
        ]


async def test_bad_ca_file(tmp_path: Path) -> None:
    code, _, err = await run_client(1, "--tls-ca", str(tmp_path / "missing.pem"), script="")
    assert code == 2
    assert "--tls-ca" in err
