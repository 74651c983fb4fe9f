"""examples/bot.py, the bot in 30 lines, against a real server."""

from __future__ import annotations

import asyncio
import runpy
from pathlib import Path

from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server, port_of

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bot.py"


async def test_the_bot_answers_each_message(tmp_path: Path) -> None:
    run = runpy.run_path(str(EXAMPLE))["run"]
    async with im_server(tmp_path) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        inbox = Inbox(houyi)
        online: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        houyi.on_presence(
            lambda p: p.name == "echo-bot" and not online.done() and online.set_result(p.user_id)
        )
        await houyi.online_users(watch=True)
        bot = asyncio.ensure_future(run("127.0.0.1", port_of(server), replies=2))
        to = await asyncio.wait_for(online, WAIT)  # its login went through
        await houyi.send_p2p(to, "hello")
        await houyi.send_p2p(to, "how are you?")
        got = await inbox.wait_for(2)
        assert [m.text for m in got] == ["you said: hello", "you said: how are you?"]
        await asyncio.wait_for(bot, WAIT)  # it stops after its two replies


def test_the_bot_is_30_lines() -> None:
    lines = [line for line in EXAMPLE.read_text().splitlines() if line.strip()]
    assert len(lines) <= 30, len(lines)
