"""Sign-ups can be closed on every path (issue 10, item 12), and the client's
``-reg`` command signs up where they are open."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from bitchat import RequestError, codes
from bitchat.cli.repl import USAGE, Repl
from bitchat.im.client import IMClient
from bitchat.im.packets import Register
from conftest import WAIT, RawPeer
from im_helpers import clients_of, im_server, port_of


async def test_closed_sign_ups_refuse_register_and_auto_registration(
    tmp_path: Path, raw_connect: Callable[..., Awaitable[RawPeer]]
) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        await clients.login("houyi", "123456")  # registered while sign-ups are open
    async with im_server(tmp_path, open_registration=False) as server, clients_of(server) as c:
        im = await c.connect()
        with pytest.raises(RequestError) as info:
            await im.register("stranger", "123456")
        assert info.value.code == codes.FORBIDDEN
        assert "sign-ups are closed" in info.value.message
        # auto_register is on, but logging in registers no one either.
        assert server.settings.auto_register
        with pytest.raises(RequestError) as login:
            await im.login("stranger", "123456")
        assert login.value.code == codes.LOGIN_FAILED
        # A raw Register packet, as the report sent it: refused, nothing created.
        peer = await raw_connect(port_of(server))
        _, _, _, _, body = await peer.request(
            Register.TYPE, {"name": "sneaky", "password": "pw"}, rid=7
        )
        assert body["code"] == codes.FORBIDDEN
        with pytest.raises(RequestError):
            await im.login("sneaky", "pw")
        # Existing users still log in.
        assert (await im.login("houyi", "123456")).user_id == 1


class Screen:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        self.lines.extend(text.split("\n"))

    def __getitem__(self, i: int) -> str:
        return self.lines[i]


@pytest.mark.parametrize("open_registration", [True, False])
async def test_the_client_signs_up_with_reg(tmp_path: Path, open_registration: bool) -> None:
    assert "-reg userName password" in USAGE
    async with im_server(tmp_path, open_registration=open_registration) as server:
        screen = Screen()
        im = IMClient("127.0.0.1", port_of(server), server.settings)
        repl = Repl(im, out=screen)
        await im.connect(WAIT)
        try:
            await repl.execute("-reg houyi 123456")
            if open_registration:
                assert screen[-1] == "Registered houyi(1); log in with -lo"
                await repl.execute("-reg houyi other")
                assert screen[-1].startswith("Register failed cause: the name 'houyi' is taken")
                await repl.execute("-lo houyi 123456")
                assert screen[-1] == "Login success"
            else:
                assert screen[-1] == "Register failed cause: sign-ups are closed on this server"
            await repl.execute("-reg houyi")
            assert screen[-1] == "Usage: -reg userName password"
            assert repl.failures == 2  # a refusal and a usage line
        finally:
            await im.close()
