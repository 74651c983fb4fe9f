"""HTTP, WebSocket, the browser chat page, the status API and metrics, on the server's port.

::

    first bytes of a connection (read by TcpConnection)
      0xBC ...................... the packet stream (TcpConnection keeps it)
      GET / POST / HEAD ... ..... HttpConnection (h11): the page, /status/*, /healthz,
                                  /metrics, the server API (/api/v1/, JSON: Api);
                                  a GET /ws with ``Upgrade: websocket``
                                  becomes a WsConnection (wsproto): a Session like a TCP one
      anything else ............. closed

:func:`install` sets ``server.web`` to a :class:`WebFrontend`; the composition root
(:func:`bitchat.app.build_server`) calls it in both modes. No HTTP or WebSocket
bytes are parsed here by hand: h11 and wsproto do all of it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from bitchat.web.api import Api
from bitchat.web.assets import StaticFiles
from bitchat.web.http import HttpConnection, looks_like_http
from bitchat.web.ws import WsConnection

if TYPE_CHECKING:
    from bitchat.files import FileService
    from bitchat.server import Server

__all__ = ["HttpConnection", "WebFrontend", "WsConnection", "install", "looks_like_http"]


class WebFrontend:
    """The HTTP side of a server's port: what ``server.web`` holds."""

    def __init__(self, server: Server, im: Any = None) -> None:
        self.server = server
        self.im = im
        self.static = StaticFiles()
        self.api = Api(server, im)
        """The server API under /api/v1/ (:mod:`bitchat.web.api`)."""
        self.files: FileService | None = server.data.get("files")
        """File uploads and downloads (:mod:`bitchat.web.files`), when the server has them."""
        self.connections: set[HttpConnection] = set()
        """HTTP connections not (yet) upgraded; WebSocket ones are server sessions."""
        server.on_shutdown.append(self._shutdown)

    def accepts(self, first_bytes: bytes) -> bool:
        """True when a connection's first bytes start an HTTP/1.x request."""
        return looks_like_http(first_bytes)

    def take_over(self, transport: asyncio.Transport, data: bytes, remote: str) -> None:
        """Become the connection's protocol and handle ``data``, its first bytes."""
        conn = HttpConnection(self, transport, remote)
        transport.set_protocol(conn)
        conn.data_received(data)

    async def _shutdown(self, server: Server) -> None:
        # Runs once the sessions are closed; idle keep-alive connections go now.
        for conn in list(self.connections):
            conn.close()


def install(server: Server, im: Any = None) -> WebFrontend:
    """Serve HTTP and WebSocket on ``server``'s port (``im`` is the IM service, if any)."""
    web = WebFrontend(server, im)
    server.web = web
    return web
