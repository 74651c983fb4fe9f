"""``bitchat client``: -edit, -recall, -reply, -react, -unreact, -delete, and how
received edits, recalls and reactions and ``-hi`` show them (in process)."""

from __future__ import annotations

import re
from pathlib import Path

from im_helpers import im_server, port_of
from test_repl import repl_for


def _id(line: str, what: str) -> int:
    found = re.fullmatch(rf"{what} success \(id (\d+)\)", line)
    assert found is not None, line
    return int(found.group(1))


async def test_messages_that_live_in_the_terminal(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (houyi, h_out), repl_for(port, s) as (gris, g_out):
            await houyi.execute("-lo houyi 123456")
            await gris.execute("-lo gris 123456")
            await gris.execute("-pc 1 helo houyi")
            first = _id(g_out.lines[-1], "Send p2p message")
            await h_out.expect("gris(2): helo houyi")

            await gris.execute(f"-edit {first} hello houyi")
            assert g_out.lines[-1] == f"Edit success (id {first})"
            assert await h_out.expect("edited") == f"gris(2) edited {first}: hello houyi (edited)"

            await houyi.execute(f"-react {first} 👍")
            assert h_out.lines[-1] == f"React success (id {first})"
            assert await g_out.expect("reacted") == f"houyi(1) reacted 👍 to message {first}"

            await houyi.execute(f"-reply {first} hi gris")
            reply = _id(h_out.lines[-1], "Reply")
            await g_out.expect("houyi(1): hi gris")

            await gris.execute("-pc 1 oops")
            oops = _id(g_out.lines[-1], "Send p2p message")
            await gris.execute(f"-recall {oops}")
            assert g_out.lines[-1] == f"Recall success (id {oops})"
            assert await h_out.expect("recalled") == f"gris(2) recalled message {oops}"

            m = h_out.mark()
            await houyi.execute("-hi 2")
            lines = h_out.since(m)
            assert len(lines) == 3, lines
            assert lines[0].endswith(f"(id {first}) gris(2): hello houyi (edited) [👍 1]")
            assert lines[1].endswith(f"(id {reply}) houyi(1): [reply to gris: hello houyi] hi gris")
            assert lines[2].endswith(f"(id {oops}) gris(2): (recalled)")

            await houyi.execute(f"-unreact {first} 👍")
            assert h_out.lines[-1] == f"Unreact success (id {first})"
            await houyi.execute(f"-delete {reply}")
            assert h_out.lines[-1] == f"Delete success (id {reply})"
            m = h_out.mark()
            await houyi.execute("-hi 2")
            assert len(h_out.since(m)) == 2

            # Refusals: one line each, naming the cause.
            await houyi.execute(f"-edit {first} mine now")
            assert h_out.lines[-1].startswith("Edit failed cause: ")
            assert "sender" in h_out.lines[-1]
            await houyi.execute("-recall 12345")
            assert h_out.lines[-1].startswith("Recall failed cause: ")
            await houyi.execute("-reply 12345 hm")
            assert h_out.lines[-1].startswith("Reply failed cause: ")
            await houyi.execute("-react 1")
            assert h_out.lines[-1] == "Usage: -react msgId emoji"
