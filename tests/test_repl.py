"""``bitchat client``: the REPL's commands and output, in process (plain lines and
prompt_toolkit's pipe input), as subprocesses fed by pipes against a ``bitchat
server`` subprocess (the article's quick start), and under a pseudo-terminal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prompt_toolkit import PromptSession
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from bitchat.cli import build_parser
from bitchat.cli.devices import DeviceStore
from bitchat.cli.repl import PROMPT, USAGE, Repl, table
from bitchat.im.client import IMClient
from bitchat.settings import Settings
from conftest import WAIT
from im_helpers import PYTHON, free_port, im_server, port_of, subprocess_env


class Screen:
    """The lines a Repl printed; waits for one to show up."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._seen = 0

    def __call__(self, text: str) -> None:
        self.lines.extend(text.split("\n"))
        self._changed.set()

    async def expect(self, wanted: str, timeout: float = WAIT) -> str:
        """The next line (after the last one expected) that contains ``wanted``."""

        async def find() -> str:
            while True:
                for i in range(self._seen, len(self.lines)):
                    if wanted in self.lines[i]:
                        self._seen = i + 1
                        return self.lines[i]
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(f"{wanted!r} not in {self.lines[self._seen :]!r}") from None

    def mark(self) -> int:
        self._seen = len(self.lines)
        return self._seen

    def since(self, mark: int) -> list[str]:
        """The lines printed after ``mark``; later expects look after them."""
        self._seen = len(self.lines)
        return self.lines[mark:]


@contextlib.asynccontextmanager
async def repl_for(
    port: int,
    settings: Settings,
    device: str | None = None,
    devices: DeviceStore | None = None,
) -> AsyncIterator[tuple[Repl, Screen]]:
    screen = Screen()
    im = IMClient("127.0.0.1", port, settings)
    repl = Repl(im, out=screen, device=device, devices=devices)
    await im.connect(WAIT)
    try:
        yield repl, screen
    finally:
        await im.close()


