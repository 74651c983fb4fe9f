"""The router's packets: a client asks where to go, the router names a node."""

from __future__ import annotations

from bitchat.protocol.packets import Packet


class WhereTo(Packet, type=150):
    """Ask the router for a live node.

    ``avoid`` lists node ids the client would rather not be sent to (the node
    it just lost); the router honours it unless no other node is alive.
    """

    avoid: list[int] | None = None


class NodeAddress(Packet, type=151):
    """The router's answer: connect to ``host:port`` (node ``node_id``)."""

    host: str
    port: int
    node_id: int
