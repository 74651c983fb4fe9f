"""Every limit and tunable of bitchat, in one settings object.

The CLI fills it from its options; a program passes one to ``Server``/``Client``.
Each default is chosen to be safe for a public server.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Settings:
    # Wire protocol.
    max_frame_size: int = 1 << 20
    """Largest frame body accepted, in bytes (the length header is checked first)."""

    # Connections (both sides).
    read_idle_timeout: float = 15.0
    """A connection that sends nothing for this long is closed (the seed's IdleStateChecker)."""
    heartbeat_interval: float = 5.0
    """The client sends a Ping this often (the seed's HealthyChecker)."""
    write_high_water: int = 256 * 1024
    """Above this many unsent bytes a connection stops reading its peer's requests."""
    write_low_water: int = 64 * 1024
    """Below this, reading resumes."""
    write_hard_limit: int = 8 * 1024 * 1024
    """A peer that lets more than this pile up unread is disconnected."""
    max_pending_requests: int = 256
    """Requests queued on one connection before it stops reading (bounds memory)."""

    # Client.
    request_timeout: float = 10.0
    """Default time ``Client.request`` waits for its answer."""
    connect_timeout: float = 5.0
    """Time one connection attempt may take."""
    reconnect_initial_delay: float = 0.2
    """First wait before reconnecting; doubles per failure, with full jitter."""
    reconnect_max_delay: float = 10.0

    # Server process.
    host: str = "0.0.0.0"
    """Address the server listens on."""
    port: int = 8864
    """Port the server listens on (packets, HTTP and WebSocket share it)."""
    worker_threads: int = 16
    """Size of the worker thread pool for POOL handlers written as plain ``def``."""
    shutdown_grace: float = 5.0
    """Seconds a stopping server waits for in-flight requests before closing."""
    tls_cert: str | None = None
    tls_key: str | None = None

    # IM.
    data_dir: str = "./bitchat-data"
    """Folder of the standalone SQLite database."""
    auto_register: bool = True
    """Logging in with an unknown name registers it (as in the seed's quick start)."""
    max_message_length: int = 4096
    """Longest chat message text, in characters."""
    max_name_length: int = 32
    """Longest user name, in characters (names have no spaces)."""
    max_password_length: int = 256
    """Longest password, in characters."""
    max_group_name_length: int = 64
    """Longest group name, in characters."""
    max_group_size: int = 500
    """Most members of a group; one more join fails with ``group_full``."""
    max_groups_per_user: int = 1000
    """Most groups one user may be in; one more create or join is ``forbidden``."""
    rate_limit: float = 50.0
    """Sustained requests per second per connection (token bucket refill rate)."""
    rate_burst: int = 200
    """Requests a connection may send in a burst above the rate."""
    history_max_page: int = 200
    """Most messages in one history page, whatever the request asks."""
    offline_batch: int = 500
    """Offline messages pushed per batch at login."""
    store_batch_max: int = 512
    """Most messages committed to the store in one transaction (group commit)."""
    token_ttl: float = 7 * 24 * 3600.0
    """Seconds a login token stays valid for reconnects."""
    password_hash_time_cost: int = 2
    """argon2id passes per password hash (OWASP's baseline: 2 passes of 19 MiB)."""
    password_hash_memory_kib: int = 19 * 1024
    """argon2id memory per password hash, in KiB. Lower only in tests: the hash is
    slow on purpose, so a leaked database is slow to crack."""
    node_id: int = 0
    """This server's node id, part of every message id (0-1023)."""

    # Backends: which centers the composition root builds.
    mode: str = "standalone"
    """``standalone``: SQLite users and messages, in-memory connections; ``cluster``:
    PostgreSQL users and messages, Redis registry, connections and forwarding."""
    redis_url: str | None = None
    """Redis URL of the cluster (cluster mode), e.g. ``redis://127.0.0.1:6379/0``."""
    pg_dsn: str | None = None
    """PostgreSQL DSN of the cluster (cluster mode), e.g.
    ``postgresql://postgres@127.0.0.1:5432/bitchat``."""
    advertise: str | None = None
    """``HOST:PORT`` clients are given to reach this node (cluster mode; default: the
    bound address)."""

    # Cluster mode.
    node_ttl: float = 5.0
    """A node's registration in Redis lives this long unless refreshed (every quarter
    of it): a killed node, and the users online on it, drop out within this time."""
    redis_prefix: str = "bitchat:"
    """Prefix of every Redis key and channel of the cluster (several clusters, or
    tests, may share one Redis)."""
    router_policy: str = "least_connections"
    """How the router picks a node: ``least_connections`` or ``round_robin``."""
    pg_pool_size: int = 10
    """Most PostgreSQL connections one node opens."""
    backend_timeout: float = 5.0
    """Longest one Redis or PostgreSQL call may take before the request fails with
    ``unavailable``."""

    # HTTP / WebSocket on the same port.
    max_http_header_size: int = 16 * 1024
    """Largest HTTP request head (request line and headers); above it: 431 and a close."""
    max_http_body_size: int = 64 * 1024
    """Largest HTTP request body (no endpoint takes one); above it: 413 and a close."""
    max_ws_message_size: int = 1 << 20
    """Largest WebSocket message (one whole frame, header included); above it: close 1009."""
    http_timeout: float = 10.0
    """An HTTP connection with no complete request for this long is closed (keep-alive
    idle time, and the time a request may take to arrive)."""
    ws_close_timeout: float = 5.0
    """Time a WebSocket peer has to answer the server's close frame before it is dropped."""
    admin_token: str | None = None
    """When set, /status/* requires ``Authorization: Bearer <token>``; else loopback only."""

    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def db_path(self) -> str:
        return os.path.join(self.data_dir, "bitchat.db")
