"""``bitchat client`` logs in with a JWT: the ``-jwt TOKEN`` command and ``--jwt TOKEN``
(``BITCHAT_JWT``) at start, against a real server that takes HS256 JWTs; the lines
are ``-lo``'s, the device is kept under the token's subject, a script whose login
at start fails exits with status 1."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jwt

from bitchat.cli.devices import DeviceStore, jwt_subject
from bitchat.cli.repl import USAGE
from conftest import WAIT
from im_helpers import PYTHON, clients_of, im_server, port_of, subprocess_env
from test_repl import repl_for

SECRET = "a-secret-of-the-product-backend-32+bytes"
SLOW = 4 * WAIT  # a cold interpreter start


def token(key: str = SECRET, **claims: Any) -> str:
    """A JWT as the product's backend signs it: ``exp`` in an hour unless given."""
    claims.setdefault("exp", int(time.time()) + 3600)
    return jwt.encode(claims, key, algorithm="HS256")


async def test_jwt_command_logs_in_and_says_why_not(tmp_path: Path) -> None:
    async with im_server(tmp_path, jwt_secret=SECRET) as server:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (ada, out), clients_of(server) as c:
            failures = ada.failures
            await ada.execute(f"-jwt {token(SECRET[::-1], sub='u-1')}")
            assert out.lines[-1] == "Login failed cause: the JWT has a bad signature"
            await ada.execute(f"-jwt {token(sub='u-1', exp=int(time.time()) - 3600)}")
            assert out.lines[-1] == "Login failed cause: the JWT has expired"
            await ada.execute("-jwt not.a.jwt")
            assert out.lines[-1] == "Login failed cause: the JWT is malformed"
            await ada.execute("-jwt")
            assert out.lines[-1] == "Usage: -jwt token"
            await ada.execute("-jwt a b")
            assert out.lines[-1] == "Usage: -jwt token"
            assert ada.failures == failures + 5
            assert ada.im.user is None

            # The user the subject maps to is created at its first login, named by the claim.
            await ada.execute(f"-jwt {token(sub='u-1', name='Ada Lovelace')}")
            assert out.lines[-1] == "Login success"
            assert ada.im.user is not None and ada.im.user.name == "Ada_Lovelace"
            assert ada.failures == failures + 5
            ada_id = ada.im.user.id

            # Logged in: the commands work, and messages come in as after -lo.
            gris = await c.login("gris")
            assert gris.user is not None
            await ada.execute(f"-pc {gris.user.id} hello from ada")
            assert out.lines[-1].startswith("Send p2p message success (id ")
            await gris.send_p2p(ada_id, "hi ada")
            assert await out.expect("hi ada") == f"gris({gris.user.id}): hi ada"
        # "-jwt token" is in the command list.
        assert any(line.lstrip().startswith("-jwt token ") for line in USAGE.splitlines())


async def test_jwt_login_keeps_its_device_under_the_subject(tmp_path: Path) -> None:
    path = tmp_path / "config" / "bitchat" / "devices.json"
    async with im_server(tmp_path / "data", jwt_secret=SECRET) as server:
        port, s = port_of(server), server.settings
        where = f"127.0.0.1:{port}"
        store = DeviceStore(path, where)
        async with repl_for(port, s, devices=store) as (ada, out):
            await ada.execute(f"-jwt {token(sub='U-1', name='ada')}")
            assert out.lines[-1] == "Login success"
            first = ada.im.device
            assert first and json.loads(path.read_text()) == {f"{where} jwt U-1": first}
        # The next run, with a new token of the same subject, is the same device.
        async with repl_for(port, s, devices=store) as (again, out):
            await again.execute(f"-jwt {token(sub='U-1', name='ada')}")
            assert out.lines[-1] == "Login success"
            assert again.im.device == first
            # A subject is matched exactly: u-1 is another user, with a device of its own.
            await again.execute(f"-jwt {token(sub='u-1', name='ada')}")
            assert out.lines[-1] == "Login success"
            assert again.im.user is not None and again.im.user.name != "ada"
            other = again.im.device
            assert other and other != first
        assert json.loads(path.read_text()) == {
            f"{where} jwt U-1": first,
            f"{where} jwt u-1": other,
        }
    assert jwt_subject("not.a.jwt") == ""
    assert jwt_subject(token(sub=7)) == ""  # not a string: not a key


async def run_client(
    port: int, script: str, *argv: str, env: dict[str, str] | None = None
) -> tuple[int, list[str]]:
    """``bitchat client`` fed ``script`` through a pipe: its exit status and lines."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bitchat",
        "client",
        "--port",
        str(port),
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=subprocess_env() | (env or {}),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(script.encode()), SLOW)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines()


async def test_client_process_logs_in_with_a_jwt_at_start(tmp_path: Path) -> None:
    async with im_server(tmp_path, jwt_secret=SECRET) as server, clients_of(server) as c:
        port = port_of(server)
        gris = await c.login("gris")

        # --jwt: logged in before the first line of the script.
        status, lines = await run_client(port, "-lu\nbye\n", "--jwt", token(sub="u-9", name="ada"))
        assert status == 0, lines
        assert lines == [
            f"Connected to 127.0.0.1:{port}",
            "Login success",
            "userName(userId)",
            "----------------",
            "gris(1)",
            "ada(2)",
            "bye bye!",
        ]

        # BITCHAT_JWT does the same; the device was kept, so what it missed is pushed.
        await gris.send_p2p(2, "waiting for you")
        status, lines = await run_client(port, "-gl\n", env={"BITCHAT_JWT": token(sub="u-9")})
        assert status == 0, lines
        assert lines[1] == "Login success, 1 missed message(s)"
        assert sorted(lines[2:]) == ["No groups", "gris(1): waiting for you"]

        # A refused token: the -lo failure line, and a script exits with status 1.
        status, lines = await run_client(port, "", "--jwt", token(SECRET[::-1], sub="u-9"))
        assert status == 1, lines
        assert lines[1:] == ["Login failed cause: the JWT has a bad signature"], lines

        # Not a token at all: refused before connecting.
        status, lines = await run_client(port, "", "--jwt", "two words")
        assert status == 2
        assert lines == ["bitchat client: --jwt: expected a JWT (one word, no spaces)"]
