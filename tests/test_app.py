"""The composition root: ``bitchat.app.build_server(settings)`` picks the backends
``Settings.mode`` names, refuses incomplete settings naming what to fix, and
``bitchat server`` goes through it (its options' own checks are in
test_settings_config.py). Nothing here opens a database or Redis: the
servers are built, not started (test_cluster_nodes.py starts cluster nodes)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from bitchat import Server, Settings, UsageError
from bitchat.app import build_server, parse_address
from bitchat.cli import build_parser, server_cmd
from bitchat.cli.options import settings_from_args
from bitchat.cluster.connections import RedisConnectionCenter
from bitchat.cluster.node import advertised
from bitchat.cluster.pg import PgMessageCenter, PgUserCenter
from bitchat.im.memory import MemoryConnectionCenter
from bitchat.im.service import IMService
from bitchat.im.sqlite import SqliteMessageCenter, SqliteUserCenter
from bitchat.web import WebFrontend

REDIS = "redis://127.0.0.1:6379/0"
PG = "postgresql://postgres@127.0.0.1:5432/bitchat"


def cluster(**changes: Any) -> Settings:
    base = Settings(host="127.0.0.1", port=0, mode="cluster", redis_url=REDIS, pg_dsn=PG)
    return base.replace(**changes)


def im_of(server: Server) -> IMService:
    im = server.data["im"]
    assert type(im) is IMService  # one class of handlers for both modes
    return im


def test_standalone_is_sqlite_and_memory_with_the_web_front(tmp_path: Path) -> None:
    settings = Settings(host="127.0.0.1", port=19123, data_dir=str(tmp_path))
    server = build_server(settings)
    assert type(server) is Server and server.mode == "standalone"
    assert (server.host, server.port) == ("127.0.0.1", 19123)
    im = im_of(server)
    assert isinstance(im.users, SqliteUserCenter)
    assert isinstance(im.messages, SqliteMessageCenter)
    assert isinstance(im.connections, MemoryConnectionCenter)
    assert im.start_order == (im.users, im.messages, im.connections)
    assert isinstance(server.web, WebFrontend) and server.web.im is im
    assert "cluster" not in server.data
    assert not server.on_started and not server.on_stopping


async def test_cluster_is_postgres_and_redis_on_a_plain_server() -> None:
    server = build_server(cluster(node_id=7, advertise="10.0.0.5:8871"))
    center = server.data["cluster"]
    try:
        assert type(server) is Server and server.mode == "cluster"
        im = im_of(server)
        assert isinstance(im.users, PgUserCenter)
        assert isinstance(im.messages, PgMessageCenter)
        assert im.connections is center and isinstance(center, RedisConnectionCenter)
        assert im.users.db is im.messages.db  # one pool for both
        assert im.users.db.application_name == "bitchat-node-7"
        assert center.node_id == 7 and server.settings.node_id == 7
        # The node id is claimed before PostgreSQL is touched.
        assert im.start_order == (center, im.users, im.messages)
        # The cluster's difference is hooks: announce once listening, leave on stopping.
        assert len(server.on_started) == 1 and len(server.on_stopping) == 1
        assert center.load() == 0 and center.on_evicted is not None
        assert center.on_presence is not None and center.on_resync is not None
        assert isinstance(server.web, WebFrontend)
    finally:
        await center.redis.aclose()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"redis_url": None}, "mode: cluster mode needs redis_url (--redis-url, "),
        ({"redis_url": ""}, "mode: cluster mode needs redis_url"),
        ({"pg_dsn": ""}, "mode: cluster mode needs pg_dsn (--pg-dsn, "),
        ({"node_id": -1}, "node_id: expected an integer from 0 to 1023, got -1"),
        ({"node_id": 1024}, "node_id: expected an integer from 0 to 1023, got 1024"),
        ({"node_ttl": 0}, "node_ttl: expected a number > 0"),
        ({"advertise": "10.0.0.5"}, "expected HOST:PORT, got '10.0.0.5'"),
        ({"advertise": "host:99999"}, "expected HOST:PORT"),
        ({"mode": "galaxy"}, "mode: expected one of standalone, cluster"),
    ],
)
def test_incomplete_settings_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as err:
        build_server(cluster(**changes))
    assert message in str(err.value)


def test_addresses() -> None:
    assert parse_address("10.0.0.5:8871") == ("10.0.0.5", 8871)
    assert parse_address("[::1]:8871") == ("::1", 8871)
    for bad in ("8871", ":8871", "host:", "host:0", "host:x"):
        with pytest.raises(UsageError, match="expected HOST:PORT"):
            parse_address(bad)


def test_a_node_announces_its_advertised_or_bound_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Server("0.0.0.0", 8871)
    assert advertised(server, ("10.0.0.5", 9000)) == ("10.0.0.5", 9000)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, "bitchat.cluster.node"):
        assert advertised(server) == ("127.0.0.1", 8871)
    assert "without --advertise" in caplog.text
    assert advertised(Server("127.0.0.2", 8872)) == ("127.0.0.2", 8872)


def server_from(*argv: str) -> Server:
    args = build_parser().parse_args(["server", *argv])
    return server_cmd.build_server(settings_from_args(args, environ={}).settings)


def test_bitchat_server_builds_through_the_root(tmp_path: Path) -> None:
    server = server_from("--host", "127.0.0.1", "--port", "19124", "--data-dir", str(tmp_path))
    assert (server.host, server.port, server.mode) == ("127.0.0.1", 19124, "standalone")
    assert server.settings.mode == "standalone" and server.settings.port == 19124
    assert isinstance(im_of(server).users, SqliteUserCenter)


async def test_bitchat_server_cluster_options_reach_the_root() -> None:
    server = server_from(
        "--cluster", "--redis", REDIS, "--pg", PG, "--node-id", "3", "--advertise", "h:1"
    )
    center = server.data["cluster"]
    try:
        s = server.settings
        assert (s.mode, s.redis_url, s.pg_dsn, s.node_id, s.advertise) == (
            "cluster",
            REDIS,
            PG,
            3,
            "h:1",
        )
        assert isinstance(center, RedisConnectionCenter) and center.node_id == 3
    finally:
        await center.redis.aclose()


def test_bitchat_server_refuses_a_malformed_advertise_address() -> None:
    with pytest.raises(UsageError, match="expected HOST:PORT, got 'x'"):
        server_from("--cluster", "--redis", REDIS, "--pg", PG, "--node-id", "1", "--advertise", "x")


def test_the_readme_example_builds_a_standalone_server() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The chat server in your own program", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    run = "asyncio.run(build_server(settings).serve_forever())"
    assert run in match.group(1)
    namespace: dict[str, Any] = {}
    exec(match.group(1).replace(run, "server = build_server(settings)"), namespace)
    server = namespace["server"]
    assert (server.host, server.port, server.mode) == ("127.0.0.1", 8864, "standalone")


def test_the_readme_quotes_the_message_of_a_missing_redis_url() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The chat server in your own program", 1)[1].split("\n## ")[0]
    with pytest.raises(UsageError) as err:
        build_server(Settings(mode="cluster"))
    assert f"`{err.value}`" in " ".join(section.split())


def test_a_server_loads_only_what_it_uses(tmp_path: Path) -> None:
    """`bitchat server` built as the command builds it leaves the client's and the
    bench's modules, PyJWT (cryptography), Pillow, filetype and jsonschema unloaded:
    each costs megabytes of resident memory, and each is loaded on first use (a JWT
    login, an upload, an API request). A fresh interpreter: this one has them all."""
    import subprocess
    import sys

    code = f"""
import sys
from bitchat.cli import build_parser, server_cmd
from bitchat.cli.options import settings_from_args
args = build_parser(["server"]).parse_args(["server", "--data-dir", {str(tmp_path)!r}])
server_cmd.build_server(settings_from_args(args, environ={{}}).settings)
heavy = ("jwt", "cryptography", "PIL", "filetype", "jsonschema", "bitchat.cli.client_cmd",
         "bitchat.cli.bench_cmd", "bitchat.bench", "prompt_toolkit", "rich")
print(" ".join(m for m in heavy if m in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == ""
