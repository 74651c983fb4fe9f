"""``bitchat client`` and the sync model: ``-cl`` (the conversation list), ``-read``,
the line a read receipt prints, and the device id (``--device``, or the one kept
in ``devices.json`` of the user's config folder). In process against a real
server, and as subprocesses in a config folder of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bitchat.cli import repl as repl_module
from bitchat.cli.devices import DeviceStore, config_dir
from bitchat.cli.repl import USAGE
from bitchat.cli.sanitize import visible
from conftest import WAIT
from im_helpers import PYTHON, clients_of, im_server, port_of, subprocess_env
from test_cli_escapes import EVIL_GROUP_SHOWN, _seed_evil_group
from test_repl import repl_for


async def test_conversation_list_read_and_receipt_lines(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (houyi, h_out), repl_for(port, s) as (gris, g_out):
            await houyi.execute("-lo houyi 123456")
            await gris.execute("-lo gris 123456")
            m = h_out.mark()
            await houyi.execute("-cl")
            assert h_out.since(m) == ["No conversations"]

            await gris.execute("-pc 1 hello,houyi")
            await gris.execute("-pc 1 second")
            await h_out.expect("gris(2): second")
            await houyi.execute("-gcreate moon")
            await gris.execute("-gjoin 1")
            await houyi.execute("-gc 1 hi moon")
            await g_out.expect("[group 1] houyi(1): hi moon")
            await houyi.execute("-gcreate empty")
            m = h_out.mark()
            await houyi.execute("-cl")
            # Newest first; the CLI marks nothing read by itself: gris's two are unread.
            assert h_out.since(m) == [
                "conversation     unread  last message",
                "---------------  ------  -----------------",
                "[group 2] empty       0",
                "[group 1] moon        0  houyi(1): hi moon",
                "gris(2)               2  gris(2): second",
            ]

            await houyi.execute("-read 2")
            assert h_out.lines[-1] == "Read up to 2 with user 2, 0 unread"
            assert await g_out.expect("read your") == "houyi(1) read your messages up to 2"
            await gris.execute("-gc 1 ping")
            await h_out.expect("[group 1] gris(2): ping")
            await houyi.execute("-read -g 1 1")
            assert h_out.lines[-1] == "Read up to 1 in group 1, 1 unread"
            await houyi.execute("-read -g 1")
            assert h_out.lines[-1] == "Read up to 2 in group 1, 0 unread"
            assert (
                await g_out.expect("read your")
                == "houyi(1) read your messages in [group 1] moon up to 2"
            )
            m = h_out.mark()
            await houyi.execute("-cl")
            assert h_out.since(m)[2:] == [
                "[group 1] moon        0  gris(2): ping",
                "[group 2] empty       0",
                "gris(2)               0  gris(2): second",
            ]

            for line, answer in [
                ("-cl x", "Usage: -cl [before]"),
                ("-cl 1 2", "Usage: -cl [before]"),
                ("-read", "Usage: -read userId [seq]  or  -read -g groupId [seq]"),
                ("-read -g", "Usage: -read userId [seq]  or  -read -g groupId [seq]"),
                ("-read x", "Usage: -read userId [seq]  or  -read -g groupId [seq]"),
                ("-read 2 3 4", "Usage: -read userId [seq]  or  -read -g groupId [seq]"),
            ]:
                m = h_out.mark()
                failures = houyi.failures
                await houyi.execute(line)
                assert h_out.since(m) == [answer], line
                assert houyi.failures == failures + 1
            m = h_out.mark()
            await houyi.execute("-read -g 42")
            [failed] = h_out.since(m)
            assert failed.startswith("Mark read failed cause: "), failed
            m = h_out.mark()
            await houyi.execute("help")
            usage = h_out.since(m)
            assert usage == USAGE.split("\n")
            assert [x.split()[0] for x in usage if x.lstrip().startswith(("-cl", "-read"))] == [
                "-cl",
                "-read",
                "-read",
            ]


async def test_a_receipt_names_a_group_the_repl_never_saw(tmp_path: Path) -> None:
    """The receipt of a group joined elsewhere: the client asks for the name; a name
    from the server is shown escaped."""
    async with im_server(tmp_path) as server, clients_of(server) as c:
        port, s = port_of(server), server.settings
        houyi = await c.login("houyi")
        async with repl_for(port, s) as (gris, out):
            await gris.execute("-lo gris 123456")
            group_id = await _seed_evil_group(server, 1)
            await gris.im.join_group(group_id)  # not through the repl
            await gris.execute(f"-gc {group_id} anyone?")
            await houyi.mark_read(group_id=group_id)
            assert await out.expect("read your") == (
                f"houyi(1) read your messages in [group {group_id}] {EVIL_GROUP_SHOWN} up to 1"
            )
            # Delivered receipts print nothing; a read one for a chat, its line.
            await gris.execute("-pc 1 hi")
            await houyi.mark_read(peer_id=2)
            assert await out.expect("read your") == "houyi(1) read your messages up to 1"
            receipts = [x for x in out.lines if x.startswith("houyi(1) ")]
            assert len(receipts) == 2, receipts
            m = out.mark()
            await gris.execute("-cl")
            chat, group = out.since(m)[2:]
            assert chat.startswith("houyi(1) ") and chat.endswith("  0  gris(2): hi")
            assert group.startswith(f"[group {group_id}] {EVIL_GROUP_SHOWN}  ")
            assert group.endswith("  0  gris(2): anyone?")
            for line in out.lines:
                assert visible(line) == line, line


async def test_conversation_pages_and_long_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repl_module, "CONVERSATION_PAGE", 2)
    async with im_server(tmp_path) as server, clients_of(server) as c:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (houyi, out):
            await houyi.execute("-lo houyi 123456")
            others = [await c.login(name) for name in ("gris", "change", "wukong")]
            for im in others:
                await im.send_p2p(1, "x" * 60 if im is others[-1] else "short")
            await out.expect("wukong(4)")
            m = out.mark()
            await houyi.execute("-cl")
            page = out.since(m)
            assert page[2] == "wukong(4)          1  wukong(4): " + "x" * 26 + "..."
            assert page[3] == "change(3)          1  change(3): short"
            more = page[4]
            assert more.startswith("(more: -cl ") and more.endswith(")")
            m = out.mark()
            await houyi.execute(more[len("(more: ") : -1])
            assert [x.split()[0] for x in out.since(m)[2:]] == ["gris(2)"]


async def test_the_device_is_kept_per_server_and_user(tmp_path: Path) -> None:
    path = tmp_path / "config" / "bitchat" / "devices.json"
    async with im_server(tmp_path / "data") as server:
        port, s = port_of(server), server.settings
        where = f"127.0.0.1:{port}"
        store = DeviceStore(path, where)
        async with repl_for(port, s, devices=store) as (houyi, _):
            await houyi.execute("-lo houyi 123456")
            first = houyi.im.device
            assert first and json.loads(path.read_text()) == {f"{where} houyi": first}
            assert path.stat().st_mode & 0o077 == 0  # the user's alone
        # The next run logs in as the kept device (the server would name a new one).
        async with repl_for(port, s, devices=store) as (again, _):
            await again.execute("-lo Houyi 123456")  # the same user, as the server finds it
            assert again.im.device == first
            await again.execute("-lo gris 123456")  # another user: a device of their own
            gris_device = again.im.device
            assert gris_device and gris_device != first
        assert json.loads(path.read_text()) == {
            f"{where} houyi": first,
            f"{where} gris": gris_device,
        }
        # --device names it, and nothing is kept.
        async with repl_for(port, s, device="desk-1", devices=store) as (desk, _):
            await desk.execute("-lo houyi 123456")
            assert desk.im.device == "desk-1"
            await desk.execute("-lo wukong 123456")
            assert desk.im.device == "desk-1"
        assert set(json.loads(path.read_text())) == {f"{where} houyi", f"{where} gris"}
        # Another server (or a router's cluster) has devices of its own.
        assert DeviceStore(path, "127.0.0.1:1").get("houyi") == ""
        # A broken file counts as empty and is written again.
        path.write_text("{not json")
        async with repl_for(port, s, devices=store) as (broken, _):
            await broken.execute("-lo houyi 123456")
            assert broken.im.device not in ("", first)
        assert json.loads(path.read_text()) == {f"{where} houyi": broken.im.device}


def test_clients_logging_in_at_once_keep_every_device(tmp_path: Path) -> None:
    """Sixteen clients write the file at the same moment: none loses another's id."""
    path = tmp_path / "bitchat" / "devices.json"
    start = threading.Barrier(16)

    def login(i: int) -> None:
        store = DeviceStore(path, "127.0.0.1:8864")
        start.wait(WAIT)
        store.put(f"user{i}", f"device-{i}")

    threads = [threading.Thread(target=login, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert json.loads(path.read_text()) == {
        f"127.0.0.1:8864 user{i}": f"device-{i}" for i in range(16)
    }


def test_the_config_folder() -> None:
    assert config_dir({"XDG_CONFIG_HOME": "/x/cfg", "HOME": "/h"}) == Path("/x/cfg/bitchat")
    assert config_dir({"HOME": "/h"}) == Path("/h/.config/bitchat")
    # The XDG spec: a relative path is to be ignored.
    assert config_dir({"XDG_CONFIG_HOME": "cfg", "HOME": "/h"}) == Path("/h/.config/bitchat")


# -- subprocesses ---------------------------------------------------------------------------

SLOW = 4 * WAIT  # a cold interpreter start


async def run_client(port: int, script: str, env: dict[str, str], *argv: str) -> list[str]:
    """``bitchat client`` fed ``script`` through a pipe: its output lines (exit 0)."""
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
        env=subprocess_env() | env,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(script.encode()), SLOW)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = out.decode().splitlines()
    assert proc.returncode == 0, lines
    return lines


def devices_of(data_dir: Path, user_id: int) -> set[str]:
    """The devices the server has registered for the user (its SQLite store)."""
    with contextlib.closing(sqlite3.connect(data_dir / "bitchat.db")) as db:
        rows = db.execute("SELECT name FROM devices WHERE user_id = ?", (user_id,)).fetchall()
    return {r[0] for r in rows}


async def test_the_client_process_keeps_its_device(tmp_path: Path) -> None:
    data = tmp_path / "data"
    home = tmp_path / "home"
    async with im_server(data) as server, clients_of(server) as c:
        port = port_of(server)
        env = {"HOME": str(home), "XDG_CONFIG_HOME": ""}  # so: ~/.config
        lines = await run_client(port, "-lo houyi 123456\n-cl\nbye\n", env)
        assert lines[:2] == [f"Connected to 127.0.0.1:{port}", "Login success"]
        assert lines[2:4] == ["No conversations", "bye bye!"]
        path = home / ".config" / "bitchat" / "devices.json"
        [(key, device)] = json.loads(path.read_text()).items()
        assert key == f"127.0.0.1:{port} houyi"
        assert devices_of(data, 1) == {device}

        gris = await c.login("gris")
        await gris.send_p2p(1, "hello,houyi")
        lines = await run_client(port, "-lo houyi 123456\n-cl\n-read 2\nbye\n", env)
        assert "gris(2): hello,houyi" in lines  # missed by the device, pushed at login
        table = lines[lines.index("conversation  unread  last message") :]
        assert table[2] == "gris(2)            1  gris(2): hello,houyi"
        assert "Read up to 1 with user 2, 0 unread" in lines
        assert devices_of(data, 1) == {device}  # the same device again

        # --device (or BITCHAT_DEVICE, or the config file) names it; nothing is kept.
        xdg = tmp_path / "xdg"
        lines = await run_client(
            port, "-lo houyi 123456\nbye\n", {"XDG_CONFIG_HOME": str(xdg)}, "--device", "desk-1"
        )
        assert lines[1] == "Login success"
        assert devices_of(data, 1) == {device, "desk-1"}
        assert not (xdg / "bitchat").exists()
        await run_client(port, "-lo houyi 123456\nbye\n", {"XDG_CONFIG_HOME": str(xdg)})
        [(key, other)] = json.loads((xdg / "bitchat" / "devices.json").read_text()).items()
        assert other not in (device, "desk-1") and devices_of(data, 1) == {device, "desk-1", other}


async def test_the_device_setting_from_each_source(tmp_path: Path) -> None:
    async def client(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bitchat",
            "client",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=subprocess_env() | (env or {}),
        )
        out, err = await asyncio.wait_for(proc.communicate(), SLOW)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    config = tmp_path / "client.toml"
    config.write_text('device = "from-file"\n')
    status, out, err = await client("--config", str(config), "--print-config")
    assert status == 0, err
    assert tomllib.loads(out)["device"] == "from-file"
    status, out, err = await client(
        "--config", str(config), "--print-config", env={"BITCHAT_DEVICE": "from-env"}
    )
    assert tomllib.loads(out)["device"] == "from-env"
    status, out, err = await client(
        "--config",
        str(config),
        "--device",
        "from-cli",
        "--print-config",
        env={"BITCHAT_DEVICE": "from-env"},
    )
    assert tomllib.loads(out)["device"] == "from-cli"
    status, out, err = await client("--device", "my laptop")
    assert status == 2 and out == ""
    assert (
        'bitchat client: --device: expected letters, digits and -_.: only, got "my laptop"' in err
    )
    status, out, err = await client(env={"BITCHAT_DEVICE": "a/b"})
    assert status == 2
    assert "environment BITCHAT_DEVICE: expected letters, digits and -_.: only" in err


# -- what a login prints --------------------------------------------------------------------


async def test_own_messages_print_the_same_live_and_at_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One's own messages from another device name the recipient, whether they come
    live or are pushed at the login, in the same read as its answer even (so handled
    before the login call returns, as happens on a busy client)."""
    async with im_server(tmp_path) as server, clients_of(server) as c:
        port, s = port_of(server), server.settings
        gris = await c.login("gris")
        phone = await c.login("chang", "123456", device="phone")
        moon = await gris.create_group("moon")
        await phone.join_group(moon.group_id)
        assert phone.user is not None and gris.user is not None
        me, to = phone.user.id, gris.user.id

        async with repl_for(port, s, device="cli") as (cli, out):
            await cli.execute("-lo chang 123456")
            await phone.send_p2p(to, "live p2p")
            await phone.send_group(moon.group_id, "live group")
            live = [await out.expect("live p2p"), await out.expect("live group")]
        assert live == [
            f"chang({me}) -> {to}: live p2p",
            f"[group {moon.group_id}] chang({me}): live group",
        ]

        for i in range(3):
            await phone.send_p2p(to, f"offline p2p {i}")
        await phone.send_group(moon.group_id, "offline group")
        # The server's push of them is waited for while the client reads nothing: then
        # the answer and the pushes come in one read.
        service = server.data["im"]
        synced = asyncio.Event()
        sync = service._sync

        async def sync_then_tell(*args: Any) -> None:
            await sync(*args)
            synced.set()

        monkeypatch.setattr(service, "_sync", sync_then_tell)
        async with repl_for(port, s, device="cli") as (cli, out):
            m = out.mark()
            proto = cli.im.client._proto
            assert proto is not None and proto.transport is not None
            proto.transport.pause_reading()
            login = asyncio.create_task(cli.execute("-lo chang 123456"))
            await asyncio.wait_for(synced.wait(), WAIT)
            proto.transport.resume_reading()
            await asyncio.wait_for(login, WAIT)
            await out.expect("offline group")
            assert out.since(m) == [
                "Login success, 4 missed message(s)",
                *(f"chang({me}) -> {to}: offline p2p {i}" for i in range(3)),
                f"[group {moon.group_id}] chang({me}): offline group",
            ]


async def test_argument_checks_and_what_read_and_login_say(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        port, s = port_of(server), server.settings
        async with repl_for(port, s) as (houyi, out):
            await houyi.execute("-lo houyi 123456")
            assert out.lines[-1] == "Login success"  # nothing missed: nothing more said
            gris = await c.login("gris", "123456")
            read = "Usage: -read userId [seq]  or  -read -g groupId [seq]"
            for line, answer in [
                ("-cl -5", "Usage: -cl [before]"),
                ("-read 2 -1", read),
                ("-read -2", read),
                ("-read -g 1 -3", read),
            ]:
                m = out.mark()
                failures = houyi.failures
                await houyi.execute(line)
                assert out.since(m) == [answer], line
                assert houyi.failures == failures + 1, line
            m = out.mark()
            await houyi.execute("-read 2")
            assert out.since(m) == ["No conversation with user 2"]
            moon = await houyi.im.create_group("moon")
            await houyi.execute(f"-read -g {moon.group_id}")
            assert out.lines[-1] == f"No messages in group {moon.group_id}"
            await gris.send_p2p(1, "one")
            await out.expect("gris(2): one")
            await houyi.execute("-read 2")
            assert out.lines[-1] == "Read up to 1 with user 2, 0 unread"
            for i in range(5):
                await gris.send_p2p(1, f"later {i}")
            await out.expect("later 4")
        # A login after them says how many come (as "Logged in again" does).
        async with repl_for(port, s) as (again, out):
            await again.execute("-lo gris 123456")
            await again.execute("-lo houyi 123456")
            await out.expect("later 4")
            assert [x for x in out.lines if x.startswith("Login success")] == [
                "Login success",
                "Login success, 5 missed message(s)",
            ]


async def test_a_piped_login_prints_every_missed_message_before_it_exits(tmp_path: Path) -> None:
    """``printf -- '-lo houyi 123456\\n' | bitchat client --device x``: the input ends
    right after the login line, and the client waits for what the login announced."""
    async with im_server(tmp_path / "data") as server, clients_of(server) as c:
        port = port_of(server)
        env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": ""}
        houyi = await c.login("houyi", "123456", device="x")
        await houyi.close()
        gris = await c.login("gris")
        count = 200
        for i in range(count):
            await gris.send_p2p(1, f"m{i}")
        lines = await run_client(port, "-lo houyi 123456\n", env, "--device", "x")
        assert lines[1] == f"Login success, {count} missed message(s)"
        assert lines[2:] == [f"gris(2): m{i}" for i in range(count)]
        # Printed and acked: the next run has nothing missed.
        lines = await run_client(port, "-lo houyi 123456\n", env, "--device", "x")
        assert lines[1:] == ["Login success"]
