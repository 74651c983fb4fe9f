"""A real HTTP receiver of webhook deliveries on 127.0.0.1 (asyncio + h11), for tests.

It answers each POST with :attr:`Receiver.status` (change it to make it fail and
recover), records every request, and lets a test wait for what it has received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11

from conftest import WAIT


@dataclass
class Delivery:
    """One request the receiver got, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Receiver:
    """An HTTP/1.1 server (keep-alive) recording deliveries; ``url`` is its address."""

    def __init__(self, status: int = 200, path: str = "/hook") -> None:
        self.status = status
        self.path = path
        self.requests: list[Delivery] = []
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.gate: asyncio.Event | None = None
        """When set to an Event, each request waits for it before being answered."""
        self.waiting = 0
        """Requests received and not answered yet (held by the gate)."""

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}{self.path}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what came -------------------------------------------------------------------------

    @property
    def accepted(self) -> list[Delivery]:
        """The deliveries answered 2xx, in arrival order."""
        return [d for d in self.requests if d.ok]

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        """The bodies accepted, repeats (same id) dropped, optionally of one type."""
        seen: set[str] = set()
        out = []
        for d in self.accepted:
            e = d.event
            if e["id"] in seen or (type_ is not None and e["type"] != type_):
                continue
            seen.add(e["id"])
            out.append(e)
        return out

    async def wait_until(
        self, check: Callable[[], bool], timeout: float = WAIT, what: str = "deliveries"
    ) -> None:
        """Until ``check()`` holds, re-checked at each request received."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(check), timeout)
            except TimeoutError:
                got = [(d.status, d.event.get("type")) for d in self.requests[-20:]]
                raise AssertionError(f"{what}: not within {timeout:.1f}s; last: {got}") from None

    # -- the server ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        return
                assert request is not None
                if self.gate is not None and not self.gate.is_set():
                    async with self._changed:
                        self.waiting += 1
                        self._changed.notify_all()
                    await self.gate.wait()
                    async with self._changed:
                        self.waiting -= 1
                status = self.status
                delivery = Delivery(
                    request.method.decode(),
                    request.target.decode(),
                    {k.decode().lower(): v.decode() for k, v in request.headers},
                    body,
                    status,
                )
                body_out = b"" if status in (204, 304) else b"ok"
                headers = [] if status in (204, 304) else [("Content-Length", "2")]
                out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
                if body_out:
                    out += conn.send(h11.Data(data=body_out)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                writer.write(out)
                await writer.drain()
                async with self._changed:
                    self.requests.append(delivery)
                    self._changed.notify_all()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
