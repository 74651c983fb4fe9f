"""bitchat: an instant-messaging framework (server, client, binary protocol).

Define a packet and a handler and you have a client/server service; add the IM
layer (``bitchat.im``) and you have a chat server.
"""

from bitchat.client import Client, State
from bitchat.dispatch import Deferred, handler
from bitchat.errors import (
    BitchatError,
    ConfigError,
    ConnectionClosed,
    ProtocolError,
    RequestError,
    RequestTimeout,
    ServiceUnavailable,
    TLSError,
    UsageError,
    codes,
)
from bitchat.protocol.packets import Error, Limit, Packet, Ping, Pong, Registry, registry
from bitchat.server import Server
from bitchat.session import Session
from bitchat.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "BitchatError",
    "Client",
    "ConfigError",
    "ConnectionClosed",
    "Deferred",
    "Error",
    "Limit",
    "Packet",
    "Ping",
    "Pong",
    "ProtocolError",
    "Registry",
    "RequestError",
    "RequestTimeout",
    "Server",
    "ServiceUnavailable",
    "Session",
    "Settings",
    "State",
    "TLSError",
    "UsageError",
    "__version__",
    "codes",
    "handler",
    "registry",
]
