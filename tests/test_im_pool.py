"""The POOL flag never moves an IM handler off the loop (its state is loop-only)."""

from __future__ import annotations

import threading
from pathlib import Path

from bitchat import Client, Packet
from bitchat.im.packets import SendAck, SendP2P
from bitchat.server import Server
from im_helpers import Inbox, clients_of, im_server


class Hello(Packet, type=4101):
    text: str


class Hi(Packet, type=4102):
    text: str


async def test_im_sends_with_pool_flag_stay_on_the_loop_in_order(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        gris = await c.login("gris")
        inbox = Inbox(houyi)
        assert houyi.user is not None
        acks = []
        for i in range(20):
            ack = await gris.client.request(SendP2P(houyi.user.id, f"m{i}", f"c{i}"), pool=True)
            assert isinstance(ack, SendAck)
            acks.append(ack.msg_id)
        assert acks == sorted(acks)
        got = await inbox.wait_for(20)
        assert [m.text for m in got] == [f"m{i}" for i in range(20)]


async def test_poolable_false_ignores_the_flag(tmp_path: Path) -> None:
    threads: list[str] = []

    def hello(session: object, p: Hello) -> Hi:
        threads.append(threading.current_thread().name)
        return Hi(p.text)

    server = Server("127.0.0.1", 0)
    server.add_handler(Hello, hello, poolable=False)
    async with server, Client("127.0.0.1", server.address[1]) as client:
        assert await client.request(Hello("x"), pool=True) == Hi("x")
    assert threads == [threading.main_thread().name]
