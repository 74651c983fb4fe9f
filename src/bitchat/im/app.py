"""Assembling a standalone IM server: SQLite centers, in-memory connections."""

from __future__ import annotations

from bitchat.im.memory import MemoryConnectionCenter
from bitchat.im.passwords import hasher_for
from bitchat.im.service import IMService
from bitchat.im.sqlite import SqliteMessageCenter, SqliteUserCenter
from bitchat.server import Server
from bitchat.settings import Settings


def install_web(server: Server, im: IMService | None) -> None:
    """Serve HTTP, the chat page and WebSocket on the server's port, when available."""
    try:
        from bitchat.web import install
    except ImportError:
        return
    install(server, im)


def build_standalone_server(
    host: str = "0.0.0.0", port: int = 8864, settings: Settings | None = None
) -> Server:
    """A complete standalone IM server (the seed's 单机版)."""
    settings = settings or Settings()
    server = Server(host, port, settings, mode="standalone")
    im = IMService(
        server,
        SqliteUserCenter(settings.db_path, hasher_for(settings)),
        SqliteMessageCenter(
            settings.db_path,
            batch_max=settings.store_batch_max,
            ack_batch_max=settings.store_batch_max_acks,
        ),
        MemoryConnectionCenter(),
    )
    server.data["im"] = im
    install_web(server, im)
    return server
