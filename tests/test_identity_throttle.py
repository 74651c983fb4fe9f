"""Password guessing is slowed per account and per address (issue 10, item 9).

The rules are checked on :class:`MemoryLoginThrottle` with a fake clock; then the
attack runs against real servers on loopback: many wrong passwords, fast, from
one connection, from 16, and from several addresses (127.0.0.x), standalone and
on a two-node cluster sharing its counts in real Redis. The attacks are slowed
to the configured rate, and the owner, on another address, gets in after at
most the account's delay.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bitchat import Server, Settings, codes
from bitchat.im.packets import Login, LoginOk
from bitchat.im.throttle import MemoryLoginThrottle, Rule, remote_address
from cluster_support import (  # noqa: F401 (fixtures)
    REDIS_URL,
    cluster_settings,
    node_maker,
    pg_dsn_fixture,
    redis_prefix_fixture,
)
from conftest import WAIT, RawPeer
from im_helpers import im_server, port_of

# Short timers: three free attempts, then 0.1 s doubling; an account waits at most
# 0.4 s, an address up to 5 s.
THROTTLE: dict[str, Any] = {
    "login_free_attempts": 3,
    "login_address_free_attempts": 3,
    "login_address_concurrency": 2,
    "login_delay": 0.1,
    "login_max_delay": 0.4,
    "login_address_max_delay": 5.0,
    "login_failure_window": 60.0,
}
ATTACK_SECONDS = 2.0


# -- the rules, on a fake clock -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(**changes: Any) -> tuple[MemoryLoginThrottle, Clock]:
    clock = Clock()
    return MemoryLoginThrottle(Settings(**{**THROTTLE, **changes}), clock), clock


def test_the_delay_doubles_after_the_free_attempts_up_to_the_cap() -> None:
    rule = Rule(free=3, base=0.1, cap=0.4)
    assert [rule.delay(n) for n in range(7)] == [0, 0, 0, 0.1, 0.2, 0.4, 0.4]
    assert Rule(3, 1.0, 30.0).delay(10**6) == 30.0  # no overflow
    assert Rule(3, 0.0, 30.0).delay(100) == 0  # base 0: off


def test_failures_make_attempts_wait_and_early_ones_are_not_counted() -> None:
    t, clock = throttle()
    for _ in range(3):  # free, even at once (attempts under way count)
        assert t.attempt_now("houyi", "10.0.0.1") == 0
    wait = t.attempt_now("houyi", "10.0.0.1")
    assert wait == pytest.approx(0.1)
    for _ in range(50):  # hammering meanwhile changes nothing
        assert t.attempt_now("houyi", "10.0.0.1") == pytest.approx(0.1)
    clock.now += 0.1
    assert t.attempt_now("houyi", "10.0.0.1") == 0  # the 4th: then 0.2 s
    clock.now += 0.1
    assert t.attempt_now("houyi", "10.0.0.1") == pytest.approx(0.1)
    clock.now += 0.1
    assert t.attempt_now("houyi", "10.0.0.1") == 0


def test_the_owner_elsewhere_waits_at_most_the_account_cap() -> None:
    t, clock = throttle()
    # One attacker address: its own wait grows past the account's cap.
    waits = []
    for _ in range(200):
        wait = t.attempt_now("houyi", "10.6.6.6")
        if wait:
            waits.append(wait)
            clock.now += wait
    assert max(waits) == pytest.approx(5.0)
    # The owner on another address: at most 0.4 s, then the right password goes.
    while wait := t.attempt_now("houyi", "10.6.6.6"):  # its last attempt just now
        clock.now += wait
    wait = t.attempt_now("houyi", "192.0.2.7")
    assert 0 <= wait <= 0.4 + 1e-9
    if wait:
        clock.now += wait
        assert t.attempt_now("houyi", "192.0.2.7") == 0
    t.forgive_now("houyi", "192.0.2.7")  # it was the right password
    # The attacker still waits for its address.
    assert t.attempt_now("houyi", "10.6.6.6") > 0.4


def test_forgiven_attempts_do_not_count() -> None:
    t, _ = throttle()
    for _ in range(100):  # a hundred right passwords, one after the other
        assert t.attempt_now("houyi", "10.0.0.1") == 0
        t.forgive_now("houyi", "10.0.0.1")
    assert len(t) == 0


def test_failures_are_forgotten_after_the_window_and_entries_are_bounded() -> None:
    t, clock = throttle(login_failure_window=10.0, login_throttle_max_entries=50)
    for _ in range(3):
        t.attempt_now("houyi", "10.0.0.1")
    assert t.attempt_now("houyi", "10.0.0.1") > 0
    clock.now += 10.0
    assert t.attempt_now("houyi", "10.0.0.1") == 0
    for i in range(1000):  # many names, many addresses: the oldest go first
        t.attempt_now(f"user{i}", f"10.1.{i // 250}.{i % 250}")
    assert len(t) <= 50


def test_the_address_of_a_remote() -> None:
    assert remote_address("127.0.0.1:5555") == "127.0.0.1"
    assert remote_address("::1:5555") == "::/64"
    assert remote_address("2001:db8:1:2:3:4:5:6:443") == "2001:db8:1:2::/64"
    assert remote_address("2001:db8:1:2:ffff::9:443") == "2001:db8:1:2::/64"  # one /64
    assert remote_address("[2001:db8::1]:80") == "2001:db8::/64"
    assert remote_address("::ffff:192.0.2.1:80") == "192.0.2.1"
    assert remote_address("?") == "?"


def test_off_when_the_delay_is_zero() -> None:
    t, _ = throttle(login_delay=0.0)
    assert all(t.attempt_now("houyi", "10.0.0.1") == 0 for _ in range(100))


# -- the attack, on real servers --------------------------------------------------------------


def login_frame(name: str, password: str, rid: int) -> bytes:
    return RawPeer.frame(Login.TYPE, {"name": name, "password": password}, rid=rid)


class Tally:
    """What the server answered an attacker."""

    def __init__(self) -> None:
        self.checked = 0  # login_failed: the password was checked
        self.throttled = 0
        self.waits: list[float] = []
        self.throttling = asyncio.Event()  # the first throttled answer came

    def add(self, body: dict[str, Any]) -> None:
        if body.get("code") == codes.LOGIN_FAILED:
            self.checked += 1
        elif body.get("code") == codes.LOGIN_THROTTLED:
            self.throttled += 1
            self.waits.append(retry_after(body["message"]))
            self.throttling.set()
        else:
            raise AssertionError(f"unexpected answer {body}")


def retry_after(message: str) -> float:
    found = re.search(r"retry in ([0-9.]+) s", message)
    assert found, message
    return float(found.group(1))


async def attack(peers: list[RawPeer], tally: Tally, seconds: float) -> None:
    """Wrong passwords as fast as the answers come, on every peer (bounded)."""

    async def one(peer: RawPeer) -> None:
        deadline = time.monotonic() + seconds
        for rid in range(1, 20_000):
            if time.monotonic() > deadline:
                return
            peer.send(login_frame("houyi", f"guess{rid}", rid))
            _, _, _, _, body = await peer.read_frame()
            tally.add(body)

    await asyncio.gather(*(one(p) for p in peers))


async def owner_logs_in(peer: RawPeer, cap: float) -> float:
    """The owner's right password, obeying each retry-after (each at most ``cap``);
    the seconds it took."""
    start = time.monotonic()
    for rid in range(1, 50):
        _, _, type_, _, body = await peer.request(
            Login.TYPE, {"name": "houyi", "password": "right"}, rid=rid
        )
        if type_ == LoginOk.TYPE:
            assert body["name"] == "houyi"
            return time.monotonic() - start
        assert body["code"] == codes.LOGIN_THROTTLED, body
        wait = retry_after(body["message"])
        assert wait <= cap + 0.1, f"the owner was told to wait {wait} s"
        await asyncio.sleep(wait)  # the server's own timer, 0.4 s at most
    raise AssertionError("the owner never got in")


def bound(seconds: float, free: int = 3, base: float = 0.1, cap: float = 5.0) -> int:
    """Most checked passwords one address can have in ``seconds``: the free ones,
    then one per delay (0.1, 0.2, 0.4 ... s), plus one for the edges."""
    n, t, delay = free, 0.0, base
    while t + delay <= seconds:
        t += delay
        n += 1
        delay = min(cap, delay * 2)
    return n + 1


Connect = Callable[..., Awaitable[RawPeer]]


async def peers_from(raw_connect: Connect, port: int, address: str, n: int) -> list[RawPeer]:
    return [await raw_connect(port, local_addr=(address, 0)) for _ in range(n)]


async def register_owner(raw_connect: Connect, port: int) -> None:
    peer = await raw_connect(port, local_addr=("127.0.0.9", 0))
    _, _, type_, _, body = await peer.request(
        Login.TYPE, {"name": "houyi", "password": "right"}, rid=1
    )
    assert type_ == LoginOk.TYPE, body
    await peer.close()


@pytest.mark.parametrize("connections", [1, 16])
async def test_guessing_from_one_address_is_slowed_and_the_owner_gets_in(
    tmp_path: Path, raw_connect: Connect, connections: int
) -> None:
    async with im_server(tmp_path, **THROTTLE) as server:
        port = port_of(server)
        await register_owner(raw_connect, port)
        attackers = await peers_from(raw_connect, port, "127.0.0.1", connections)
        tally = Tally()
        running = asyncio.create_task(attack(attackers, tally, ATTACK_SECONDS))
        await asyncio.wait_for(tally.throttling.wait(), WAIT)  # the attack is throttled
        owner = await raw_connect(port, local_addr=("127.0.0.2", 0))
        took = await owner_logs_in(owner, THROTTLE["login_max_delay"])
        await running
        # Without the throttle this is thousands (cheap hashes in the tests).
        assert tally.checked <= bound(ATTACK_SECONDS), vars(tally)
        assert tally.throttled > tally.checked
        assert took <= 3 * THROTTLE["login_max_delay"] + 1.0


async def test_guessing_from_several_addresses_is_held_to_the_account_rate(
    tmp_path: Path, raw_connect: Connect
) -> None:
    async with im_server(tmp_path, **THROTTLE) as server:
        port = port_of(server)
        await register_owner(raw_connect, port)
        attackers = []
        for i in range(4):
            attackers += await peers_from(raw_connect, port, f"127.0.0.{10 + i}", 4)
        tally = Tally()
        await attack(attackers, tally, ATTACK_SECONDS)
        # The account's delay (0.1, 0.2, then 0.4 s) paces them all together.
        assert tally.checked <= bound(ATTACK_SECONDS, cap=0.4) + 4, vars(tally)
        assert max(tally.waits) <= THROTTLE["login_address_max_delay"] + 0.1
        owner = await raw_connect(port, local_addr=("127.0.0.2", 0))
        await owner_logs_in(owner, THROTTLE["login_max_delay"])


async def test_a_burst_of_right_passwords_from_one_address_is_not_throttled(
    tmp_path: Path, raw_connect: Connect
) -> None:
    # 40 users behind one address (a NAT, a restart), all at once, three free
    # attempts: each address checks a few at a time, and right ones do not count.
    async with im_server(tmp_path, **THROTTLE) as server:
        port = port_of(server)
        peers = await peers_from(raw_connect, port, "127.0.0.1", 40)

        async def login(i: int, peer: RawPeer) -> int:
            body = {"name": f"user{i % 20}", "password": "right"}  # 20 twice each
            _, _, type_, _, answer = await peer.request(Login.TYPE, body, rid=1)
            assert type_ == LoginOk.TYPE, answer
            return type_

        await asyncio.gather(*(login(i, p) for i, p in enumerate(peers)))
        assert not server.data["im"].throttle._turns  # every turn was given back


# -- a cluster: the counts in Redis -------------------------------------------------------------


@pytest.fixture
async def two_nodes(redis_prefix: str, pg_dsn: str) -> AsyncIterator[list[Server]]:
    async with node_maker(redis_prefix, pg_dsn) as make:
        yield [await make(1, **THROTTLE), await make(2, **THROTTLE)]


async def test_a_cluster_shares_the_counts(
    two_nodes: list[Server], raw_connect: Connect, redis_prefix: str
) -> None:
    a, b = (port_of(s) for s in two_nodes)
    await register_owner(raw_connect, a)
    # The attacker spreads over both nodes; the counts are one.
    attackers = [
        *await peers_from(raw_connect, a, "127.0.0.1", 4),
        *await peers_from(raw_connect, b, "127.0.0.1", 4),
    ]
    tally = Tally()
    running = asyncio.create_task(attack(attackers, tally, ATTACK_SECONDS))
    await asyncio.wait_for(tally.throttling.wait(), WAIT)  # the attack is throttled
    owner = await raw_connect(b, local_addr=("127.0.0.2", 0))
    await owner_logs_in(owner, THROTTLE["login_max_delay"])
    await running
    assert tally.checked <= bound(ATTACK_SECONDS) + 1, vars(tally)
    assert tally.throttled > tally.checked
    # The counts live in Redis, each expiring a window after its last failure.
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}login:*")]
        assert len(keys) >= 2
        for key in keys:
            assert 0 < await client.pttl(key) <= THROTTLE["login_failure_window"] * 1000
    finally:
        await client.aclose()
