"""Terminal escapes from other users: ``bitchat client`` shows them, never obeys them.

A message, a group name or an error message comes from the server, so from any
user. Written raw, ``ESC [2J`` clears the reader's screen, ``ESC ]0;... BEL``
retitles the terminal, ``ESC [31;1m`` turns the text red, a newline forges a
line, a bidi override reorders the line. The client escapes them (see
``bitchat.cli.sanitize``); the server refuses them in group names as in user
names. Tested on the sanitizer, the Repl in process, ``bitchat client`` as a
subprocess fed by a pipe, and under a pseudo-terminal with its prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bitchat import RequestError, Server, codes
from bitchat.cli.repl import Repl
from bitchat.cli.sanitize import visible, visible_lines
from bitchat.im.client import IMClient
from bitchat.im.packets import CreateGroup
from conftest import WAIT
from im_helpers import PYTHON, clients_of, im_server, port_of, subprocess_env
from test_repl import Screen, repl_for

EVIL = "hello\x1b[2J\x1b]0;pwned\x07\x1b[31;1mRED"
SHOWN = r"hello\x1b[2J\x1b]0;pwned\x07\x1b[31;1mRED"
FORGED = "hi\nhouyi(1): I owe you 100\r\nbitchat> \u202etxt.exe"
FORGED_SHOWN = r"hi\nhouyi(1): I owe you 100\r\nbitchat> \u202etxt.exe"
EVIL_GROUP = "moon\x1b]0;pwned\x07\u2066base"
EVIL_GROUP_SHOWN = r"moon\x1b]0;pwned\x07\u2066base"


def test_the_sanitizer() -> None:
    assert visible(EVIL) == SHOWN
    assert visible(FORGED) == FORGED_SHOWN
    # Every C0 and C1 control, DEL, every bidi control, the line separators and
    # lone surrogates are escaped; the escapes are printable, so it is idempotent.
    unsafe = [*range(0x20), *range(0x7F, 0xA0), 0x61C, 0x200E, 0x200F]
    unsafe += [*range(0x2028, 0x202F), *range(0x2066, 0x206A), 0xD800, 0xDFFF]
    for code in unsafe:
        shown = visible(f"a{chr(code)}b")
        assert shown.isascii() and shown.isprintable(), hex(code)
        assert shown != f"a{chr(code)}b" and visible(shown) == shown
    assert visible("\x00\x7f\x85\u202e") == r"\x00\x7f\x85\u202e"
    # What a chat in any language needs is printed as it is.
    for text in (
        "嫦娥 said: 你好　世界",
        "👨\u200d👩\u200d👧 family",
        "é\u0301",
        "a \\x1b b",
        "¡ñ»",
    ):
        assert visible(text) == text
    # Log records keep their own line breaks (tracebacks), nothing else.
    assert visible_lines("one\x1b[2J\ntwo\x07") == "one\\x1b[2J\ntwo\\x07"


async def test_the_server_refuses_control_characters_in_group_names(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        for name in (EVIL_GROUP, "a\nb", "tab\there", "\u202eesab noom", "nb\u00a0sp", "x\x85y"):
            with pytest.raises(RequestError) as info:
                await houyi.client.request(CreateGroup(name))
            assert info.value.code == codes.INVALID_PACKET, repr(name)
            assert "control characters" in info.value.message
        assert await houyi.my_groups() == []  # nothing was created
        # Spaces inside a group name are fine, as are other scripts.
        assert (await houyi.create_group("  moon base ")).name == "moon base"
        assert (await houyi.create_group("嫦娥的 月宫")).name == "嫦娥的 月宫"


async def _seed_evil_group(server: Server, owner_id: int) -> int:
    """A group with a name the server no longer accepts (made before it checked)."""
    group = await server.data["im"].users.create_group(owner_id, EVIL_GROUP)
    return int(group.id)


async def test_the_repl_shows_what_the_server_sends(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (houyi, out):
            await houyi.execute("-lo houyi 123456")
            gris = await c.login("gris")
            group_id = await _seed_evil_group(server, 2)
            await gris.send_p2p(1, EVIL)
            assert await out.expect("gris(2)") == f"gris(2): {SHOWN}"
            await gris.send_p2p(1, FORGED)
            # One line: the newline did not start a line of its own.
            assert await out.expect("gris(2)") == f"gris(2): {FORGED_SHOWN}"
            await houyi.execute(f"-gjoin {group_id}")
            assert out.lines[-1] == f"Joined group {EVIL_GROUP_SHOWN}({group_id}), 2 member(s)"
            m = out.mark()
            await houyi.execute("-gl")
            shown = f"{EVIL_GROUP_SHOWN}({group_id})"
            assert out.since(m) == [
                "groupName(groupId)" + " " * (len(shown) - 18) + "  members",
                "-" * len(shown) + "  -------",
                shown + "        2",
            ]
            await gris.send_group(group_id, EVIL)
            assert await out.expect("[group") == f"[group {group_id}] gris(2): {SHOWN}"
            m = out.mark()
            await houyi.execute("-hi 2")
            assert [re.sub(r"^\S+ \S+ \(id \d+\) ", "", x) for x in out.since(m)] == [
                f"gris(2): {SHOWN}",
                f"gris(2): {FORGED_SHOWN}",
            ]
            for line in out.lines:
                assert visible(line) == line, line


def _controls(data: bytes) -> list[str]:
    """The control characters in ``data`` other than the newline, and the bidi ones."""
    text = data.decode()
    return [
        f"U+{ord(ch):04X}"
        for ch in text
        if ch != "\n" and (visible(ch) != ch)  # visible() escapes exactly those
    ]


class RawProc:
    """A ``bitchat client`` child read as bytes, exactly as a terminal would get them."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = bytearray()

    async def expect(self, wanted: str) -> None:
        assert self.proc.stdout is not None
        needle = wanted.encode()

        async def find() -> None:
            assert self.proc.stdout is not None
            while needle not in self.out:
                chunk = await self.proc.stdout.read(65536)
                if not chunk:
                    raise AssertionError(f"exited before {wanted!r}: {bytes(self.out)!r}")
                self.out.extend(chunk)

        try:
            await asyncio.wait_for(find(), 2 * WAIT)
        except TimeoutError:
            raise AssertionError(f"{wanted!r} not in {bytes(self.out)!r}") from None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")


