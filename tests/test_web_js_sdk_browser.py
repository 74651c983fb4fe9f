"""bitchat.js, the JavaScript SDK, in a real headless Chromium (its own WebSocket, the
engine's JSON source access) chatting with a Python ``IMClient`` through a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bitchat.im.client import IMClient
from web_helpers import WAIT, WAIT_MS, chromium, running_server

pytest.importorskip("playwright")

SIGN_IN = """async () => {
    const { connect } = await import('/static/bitchat.js');
    const client = await connect(`ws://${location.host}/ws`);
    window.kim = client;
    window.got = [];
    client.on('message', (m) => window.got.push(m));
    const ok = await client.login({ name: 'kim', password: 'kim-pw' });
    return ok.user_id;
}"""

SEND = """async (to) => {
    const ack = await window.kim.sendP2P({ to, text: 'hi lee' });
    return [String(ack.msg_id), ack.seq];
}"""


async def test_the_sdk_in_chromium_chats_with_a_python_client(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server, chromium() as browser:
        port = server.address[1]
        async with IMClient("127.0.0.1", port) as lee:
            await lee.login("lee", "lee-pw")
            assert lee.user is not None
            inbox: asyncio.Queue[Any] = asyncio.Queue()
            receipts: asyncio.Queue[Any] = asyncio.Queue()
            lee.on_message(inbox.put_nowait)
            lee.on_receipt(receipts.put_nowait)

            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"http://127.0.0.1:{port}/")
            kim_id = await page.evaluate(SIGN_IN)

            # Python -> browser: the id arrives exact (past 2^53), and the SDK acks it.
            ack = await lee.send_p2p(kim_id, "hello kim")
            await page.wait_for_function("window.got.length === 1", timeout=WAIT_MS)
            got = await page.evaluate("[String(window.got[0].msg_id), window.got[0].text]")
            assert got == [str(ack.msg_id), "hello kim"]
            receipt = await asyncio.wait_for(receipts.get(), WAIT)
            assert (receipt.kind, receipt.user_id, receipt.seq) == ("delivered", kim_id, ack.seq)

            # Browser -> Python.
            sent_id, seq = await page.evaluate(SEND, lee.user.id)
            m = await asyncio.wait_for(inbox.get(), WAIT)
            assert (str(m.msg_id), m.seq, m.text, m.sender_name) == (sent_id, seq, "hi lee", "kim")
            assert m.msg_id > 2**53  # so the exact-id path was the one taken

            await page.evaluate("window.kim.close()")
            assert errors == []
