"""Password hashing is bounded and its memory comes back (issue 10, item 2).

A storm of 200 concurrent password logins at the production cost (argon2id,
19 MiB, 2 passes) against a server subprocess: its RSS grows by at most the
pool's hashes at once, and comes back near the baseline after the storm.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from bitchat import Settings
from bitchat.im.packets import Login, LoginOk
from bitchat.im.passwords import Passwords
from conftest import WAIT, RawPeer
from im_helpers import PYTHON, free_port, subprocess_env


class CountingHasher(PasswordHasher):
    """Cheap hashes that record how many run at once."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.lock = threading.Lock()
        self.now = self.most = 0

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.01)  # long enough for the others to pile up
            return super().hash(password, salt=salt)
        finally:
            with self.lock:
                self.now -= 1


async def test_hashes_run_at_most_concurrency_at_once_and_the_pool_trims_when_idle() -> None:
    hasher = CountingHasher()
    passwords = Passwords(hasher, concurrency=2)
    try:
        digests = await asyncio.gather(*(passwords.hash(f"pw{i}") for i in range(12)))
        assert hasher.most == 2
        assert passwords.trims == 1  # one burst, one trim at its end
        assert await passwords.verify(digests[3], "pw3")
        assert not await passwords.verify(digests[3], "pw4")
        assert passwords.trims == 3
    finally:
        passwords.close()
    # 0 is one thread per core.
    assert Passwords(concurrency=0).concurrency >= 1
    assert Passwords.for_settings(Settings(password_hash_concurrency=3)).concurrency == 3


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


STORM = 200
CONCURRENCY = 2
HASH_MIB = 19


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_a_storm_of_logins_leaves_the_memory_as_it_found_it(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bitchat",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "data"),
        "--rate-limit",
        "0",
        # The production hash cost (19 MiB, 2 passes) is the default: not lowered here.
        "--password-hash-concurrency",
        str(CONCURRENCY),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    assert proc.stderr is not None
    try:
        while b"started on" not in await asyncio.wait_for(proc.stderr.readline(), 4 * WAIT):
            pass
        drain = asyncio.create_task(proc.stderr.read())

        async def login(rid: int) -> int:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), WAIT
            )
            peer = RawPeer(reader, writer)
            try:
                peer.send_frame(Login.TYPE, {"name": "houyi", "password": "secret"}, rid=rid)
                # The last of the storm waits for 199 hashes: longer than one WAIT.
                head = await asyncio.wait_for(reader.readexactly(14), 6 * WAIT)
                type_ = int.from_bytes(head[4:6], "big")
                answer = await asyncio.wait_for(
                    reader.readexactly(int.from_bytes(head[10:14], "big")), WAIT
                )
                assert type_ == LoginOk.TYPE, answer
                return type_
            finally:
                await peer.close()

        await login(1)  # registers houyi: argon2 and its first block are in
        base = rss_kib(proc.pid)
        peak = base
        storm = asyncio.gather(*(login(i) for i in range(2, STORM + 2)))
        while not storm.done():
            peak = max(peak, rss_kib(proc.pid))
            await asyncio.wait([storm], timeout=0.02)
        assert len(await storm) == STORM
        after = base
        for _ in range(100):  # bounded: the trim runs as the pool goes idle
            after = rss_kib(proc.pid)
            if after - base < 16 * 1024:
                break
            await asyncio.sleep(0.05)
        print(
            f"RSS before the storm {base / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
            f"after {after / 1024:.1f} MiB"
        )
        # At most the pool's hashes at once (with a default pool of 6: 150 MiB, kept).
        assert (peak - base) / 1024 < CONCURRENCY * HASH_MIB + 24, f"peak {peak / 1024:.0f} MiB"
        # Back near the baseline: less than one hash's block is left.
        assert (after - base) / 1024 < 16, f"RSS {after / 1024:.0f} MiB, base {base / 1024:.0f}"
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 4 * WAIT)
