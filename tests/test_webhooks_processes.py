"""Webhooks survive ``kill -9``: events committed while the receiver refused them are
delivered once a server runs again (standalone: the same server restarted; cluster:
another node), each at least once, in order per conversation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bitchat.im.client import IMClient
from bitchat.webhooks import verify
from cluster_support import (  # noqa: F401 (fixtures)
    REDIS_URL,
    WAIT,
    Proc,
    ProcessCluster,
    cluster_settings,
    free_port,
    pg_dsn_fixture,
    redis_prefix_fixture,
)
from webhook_support import Receiver

SECRET = "kill-nine-secret"
MESSAGES = 10


def webhook_options(url: str) -> list[str]:
    return [
        "--webhook-urls",
        url,
        "--webhook-secret",
        SECRET,
        "--webhook-events",
        "message.stored",
        "--webhook-backoff-base",
        "0.05",
        "--webhook-backoff-max",
        "0.2",
        "--webhook-poll-interval",
        "0.05",
        "--webhook-timeout",
        "1",
        "--webhook-max-attempts",
        "100000",
    ]


@pytest.fixture
async def clients() -> AsyncIterator[list[IMClient]]:
    made: list[IMClient] = []
    yield made
    for im in made:
        await im.close()


async def login(clients: list[IMClient], port: int, name: str) -> IMClient:
    im = IMClient("127.0.0.1", port, cluster_settings(), reconnect=False)
    clients.append(im)
    await im.connect(WAIT)
    await im.login(name, "pw")
    return im


async def send_while_refused(
    receiver: Receiver, clients: list[IMClient], port: int
) -> tuple[list[int], list[int]]:
    """Messages from alice to bob and to carol, each acked (so stored, its event with
    it), while the receiver answers 500; once it has refused some, the ids."""
    alice = await login(clients, port, "alice")
    bob = await login(clients, port, "bob")
    carol = await login(clients, port, "carol")
    assert bob.user is not None and carol.user is not None
    to_bob, to_carol = [], []
    for i in range(MESSAGES):
        to_bob.append((await alice.send_p2p(bob.user.id, f"b{i}")).msg_id)
        to_carol.append((await alice.send_p2p(carol.user.id, f"c{i}")).msg_id)
    await receiver.wait_until(lambda: len(receiver.requests) >= 3, what="refused deliveries")
    assert not receiver.accepted
    for im in clients:
        await im.close()
    clients.clear()
    return to_bob, to_carol


def check_everything_arrived(receiver: Receiver, to_bob: list[int], to_carol: list[int]) -> None:
    for d in receiver.accepted:
        assert verify(SECRET, d.headers["x-bitchat-signature"], d.body)
    events = receiver.events("message.stored")
    by_to: dict[int, list[int]] = {}
    for e in events:
        by_to.setdefault(e["data"]["to"], []).append(e["data"]["msg_id"])
    assert sorted(by_to.values()) == sorted([to_bob, to_carol])  # each in order, once


async def test_standalone_kill9_between_commit_and_delivery(
    tmp_path: Path, clients: list[IMClient]
) -> None:
    port = free_port()
    async with Receiver(status=500) as receiver:
        args = [
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--rate-limit",
            "0",
            "--password-hash-time-cost",
            "1",
            "--password-hash-memory-kib",
            "8",
            *webhook_options(receiver.url),
        ]
        first = Proc("server", args)
        try:
            await first.start(r"bitchat .* started on", timeout=4 * WAIT)
            to_bob, to_carol = await send_while_refused(receiver, clients, port)
            first.kill9()
            assert await first.wait_exit() == -9
        finally:
            await first.stop()
        receiver.status = 200
        again = Proc("server again", args)
        try:
            await again.start(r"bitchat .* started on", timeout=4 * WAIT)
            await receiver.wait_until(
                lambda: len(receiver.events("message.stored")) == 2 * MESSAGES,
                timeout=4 * WAIT,
            )
        finally:
            await again.stop()
        check_everything_arrived(receiver, to_bob, to_carol)


async def test_cluster_kill9_another_node_delivers(redis_prefix: str, pg_dsn: str) -> None:
    cluster = ProcessCluster(REDIS_URL, redis_prefix, pg_dsn)
    made: list[IMClient] = []
    try:
        async with Receiver(status=500) as receiver:
            options = webhook_options(receiver.url)
            victim = await cluster.node(1, extra=options)
            to_bob, to_carol = await send_while_refused(receiver, made, cluster.port_of(1))
            victim.kill9()
            assert await victim.wait_exit() == -9
            receiver.status = 200
            await cluster.node(2, extra=options)
            await receiver.wait_until(
                lambda: len(receiver.events("message.stored")) == 2 * MESSAGES,
                timeout=4 * WAIT,
            )
            check_everything_arrived(receiver, to_bob, to_carol)
    finally:
        for im in made:
            await im.close()
        await cluster.close()


async def run_cli(*args: str) -> tuple[int, str, str]:
    import asyncio
    import os
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bitchat",
        "webhooks",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 4 * WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_bitchat_webhooks_lists_and_replays_dead_letters(tmp_path: Path) -> None:
    import json

    from bitchat.app import build_server
    from im_helpers import Clients, im_settings

    data = str(tmp_path / "data")
    async with Receiver(status=500) as receiver:
        settings = im_settings(
            data,
            host="127.0.0.1",
            port=0,
            webhook_urls=(receiver.url,),
            webhook_secret=SECRET,
            webhook_events=("message.stored",),
            webhook_max_attempts=1,
        )
        server = build_server(settings)
        async with server:
            c = Clients(server.address[1], server.settings)
            try:
                alice = await c.login("alice")
                bob = await c.login("bob")
                assert bob.user is not None
                ack = await alice.send_p2p(bob.user.id, "lost")
                await receiver.wait_until(lambda: len(receiver.requests) == 1)
            finally:
                await c.close()
        url = receiver.url
    # The server has stopped: deliveries under way were recorded before it did.
    rc, out, err = await run_cli("dead", "--data-dir", data, "--json")
    assert rc == 0, err
    [line] = out.splitlines()
    letter = json.loads(line)
    assert (letter["type"], letter["attempts"], letter["last_error"]) == (
        "message.stored",
        1,
        "HTTP 500",
    )
    assert letter["endpoint"] == url
    rc, out, err = await run_cli("dead", "--data-dir", data)
    assert rc == 0 and str(letter["id"]) in out and "1 dead letter(s)" in err
    rc, out, _ = await run_cli("replay", "--data-dir", data, str(letter["id"] + 1000))
    assert rc == 1 and "0 dead letter(s)" in out
    rc, out, _ = await run_cli("replay", "--data-dir", data, "--all")
    assert rc == 0 and "1 dead letter(s) pending again" in out
    rc, out, err = await run_cli("dead", "--data-dir", data, "--json")
    assert rc == 0 and out == ""
    assert ack.msg_id
