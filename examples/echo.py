"""A custom service in 25 lines: one packet, one handler, a server and a client."""

import asyncio

from bitchat import Client, Packet, Server


class Echo(Packet, type=1000):
    text: str


class EchoReply(Packet, type=1001):
    text: str


async def main(port: int = 8865) -> str:
    server = Server("127.0.0.1", port)

    @server.handler(Echo)
    async def echo(session, packet: Echo) -> EchoReply:
        return EchoReply(packet.text.upper())

    async with server, Client("127.0.0.1", server.address[1]) as client:
        reply = await client.request(Echo("hello, bitchat"))
        print(reply.text)
        return reply.text


if __name__ == "__main__":
    asyncio.run(main())
