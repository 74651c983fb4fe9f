"""``bitchat server|router|client`` with --config and BITCHAT_*, as a user runs them."""

from __future__ import annotations

import asyncio
import re
import signal
import tomllib
from pathlib import Path

import pytest

from bitchat import RequestError, codes
from bitchat.im.client import IMClient
from conftest import WAIT as BASE_WAIT
from im_helpers import PYTHON, free_port, subprocess_env

WAIT = 4 * BASE_WAIT  # a cold interpreter start, imports, database setup


async def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m bitchat ARGV`` to its end: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bitchat",
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**subprocess_env(), **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("toml", "env", "argv", "message"),
    [
        (
            "max_mesage_length = 2000\n",
            {},
            [],
            "{config}: max_mesage_length: unknown setting (did you mean max_message_length?)",
        ),
        (
            'max_message_length = "abc"\n',
            {},
            [],
            '{config}: max_message_length: expected an integer >= 1, got "abc"',
        ),
        (
            "",
            {"BITCHAT_RATE_LIMIT": "fast"},
            [],
            'environment BITCHAT_RATE_LIMIT: expected a number >= 0, got "fast"',
        ),
        (
            "",
            {"BITCHAT_NODE_IDD": "1"},
            [],
            "environment BITCHAT_NODE_IDD: unknown setting (did you mean BITCHAT_NODE_ID?)",
        ),
        ("", {}, ["--max-group-size", "0"], "--max-group-size: expected an integer >= 1, got 0"),
    ],
    ids=["unknown-key", "bad-type", "bad-env", "unknown-env", "bad-option"],
)
async def test_a_bad_setting_stops_the_server_before_it_listens(
    tmp_path: Path, toml: str, env: dict[str, str], argv: list[str], message: str
) -> None:
    config = tmp_path / "bitchat.toml"
    config.write_text(toml)
    port = free_port()
    status, out, err = await run(
        "server",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "data"),
        *argv,
        env=env,
    )
    assert status == 2, err
    assert f"ERROR   bitchat.cli: invalid settings: {message.format(config=config)}\n" in err
    assert "started on" not in err and "Traceback" not in err and out == ""
    assert not (tmp_path / "data").exists()  # nothing was set up
    with pytest.raises(OSError):  # and nothing listens
        await asyncio.open_connection("127.0.0.1", port)


async def test_the_server_runs_with_its_config_file(tmp_path: Path) -> None:
    config = tmp_path / "bitchat.toml"
    data_dir = tmp_path / "data"
    config.write_text(
        'host = "127.0.0.1"\n'
        "port = 1\n"  # --port 0 below wins
        f"data_dir = {str(data_dir)!r}\n"
        "max_message_length = 5\n"
        "rate_limit = 0.001\n"  # BITCHAT_RATE_LIMIT=0 below wins: no limit
        "rate_burst = 1\n"
        "password_hash_time_cost = 1\n"
        "password_hash_memory_kib = 8\n"
    )
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bitchat",
        "server",
        "--config",
        str(config),
        "--port",
        "0",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**subprocess_env(), "BITCHAT_RATE_LIMIT": "0"},
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:

        async def started() -> str:
            assert proc.stderr is not None
            while True:
                raw = await proc.stderr.readline()
                if not raw:
                    raise AssertionError("no start line before exit:\n" + "".join(log))
                log.append(raw.decode())
                if "bitchat server started on" in log[-1]:
                    return log[-1]

        line = await asyncio.wait_for(started(), WAIT)
        found = re.search(r"started on 127\.0\.0\.1:(\d+) ", line)
        assert found, line
        port = int(found.group(1))
        assert port not in (0, 1)
        assert f"settings from {config}" in "".join(log)
        assert (data_dir / "bitchat.db").exists()
        async with IMClient("127.0.0.1", port) as houyi, IMClient("127.0.0.1", port) as gris:
            await asyncio.wait_for(houyi.login("houyi", "123456"), WAIT)
            await asyncio.wait_for(gris.login("gris", "123456"), WAIT)
            await asyncio.wait_for(gris.send_p2p(1, "hello"), WAIT)  # 5 characters: allowed
            with pytest.raises(RequestError) as info:
                await asyncio.wait_for(gris.send_p2p(1, "hello!"), WAIT)
            assert info.value.code == codes.MESSAGE_TOO_LONG
            # Under the file's rate limit, one request would be all a connection gets.
            for _ in range(10):
                await asyncio.wait_for(gris.send_p2p(1, "hi"), WAIT)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_print_config_prints_toml_that_reads_back(tmp_path: Path) -> None:
    config = tmp_path / "bitchat.toml"
    config.write_text('max_message_length = 2000\nadmin_token = "s3cret"\n[extra]\nmotd = "hi"\n')
    status, out, err = await run(
        "server",
        "--config",
        str(config),
        "--port",
        "9000",
        "--print-config",
        env={"BITCHAT_RATE_LIMIT": "20"},
    )
    assert status == 0, err
    parsed = tomllib.loads(out)
    assert parsed["max_message_length"] == 2000 and parsed["port"] == 9000
    assert parsed["rate_limit"] == 20.0 and parsed["extra"] == {"motd": "hi"}
    assert "tls_cert" not in parsed
    assert "port = 9000  # from --port" in out
    # The printed file, given back, gives the same settings.
    again = tmp_path / "again.toml"
    again.write_text(out)
    status, out2, err = await run("server", "--config", str(again), "--print-config")
    assert status == 0, err
    assert tomllib.loads(out2) == parsed


async def test_the_router_takes_config_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text('router_policy = "round_robin"\nredis_prefix = "file:"\n')
    status, out, err = await run(
        "router",
        "--config",
        str(config),
        "--print-config",
        env={"BITCHAT_REDIS_PREFIX": "env:"},
    )
    assert status == 0, err
    parsed = tomllib.loads(out)
    assert (parsed["router_policy"], parsed["redis_prefix"]) == ("round_robin", "env:")
    assert (parsed["port"], parsed["redis_url"]) == (8870, "redis://127.0.0.1:6379/0")
    status, out, err = await run("router", "--config", str(config), "--policy", "random")
    assert status == 2 and out == ""
    assert (
        'invalid settings: --policy: expected one of least_connections, round_robin, got "random"'
        in err
    )


async def test_the_client_takes_config_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text("request_timeout = 2.5\nheartbeat_interval = 9.0\n")
    status, out, err = await run(
        "client",
        "--config",
        str(config),
        "--print-config",
        env={"BITCHAT_HEARTBEAT_INTERVAL": "0.5"},
    )
    assert status == 0, err
    parsed = tomllib.loads(out)
    assert (parsed["request_timeout"], parsed["heartbeat_interval"]) == (2.5, 0.5)
    status, out, err = await run("client", "--config", str(config), env={"BITCHAT_PROT": "1"})
    assert status == 2 and out == ""
    assert (
        "bitchat client: environment BITCHAT_PROT: unknown setting (did you mean BITCHAT_PORT?)"
        in err
    )
