"""The README's "Put bitchat in your product" runs as written: the backend's JWT
function signs a login a real server takes, the curl lines do what the text says
against a real server, and the webhook check accepts the server's own signatures
and refuses tampered or stale ones."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from bitchat.errors import codes
from bitchat.im.client import IMClient
from bitchat.webhooks import sign
from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server, port_of
from test_api_http import closed_reason

README = Path(__file__).resolve().parent.parent / "README.md"
ADMIN = "readme-admin-token-0123456789"


def _section() -> str:
    text = README.read_text(encoding="utf-8")
    return text.split("## Put bitchat in your product", 1)[1].split("\n## ", 1)[0]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(), re.S)


def _run(code: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme_product"}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


async def test_the_backend_s_jwt_logs_a_user_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWT_SECRET", "the-product-s-secret-for-chat-logins")
    chat_token = _run(_blocks("python")[0])["chat_token"]
    settings = {"jwt_secret": "the-product-s-secret-for-chat-logins", "jwt_audience": "chat"}
    async with im_server(tmp_path, **settings) as server:
        async with IMClient("127.0.0.1", port_of(server), device="web") as im:
            ok = await im.login(jwt=chat_token("u-1001", "Ada Lovelace"))
            assert ok.name == "Ada_Lovelace"
        async with IMClient("127.0.0.1", port_of(server), device="phone") as im:
            again = await im.login(jwt=chat_token("u-1001", "Ada Lovelace"))
            assert again.user_id == ok.user_id  # the same sub, the same user


async def _curl(line: str, base: str) -> tuple[int, Any]:
    # The README's line as a shell runs it, with $S and $K set as its first line says.
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        line + ' -w "\\n%{http_code}"',
        env={"S": base, "K": ADMIN, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
    body, _, status = out.decode().rpartition("\n")
    return int(status), json.loads(body)


async def test_the_curl_lines_do_what_the_text_says(tmp_path: Path) -> None:
    lines = _blocks("sh")[0].strip().splitlines()
    assert lines[0].startswith("S=http://127.0.0.1:8864/api/v1 K=")
    make_bot, send, export, ban = lines[1:]
    async with im_server(tmp_path, admin_token=ADMIN) as server, clients_of(server) as clients:
        base = f"http://127.0.0.1:{port_of(server)}/api/v1"
        customer = await clients.login("customer")
        inbox = Inbox(customer)
        status, bot = await _curl(make_bot, base)
        assert (status, bot["id"], bot["name"]) == (201, 2, "support-bot")
        troll = await clients.login("troll")
        assert troll.user is not None and troll.user.id == 3
        status, sent = await _curl(send, base)
        assert status == 201 and sent["msg_id"] > 0
        [got] = await inbox.wait_for(1)
        assert (got.sender_id, got.text, got.msg_id) == (2, "Your order shipped", sent["msg_id"])
        status, page = await _curl(export, base)
        assert status == 200
        assert [m["text"] for m in page["messages"]] == ["Your order shipped"]
        reason = closed_reason(troll)
        status, banned = await _curl(ban, base)
        assert status == 200 and banned["banned"] is True
        assert await asyncio.wait_for(reason, WAIT) == codes.BANNED  # logged out at once


def test_the_webhook_check_takes_the_server_s_signatures_only() -> None:
    signed_by_bitchat = _run(_blocks("python")[1])["signed_by_bitchat"]
    body = b'{"id": "e1", "type": "message.stored", "data": {}}'
    header = sign("hook-secret", body)
    assert signed_by_bitchat("hook-secret", header, body)
    assert not signed_by_bitchat("other-secret", header, body)
    assert not signed_by_bitchat("hook-secret", header, body + b" ")
    stale = sign("hook-secret", body, int(time.time()) - 3600)
    assert not signed_by_bitchat("hook-secret", stale, body)
    assert not signed_by_bitchat("hook-secret", "garbage", body)
    assert not signed_by_bitchat("hook-secret", "t=abc,v1=00", body)