async def test_commands_and_their_output(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (houyi, h_out), repl_for(port, s) as (gris, g_out):
            assert h_out.lines == [f"Connected to 127.0.0.1:{port}"]
            await houyi.execute("-lo houyi 123456")
            assert h_out.lines[-1] == "Login success"
            await gris.execute("-lo gris 123456")
            m = g_out.mark()
            await gris.execute("-lu")
            assert g_out.since(m) == ["userName(userId)", "----------------", "houyi(1)", "gris(2)"]

            await gris.execute("-pc 1 hello,houyi")
            sent = re.fullmatch(r"Send p2p message success \(id (\d+)\)", g_out.lines[-1])
            assert sent is not None
            assert await h_out.expect("gris(2)") == "gris(2): hello,houyi"
            # The message is the rest of the line, inner spaces kept.
            await houyi.execute("-pc 2   hello   there, gris  ")
            assert await g_out.expect("houyi(1)") == "houyi(1): hello   there, gris"

            await houyi.execute("-gcreate moon base")
            assert h_out.lines[-1] == "Group created: moon base(1)"
            await gris.execute("-gjoin 1")
            assert g_out.lines[-1] == "Joined group moon base(1), 2 member(s)"
            await houyi.execute("-gcreate a group with a much longer name")
            await gris.execute("-gjoin 2")
            m = g_out.mark()
            await gris.execute("-gl")
            assert g_out.since(m) == [
                "groupName(groupId)                  members",
                "----------------------------------  -------",
                "moon base(1)                              2",
                "a group with a much longer name(2)        2",
            ]
            await gris.execute("-gleave 2")
            m = g_out.mark()
            await gris.execute("-gm 1")
            assert g_out.since(m) == [
                "userName(userId)  status  role",
                "----------------  ------  ------",
                "houyi(1)          online  owner",
                "gris(2)           online  member",
            ]
            await gris.execute("-gc 1 hi moon")
            assert re.fullmatch(r"Send group message success \(id \d+\)", g_out.lines[-1])
            assert await h_out.expect("[group 1] gris(2): ") == "[group 1] gris(2): hi moon"

            m = h_out.mark()
            await houyi.execute("-hi 2")
            history = h_out.since(m)
            assert f" (id {sent.group(1)}) gris(2): hello,houyi" in history[0]
            assert [re.sub(r"^\S+ \S+ \(id \d+\) ", "", x) for x in history] == [
                "gris(2): hello,houyi",
                "houyi(1): hello   there, gris",
            ]
            m = h_out.mark()
            await houyi.execute("-hi -g 1")
            assert [re.sub(r"^\S+ \S+ \(id \d+\) ", "", x) for x in h_out.since(m)] == [
                "gris(2): hi moon"
            ]
            await gris.execute("-gleave 1")
            assert g_out.lines[-1] == "Left group 1"
            await gris.execute("-gl")
            assert g_out.lines[-1] == "No groups"

            # Failures and misuse: a line each, and the REPL goes on.
            for line, answer in [
                ("-pc 99 anyone?", "Send p2p message failed cause: no user 99"),
                ("-gc 1 still here?", "Send group message failed cause: you are not in group 1"),
                ("-gjoin 42", "Join group failed cause: no group 42"),
                ("-pc x hello", "Usage: -pc userId message"),
                ("-pc 1", "Usage: -pc userId message"),
                ("-lo gris", "Usage: -lo userName password"),
                ("-hi", "Usage: -hi userId [beforeId]  or  -hi -g groupId [beforeId]"),
                ("-lo houyi wrong", "Login failed cause: unknown user or wrong password"),
                ("-hi 99", "History failed cause: no user 99"),
                ("-hi -g 42", "History failed cause: no group 42"),
                ("-gm 42", "List members failed cause: no group 42"),
                ("I am half way through", "Unknown command: I (type help for the commands)"),
            ]:
                m = g_out.mark()
                failures = gris.failures
                await gris.execute(line)
                assert g_out.since(m) == [answer], line  # one line
                assert gris.failures == failures + 1
            m = g_out.mark()
            assert await gris.execute("help")
            assert g_out.since(m) == USAGE.split("\n")
            assert not await gris.execute("bye")
            assert g_out.lines[-1] == "bye bye!"


async def test_commands_need_a_login(tmp_path: Path) -> None:
    async with (
        im_server(tmp_path) as server,
        repl_for(port_of(server), server.settings) as (repl, out),
    ):
        await repl.execute("-lu")
        assert out.lines[-1] == "List online user failed cause: log in first"
        await repl.execute("-pc 1 hi")
        assert out.lines[-1] == "Send p2p message failed cause: log in first"


async def test_history_pages(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (houyi, h_out), repl_for(port, s) as (gris, _):
            await houyi.execute("-lo houyi 1")
            await gris.execute("-lo gris 1")
            for i in range(25):
                await gris.execute(f"-pc 1 n{i}")
            m = h_out.mark()
            await houyi.execute("-hi 2")
            page = h_out.since(m)
            assert len(page) == 21 and page[0].endswith("gris(2): n5")
            assert page[19].endswith("gris(2): n24")
            older = re.fullmatch(r"\(older: (-hi 2 \d+)\)", page[20])
            assert older is not None
            m = h_out.mark()
            await houyi.execute(older.group(1))
            assert [x.split(": ")[-1] for x in h_out.since(m)] == [f"n{i}" for i in range(5)]


def test_missed_messages_come_after_the_login_line() -> None:
    """The server pushes missed messages right behind its login answer, often in the
    same read: they are held until the login line is printed."""
    from bitchat.client import State
    from bitchat.im.centers import User
    from bitchat.im.packets import ChatMessage, LoginOk

    screen = Screen()
    im = IMClient("127.0.0.1", free_port())
    repl = Repl(im, out=screen)
    missed = ChatMessage(7, "p2p", 2, "gris", 1, "you missed this", 0)
    im.user = User(1, "houyi")  # logged in before the connection dropped
    repl._state_changed(State.CONNECTED)  # the client logs in again with its token...
    repl.show_message(missed)  # ...and the push comes before the answer is handled
    repl._relogged_in(LoginOk(1, "houyi", "t", pending=1), None)
    assert screen.lines == [
        "Connected to 127.0.0.1:" + str(im.client.port),
        "Logged in again as houyi(1), 1 missed message(s)",
        "gris(2): you missed this",
    ]
    repl.show_message(missed)  # not held any more
    assert screen.lines[-1] == "gris(2): you missed this"


async def test_reconnect_is_shown_and_missed_messages_arrive(tmp_path: Path) -> None:
    server_cm = im_server(tmp_path)
    server = await server_cm.__aenter__()
    port = port_of(server)
    async with repl_for(port, server.settings) as (houyi, out):
        await houyi.execute("-lo houyi 123456")
        await server_cm.__aexit__(None, None, None)
        await out.expect("Connection lost; reconnecting...")
        async with (
            im_server(tmp_path, port=port) as again,
            repl_for(port, again.settings) as (gris, _),
        ):
            await gris.execute("-lo gris 123456")
            await gris.execute("-pc 1 you missed this")
            await out.expect(f"Reconnected to 127.0.0.1:{port}")
            await out.expect("Logged in again as houyi(1)")
            assert await out.expect("gris(2)") == "gris(2): you missed this"


async def test_commands_fail_at_once_while_not_connected(tmp_path: Path) -> None:
    """No server: a command answers its one failure line at once, not after the
    request timeout (made far longer than the test's wait here)."""
    port = free_port()
    settings = Settings(request_timeout=60 * WAIT, reconnect_initial_delay=0.05)
    screen = Screen()
    im = IMClient("127.0.0.1", port, settings)
    repl = Repl(im, out=screen)
    connecting = asyncio.ensure_future(im.connect(None))  # as bitchat client does
    try:
        # The first line may come before the first attempt ended: it waits for that.
        await asyncio.wait_for(repl.execute("-lo houyi 123456"), WAIT)
        assert screen.lines == [
            f"Cannot reach 127.0.0.1:{port}; retrying...",
            f"Login failed cause: not connected to 127.0.0.1:{port} (retrying in the background)",
        ]
        m = screen.mark()
        await asyncio.wait_for(repl.execute("-lu"), WAIT)
        assert screen.since(m) == [
            f"List online user failed cause: not connected to 127.0.0.1:{port} "
            "(retrying in the background)"
        ]
        assert repl.failures == 2
        # The server comes up: the client connects by itself and commands work.
        async with im_server(tmp_path, port=port):
            await screen.expect(f"Connected to 127.0.0.1:{port}")
            await repl.execute("-lo houyi 123456")
            assert screen.lines[-1] == "Login success"
        await screen.expect("Connection lost; reconnecting...")
        m = screen.mark()
        await asyncio.wait_for(repl.execute("-pc 1 hello"), WAIT)
        assert screen.since(m) == [
            f"Send p2p message failed cause: not connected to 127.0.0.1:{port} "
            "(retrying in the background)"
        ]
    finally:
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        await im.close()


async def test_router_outages_are_one_status_line_each(tmp_path: Path) -> None:
    """Through a router with no live server: one line saying so, however often the
    client asks again; a new line when the reason changes."""
    from bitchat import RequestError, Server, codes
    from bitchat.cluster.discovery import router_resolver
    from bitchat.cluster.packets import NodeAddress, WhereTo

    settings = Settings(reconnect_initial_delay=0.01, reconnect_max_delay=0.02)
    asked = 0
    asked_enough = asyncio.Event()
    router = Server("127.0.0.1", 0, settings)

    @router.handler(WhereTo)
    async def where_to(session: object, packet: WhereTo) -> NodeAddress:
        nonlocal asked
        asked += 1
        if asked >= 5:
            asked_enough.set()
        raise RequestError(codes.NO_SERVER, "no bitchat server is alive in the cluster")

    await router.start()
    via = f"router 127.0.0.1:{port_of(router)}"
    screen = Screen()
    resolve = router_resolver("127.0.0.1", port_of(router), settings)
    im = IMClient(settings=settings, resolve=resolve)
    repl = Repl(im, out=screen, via=via)
    connecting = asyncio.ensure_future(im.connect(None))
    try:
        await asyncio.wait_for(asked_enough.wait(), WAIT)
        await asyncio.wait_for(repl.execute("-lu"), WAIT)
        assert screen.lines == [
            f"No server is alive in the cluster ({via}); retrying...",
            f"List online user failed cause: not connected to a server through the {via} "
            "(retrying in the background)",
        ]
        await router.stop()
        await screen.expect(f"Cannot reach the {via}; retrying...")
    finally:
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        await im.close()
        await router.stop()


async def test_prompt_toolkit_front_end(tmp_path: Path) -> None:
    """The interactive loop, fed keys through prompt_toolkit's pipe input."""
    async with im_server(tmp_path) as server:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (houyi, h_out), repl_for(port, s) as (gris, g_out):
            with create_pipe_input() as keys:
                session: PromptSession[str] = PromptSession(input=keys, output=DummyOutput())
                loop = asyncio.ensure_future(houyi.run_interactive(session, patch=False))
                keys.send_text("-lo houyi 123456\r")
                await h_out.expect("Login success")
                await gris.execute("-lo gris 123456")
                keys.send_text("-lu\r")
                await h_out.expect("gris(2)")
                # A message arrives while a line is half typed; the line survives.
                keys.send_text("-pc 2 hello,")
                await gris.execute("-pc 1 hello,houyi")
                await h_out.expect("gris(2): hello,houyi")
                keys.send_text("gris\r")
                assert await g_out.expect("houyi(1)") == "houyi(1): hello,gris"
                keys.send_text("bye\r")
                await asyncio.wait_for(loop, WAIT)
                assert h_out.lines[-1] == "bye bye!"
            with create_pipe_input() as keys:
                session = PromptSession(input=keys, output=DummyOutput())
                loop = asyncio.ensure_future(houyi.run_interactive(session, patch=False))
                keys.send_text("-lu")
                keys.send_text("\x03")  # Ctrl-C, even on a half-typed line, is bye
                await asyncio.wait_for(loop, WAIT)
                assert h_out.lines[-1] == "bye bye!"
            with create_pipe_input() as keys:
                session = PromptSession(input=keys, output=DummyOutput())
                loop = asyncio.ensure_future(houyi.run_interactive(session, patch=False))
                keys.send_text("\x04")  # Ctrl-D on an empty line quits too
                await asyncio.wait_for(loop, WAIT)


def test_tables_are_aligned_on_the_terminal() -> None:
    # A wide (CJK) character takes two columns, so the next column still lines up.
    assert table(["userName(userId)", "status"], [["嫦娥(3)", "offline"], ["gris(2)", ""]]) == [
        "userName(userId)  status",
        "----------------  -------",
        "嫦娥(3)           offline",
        "gris(2)",
    ]


def test_client_command_line() -> None:
    args = build_parser().parse_args(["client"])
    assert (args.host, args.port, args.router) == ("127.0.0.1", 8864, None)
    args = build_parser().parse_args(
        ["client", "--host", "::1", "--port", "9000", "--router", "10.0.0.1:8870"]
    )
    assert (args.host, args.port, args.router) == ("::1", 9000, "10.0.0.1:8870")
    assert PROMPT == "bitchat> "


# -- subprocesses ---------------------------------------------------------------------------


class Proc:
    """A ``python -m bitchat`` child with line-by-line reading of its output."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.transcript: list[str] = []

    @classmethod
    async def start(cls, *args: str, name: str, stdin: bool = False) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bitchat",
            *args,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=subprocess_env(),
        )
        return cls(proc, name)

    async def expect(self, wanted: str, timeout: float = 2 * WAIT) -> str:
        assert self.proc.stdout is not None

        async def find() -> str:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"{self.name} exited before printing {wanted!r}")
                line = raw.decode().rstrip("\r\n")
                self.transcript.append(line)
                if wanted in line:
                    return line

        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: {wanted!r} not seen; output: {self.transcript!r}"
            ) from None

    async def lines_until(self, last: str) -> list[str]:
        """Every line up to and including the one that contains ``last``."""
        start = len(self.transcript)
        await self.expect(last)
        return self.transcript[start:]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def stop(self) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), WAIT)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def server_process(data_dir: Path) -> AsyncIterator[int]:
    port = free_port()
    server = await Proc.start(
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        name="server",
    )
    try:
        await server.expect("bitchat server started")
        yield port
    finally:
        assert await server.stop() == 0, server.transcript


async def test_quick_start_with_processes(tmp_path: Path) -> None:
    """The article's quick start, exactly: two clients scripted through pipes."""
    async with server_process(tmp_path / "data") as port:
        houyi = await Proc.start("client", "--port", str(port), name="houyi", stdin=True)
        gris = await Proc.start("client", "--port", str(port), name="gris", stdin=True)
        try:
            await houyi.expect(f"Connected to 127.0.0.1:{port}")
            houyi.send("-lo houyi 123456")
            assert await houyi.expect("Login") == "Login success"
            gris.send("-lo gris 123456")
            assert await gris.expect("Login") == "Login success"

            gris.send("-lu")
            assert await gris.lines_until("gris(") == [
                "userName(userId)",
                "----------------",
                "houyi(1)",
                "gris(2)",
            ]
            gris.send("-pc 1 hello,houyi")
            assert (await gris.expect("Send p2p")).startswith("Send p2p message success (id ")
            assert await houyi.expect("hello") == "gris(2): hello,houyi"

            houyi.send("bye")
            assert await houyi.expect("bye") == "bye bye!"
            assert await asyncio.wait_for(houyi.proc.wait(), WAIT) == 0
            assert gris.proc.stdin is not None
            gris.proc.stdin.close()  # the end of the script ends the client too
            assert await asyncio.wait_for(gris.proc.wait(), WAIT) == 0
        finally:
            await houyi.stop()
            await gris.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
async def test_interactive_client_on_a_terminal(tmp_path: Path) -> None:
    """Under a pty: the prompt, and a push printed above a half-typed line."""
    import pty

    async with server_process(tmp_path / "data") as port:
        gris = await Proc.start("client", "--port", str(port), name="gris", stdin=True)
        master, slave = pty.openpty()
        env = subprocess_env() | {
            "TERM": "xterm",
            "PROMPT_TOOLKIT_NO_CPR": "1",
            "COLUMNS": "100",
            "LINES": "30",
        }
        houyi = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bitchat",
            "client",
            "--port",
            str(port),
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

        def text() -> str:
            # The screen as plain text: escape sequences out, carriage returns kept.
            return re.sub(
                r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]",
                "",
                screen.decode(errors="replace"),
            )

        async def shows(wanted: str, after: int = 0) -> int:
            async def find() -> int:
                while (at := text().find(wanted, after)) < 0:
                    grew.clear()
                    await grew.wait()
                return at

            try:
                return await asyncio.wait_for(find(), 2 * WAIT)
            except TimeoutError:
                raise AssertionError(f"{wanted!r} not on the screen: {text()!r}") from None

        try:
            await shows(PROMPT.rstrip())  # the renderer draws the space as a cursor move
            os.write(master, b"-lo houyi 123456\r")
            at = await shows("Login success")
            gris.send("-lo gris 123456")
            await gris.expect("Login success")
            os.write(master, b"-pc 2 half typ")
            at = await shows("-pc 2 half typ", at)
            gris.send("-pc 1 hello,houyi")
            at = await shows("gris(2): hello,houyi", at)
            # The half-typed line is drawn again below the message, and finishing it
            # sends it whole.
            at = await shows("-pc 2 half typ", at)
            os.write(master, b"ed\r")
            assert await gris.expect("houyi(1)") == "houyi(1): half typed"
            os.write(master, b"bye\r")
            await shows("bye bye!", at)
            assert await asyncio.wait_for(houyi.wait(), WAIT) == 0
        finally:
            loop.remove_reader(master)
            os.close(master)
            if houyi.returncode is None:
                houyi.kill()
                await houyi.wait()
            await gris.stop()


async def test_client_asks_the_router_where_to_connect(tmp_path: Path) -> None:
    """``--router``: the real router_resolver asks a router (here a stand-in that
    answers WhereTo with the IM server's address) before every connection."""
    from bitchat import Server
    from bitchat.cluster.packets import NodeAddress, WhereTo

    async with im_server(tmp_path) as im:
        asked: list[WhereTo] = []
        router = Server("127.0.0.1", 0, im.settings)

        @router.handler(WhereTo)
        async def where_to(session: object, packet: WhereTo) -> NodeAddress:
            asked.append(packet)
            return NodeAddress("127.0.0.1", port_of(im), 7)

        async with router:
            client = await Proc.start(
                "client", "--router", f"127.0.0.1:{port_of(router)}", name="client", stdin=True
            )
            try:
                await client.expect(f"Connected to 127.0.0.1:{port_of(im)}")
                client.send("-lo houyi 123456")
                assert await client.expect("Login") == "Login success"
                client.send("bye")
                assert await asyncio.wait_for(client.proc.wait(), WAIT) == 0
            finally:
                await client.stop()
            assert len(asked) == 1


async def test_client_refuses_a_bad_router_address() -> None:
    proc = await Proc.start("client", "--router", "nowhere", name="client", stdin=True)
    line = await proc.expect("--router")
    assert "expected HOST:PORT" in line
    assert await asyncio.wait_for(proc.proc.wait(), WAIT) == 2


async def test_client_through_a_router_with_no_server_is_quiet_and_exits_1() -> None:
    """No library log records (timestamped WARNINGs) on the client's screen: one
    status line; a script in which a command failed exits with status 1."""
    from bitchat import RequestError, Server, codes
    from bitchat.cluster.packets import NodeAddress, WhereTo

    asked = asyncio.Event()
    router = Server("127.0.0.1", 0)

    @router.handler(WhereTo)
    async def where_to(session: object, packet: WhereTo) -> NodeAddress:
        asked.set()
        raise RequestError(codes.NO_SERVER, "no bitchat server is alive in the cluster")

    async with router:
        via = f"router 127.0.0.1:{port_of(router)}"
        client = await Proc.start("client", "--router", via.split()[1], name="client", stdin=True)
        try:
            await asyncio.wait_for(asked.wait(), 2 * WAIT)
            client.send("-lu")
            client.send("bye")
            assert await asyncio.wait_for(client.proc.wait(), WAIT) == 1
            await client.expect("bye bye!")
            assert client.transcript == [
                f"No server is alive in the cluster ({via}); retrying...",
                f"List online user failed cause: not connected to a server through the {via} "
                "(retrying in the background)",
                "bye bye!",
            ]
        finally:
            await client.stop()