@contextlib.asynccontextmanager
async def client_process(port: int) -> AsyncIterator[RawProc]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bitchat",
        "client",
        "--port",
        str(port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=subprocess_env(),
    )
    try:
        yield RawProc(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_pipe_mode_writes_no_control_character(tmp_path: Path) -> None:
    async with (
        im_server(tmp_path) as server,
        clients_of(server) as c,
        client_process(port_of(server)) as houyi,
    ):
        houyi.send("-lo houyi 123456")
        await houyi.expect("Login success")
        gris = await c.login("gris")
        group_id = await _seed_evil_group(server, 2)
        await gris.send_p2p(1, EVIL)
        await houyi.expect(f"gris(2): {SHOWN}\n")
        await gris.send_p2p(1, FORGED)
        await houyi.expect(f"gris(2): {FORGED_SHOWN}\n")
        houyi.send(f"-gjoin {group_id}")
        await houyi.expect(f"Joined group {EVIL_GROUP_SHOWN}({group_id})")
        houyi.send("-gl")
        await houyi.expect(f"{EVIL_GROUP_SHOWN}({group_id})        2\n")
        await gris.send_group(group_id, EVIL)
        await houyi.expect(f"[group {group_id}] gris(2): {SHOWN}\n")
        houyi.send("-hi 2")
        await houyi.expect(f"gris(2): {FORGED_SHOWN}\n")
        houyi.send("bye")
        await houyi.expect("bye bye!\n")
        assert await asyncio.wait_for(houyi.proc.wait(), WAIT) == 0
        assert _controls(bytes(houyi.out)) == []
        # Not one line of the output was written by gris alone.
        lines = bytes(houyi.out).decode().split("\n")
        assert not [x for x in lines if x.startswith(("houyi(1): I owe", "bitchat> "))]


# prompt_toolkit's own drawing: CSI sequences (cursor moves, erasing, its colours,
# modes), keypad and charset selection, carriage returns. Nothing else may reach
# the terminal; in particular no OSC (ESC ]), no BEL, no screen clearing.
_RENDERER = re.compile(rb"\x1b\[[0-9;?]*[A-HJKSTfhlmnsu]|\x1b[=>]|\x1b[()][AB0]|\r")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
async def test_the_prompt_writes_no_control_character_it_received(tmp_path: Path) -> None:
    import pty

    async with im_server(tmp_path) as server, clients_of(server) as c:
        master, slave = pty.openpty()
        env = subprocess_env() | {
            "TERM": "xterm",
            "PROMPT_TOOLKIT_NO_CPR": "1",
            "COLUMNS": "200",
            "LINES": "30",
        }
        houyi = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bitchat",
            "client",
            "--port",
            str(port_of(server)),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        screen = bytearray()
        loop = asyncio.get_running_loop()
        grew = asyncio.Event()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(master)
            screen.extend(data)
            grew.set()

        loop.add_reader(master, readable)

        async def shows(wanted: str) -> None:
            needle = wanted.encode()

            async def find() -> None:
                while needle not in _RENDERER.sub(b"", bytes(screen)):
                    grew.clear()
                    await grew.wait()

            try:
                await asyncio.wait_for(find(), 2 * WAIT)
            except TimeoutError:
                raise AssertionError(f"{wanted!r} not on the screen: {bytes(screen)!r}") from None

        try:
            await shows("bitchat>")
            os.write(master, b"-lo houyi 123456\r")
            await shows("Login success")
            gris = await c.login("gris")
            group_id = await _seed_evil_group(server, 2)
            await gris.send_p2p(1, EVIL)
            await shows(f"gris(2): {SHOWN}")
            await gris.send_p2p(1, FORGED)
            await shows(f"gris(2): {FORGED_SHOWN}")
            os.write(master, f"-gjoin {group_id}\r".encode())
            await shows(f"Joined group {EVIL_GROUP_SHOWN}({group_id})")
            os.write(master, b"-gl\r")
            await shows(f"{EVIL_GROUP_SHOWN}({group_id})        2")
            os.write(master, b"bye\r")
            await shows("bye bye!")
            assert await asyncio.wait_for(houyi.wait(), WAIT) == 0
            drawn = bytes(screen)
            for raw in (b"\x07", b"\x1b]", b"\x1b[2J", b"\x1b[31;1m", "\u202e".encode()):
                assert raw not in drawn, raw
            assert _controls(_RENDERER.sub(b"", drawn)) == []
        finally:
            loop.remove_reader(master)
            os.close(master)
            if houyi.returncode is None:
                houyi.kill()
                await houyi.wait()


async def test_an_in_process_repl_prints_through_the_sanitizer(tmp_path: Path) -> None:
    """Whatever reaches ``Repl.out`` (here an error message a server made up) is
    shown; a line the CLI writes itself is unchanged."""
    lines: list[str] = []
    repl = Repl(IMClient("127.0.0.1", 1), out=lines.append)
    repl.out(f"Login failed cause: {EVIL}")
    repl.out("Login success")
    assert lines == [f"Login failed cause: {SHOWN}", "Login success"]
    screen = Screen()
    repl = Repl(IMClient("127.0.0.1", 1), out=screen)
    await repl.execute("help")
    assert all(visible(x) == x for x in screen.lines) and len(screen.lines) > 5
