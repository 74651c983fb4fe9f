"""Cluster mode (the seed's 集群版): Redis registry and connection center,
PostgreSQL storage, cross-node delivery, and the router.

::

    router process          node 1        node 2        node 3
    (bitchat router)          \\              |              /
        |  reads                `---- Redis: registry, online users, ----'
        '--------------------->       per-node inbox channels
                                      PostgreSQL: users, groups, messages

A client asks the router where to go (:func:`discovery.router_resolver`),
connects to that node and logs in; a node pushes to its own connections and
forwards to the nodes that hold the recipients' other connections.
"""

from bitchat.cluster.packets import NodeAddress, WhereTo

__all__ = ["NodeAddress", "WhereTo"]
