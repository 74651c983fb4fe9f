"""Every limit and tunable of bitchat, in one settings object.

A program passes one to ``Server``/``Client``; the ``bitchat`` commands fill one
from the command line, the environment and a TOML file (:mod:`bitchat.config`).
Each field carries, next to its default, what it allows and which commands take
it as an option (a :class:`Spec`), and its docstring says what it is for: the
command-line help and the README's table are generated from both, and
:meth:`Settings.validate` checks every value against them.
Each default is chosen to be safe for a public server.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bitchat.errors import ConfigError

T = TypeVar("T")

SERVER, ROUTER, CLIENT = "server", "router", "client"
"""The commands that build a Settings (``bitchat server``, ``router``, ``client``)."""

_ALL = (SERVER, ROUTER, CLIENT)
_SR = (SERVER, ROUTER)
_S = (SERVER,)
_C = (CLIENT,)


@dataclass(frozen=True, slots=True)
class Spec:
    """What one setting allows, and how the commands and the docs present it."""

    ge: float | None = None
    """The value is at least this."""
    gt: float | None = None
    """The value is more than this."""
    le: float | None = None
    """The value is at most this."""
    choices: tuple[str, ...] = ()
    """The only values a string setting may take."""
    unit: str = ""
    """How the docs show a number: ``bytes``, ``KiB``, ``s`` (seconds) or ``/s``."""
    commands: tuple[str, ...] = ()
    """The commands with a command-line option for it; all of them read it from the
    config file and the environment."""
    aliases: tuple[str, ...] = ()
    """Older option names that keep working (``--idle-timeout``)."""
    flags: tuple[tuple[str, str], ...] = ()
    """Options without a value that set a fixed one (``--cluster`` sets ``mode``)."""
    metavar: str = ""
    """The option's value in ``--help`` (default: from the type and unit)."""


def setting(
    default: T,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] = (),
    unit: str = "",
    commands: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    flags: tuple[tuple[str, str], ...] = (),
    metavar: str = "",
) -> T:
    """A dataclass field with its default and its :class:`Spec`."""
    spec = Spec(ge, gt, le, choices, unit, commands, aliases, flags, metavar)
    return field(default=default, metadata={"spec": spec})


@dataclass
class Settings:
    # Wire protocol.
    max_frame_size: int = setting(1 << 20, ge=1, le=0xFFFF_FFFF, unit="bytes", commands=_ALL)
    """Largest frame body accepted, in bytes (the length header is checked first)."""
    max_string_length: int = setting(64 * 1024, ge=0, commands=_SR)
    """Longest string in a request's field that has no limit of its own (each string
    inside a list or map too), in characters; bytes count bytes. Longer:
    ``invalid_packet``."""
    max_list_length: int = setting(1024, ge=0, commands=_SR)
    """Most items in a request's list (or map) field that has no limit of its own.
    More: ``invalid_packet``."""

    # Connections (both sides).
    read_idle_timeout: float = setting(
        15.0, ge=0, unit="s", commands=_ALL, aliases=("--idle-timeout",)
    )
    """A connection that sends nothing for this long is closed (the seed's
    IdleStateChecker); 0 = never."""
    heartbeat_interval: float = setting(5.0, ge=0, unit="s", commands=_C)
    """The client sends a Ping this often (the seed's HealthyChecker); 0 = never."""
    write_high_water: int = setting(256 * 1024, ge=0, unit="bytes", commands=_SR)
    """Above this many unsent bytes a connection stops reading its peer's requests."""
    write_low_water: int = setting(64 * 1024, ge=0, unit="bytes", commands=_SR)
    """Below this, reading resumes (at most ``write_high_water``)."""
    write_hard_limit: int = setting(1024 * 1024, ge=1, unit="bytes", commands=_SR)
    """A peer that lets more than this pile up unread is disconnected (at least
    ``write_high_water``); what it missed stays in the store for its next sync."""
    max_unsent_bytes: int = setting(256 * 1024 * 1024, ge=0, unit="bytes", commands=_SR)
    """Budget for unsent bytes across all connections (0: none). Over it, the
    connections with the most unsent bytes are dropped until a quarter is free."""
    write_stall_timeout: float = setting(30.0, ge=0, unit="s", commands=_SR)
    """A peer that keeps more than ``write_high_water`` unread for this long is
    disconnected as a slow consumer (0: never)."""
    max_pending_requests: int = setting(256, ge=1, commands=_SR)
    """Requests of one connection handed to handlers and not yet answered before it
    stops reading (bounds memory); reading resumes at half."""
    frame_timeout: float = setting(10.0, ge=0, unit="s", commands=_SR)
    """A frame must arrive whole within this long of its first byte (0: no
    deadline); a peer that trickles bytes is closed."""
    login_timeout: float = setting(10.0, ge=0, unit="s", commands=_SR)
    """On a server with login-gated handlers (the IM server), a connection that has
    not logged in this long after its first byte is closed (0: no deadline)."""
    max_connections: int = setting(10000, ge=1, commands=_SR)
    """Most connections open at once (packet, HTTP and WebSocket together; also
    kept below the open-file limit). At the cap a new connection makes room by
    dropping the oldest one not logged in, or is refused."""
    max_connections_per_address: int = setting(256, ge=1, commands=_SR)
    """Most connections open at once from one remote address; one more is refused."""

    # Client.
    request_timeout: float = setting(10.0, gt=0, unit="s", commands=_C)
    """Default time ``Client.request`` waits for its answer."""
    connect_timeout: float = setting(5.0, gt=0, unit="s", commands=_ALL)
    """Time one connection attempt may take (to a server, a router, Redis)."""
    reconnect_initial_delay: float = setting(0.2, gt=0, unit="s", commands=_C)
    """First wait before reconnecting; doubles per failure, with full jitter."""
    reconnect_max_delay: float = setting(10.0, gt=0, unit="s", commands=_C)
    """Longest wait between two reconnect attempts (at least ``reconnect_initial_delay``)."""
    device: str | None = setting(None, commands=_C, metavar="NAME")
    """The client's device id, sent at login (letters, digits, ``-_.:``): the server
    keeps what each device has got. Unset: the one kept for the server and user in
    ``$XDG_CONFIG_HOME/bitchat/devices.json`` (``~/.config``), else the one the
    server names at the first login, which is then kept there."""
    jwt: str | None = setting(None, commands=_C, metavar="TOKEN")
    """A JWT the product's backend signed: ``bitchat client`` logs in with it as it
    starts (as the ``-jwt TOKEN`` command does). Unset: no login at start."""

    # Server process.
    host: str = setting("0.0.0.0", commands=_SR)
    """Address the server (or the router) listens on."""
    port: int = setting(8864, ge=0, le=65535, commands=_SR)
    """Port the server listens on (packets, HTTP and WebSocket share it); 0 = any free one."""
    worker_threads: int = setting(16, ge=1, commands=_SR, aliases=("--workers",))
    """Size of the worker thread pool for POOL handlers written as plain ``def``."""
    shutdown_grace: float = setting(5.0, ge=0, unit="s", commands=_SR)
    """Seconds a stopping server waits for in-flight requests before closing."""
    tls_cert: str | None = setting(None, commands=_SR, metavar="FILE")
    """PEM certificate: the server speaks TLS on its port."""
    tls_key: str | None = setting(None, commands=_SR, metavar="FILE")
    """PEM private key of ``tls_cert``."""

    # IM.
    data_dir: str = setting("./bitchat-data", commands=_S, metavar="DIR")
    """Folder of the standalone SQLite database."""
    auto_register: bool = setting(True, commands=_S)
    """Logging in with an unknown name registers it (as in the seed's quick start)."""
    open_registration: bool = setting(True, commands=_S)
    """Anyone may sign up. When false, Register is ``forbidden`` (sign-ups are closed)
    and logging in never registers, whatever ``auto_register`` says."""
    max_message_length: int = setting(4096, ge=1, commands=_S)
    """Longest chat message text, in characters."""
    max_name_length: int = setting(32, ge=1, commands=_S)
    """Longest user name, in characters (names have no spaces)."""
    max_password_length: int = setting(256, ge=1, commands=_S)
    """Longest password, in characters."""
    max_group_name_length: int = setting(64, ge=1, commands=_S)
    """Longest group name, in characters."""
    max_client_msg_id_length: int = setting(64, ge=1, commands=_S)
    """Longest client message id (the sender's id that makes a retried send harmless),
    in characters."""
    max_token_length: int = setting(128, ge=1, commands=_S)
    """Longest login token a client may present, in characters (issued ones have 43)."""
    max_device_length: int = setting(64, ge=8, commands=_S)
    """Longest device id a Login may name, in characters."""
    max_devices_per_user: int = setting(32, ge=1, commands=_S)
    """Devices the server keeps cursors for, per user; a login from one more forgets
    the one seen longest ago (it then starts again at the user's read position)."""
    conversations_max_page: int = setting(200, ge=1, commands=_S)
    """Most conversations in one GetConversations page, whatever the request asks."""
    ack_window: int = setting(4096, ge=1, commands=_S)
    """Pushed messages a connection may leave unacked and still ack: the server
    remembers this many per connection (older ones come again at the next login)."""
    push_gap_wait: float = setting(1.0, ge=0, unit="s", commands=_S)
    """Seconds a gap in what a connection was pushed may stay open after an ack shows
    it before the device is pushed again what it misses: across nodes a message
    can arrive after a later one of its conversation (the sender's node commits,
    then forwards), or after the device's own later message is answered."""
    max_ack_ids: int = setting(1024, ge=1, commands=_S)
    """Most message ids in one Ack (the client splits longer ones)."""
    max_group_size: int = setting(500, ge=1, commands=_S)
    """Most members of a group; one more join fails with ``group_full``."""
    max_groups_per_user: int = setting(1000, ge=0, commands=_S)
    """Most groups one user may be in; one more create or join is ``forbidden``."""
    max_mute_seconds: int = setting(30 * 86400, ge=1, unit="s", commands=_S)
    """Longest mute an admin may give a group member; a longer one is refused."""
    invite_ttl: int = setting(7 * 86400, ge=1, unit="s", commands=_S)
    """How long a group invite code stays valid when its maker names no time (and the
    most it may name)."""
    max_invites_per_group: int = setting(100, ge=1, commands=_S)
    """Most unexpired invite codes a group may have; one more is ``forbidden``."""
    max_blocks_per_user: int = setting(1000, ge=1, commands=_S)
    """Most users one user may block; one more is ``forbidden``."""
    max_join_requests_per_group: int = setting(200, ge=1, commands=_S)
    """Most join requests waiting in an invite-only group; one more is ``forbidden``."""
    edit_window: int = setting(86400, ge=0, unit="s", commands=_S)
    """How long after sending a user may edit a message (``window_passed`` after)."""
    recall_window: int = setting(86400, ge=0, unit="s", commands=_S)
    """How long after sending a user may recall a message (group admins and the owner
    may recall any message of their group at any time)."""
    max_reactions_per_message: int = setting(20, ge=1, commands=_S)
    """Most distinct emoji on one message; one more is ``too_many_reactions``."""
    max_emoji_length: int = setting(16, ge=1, commands=_S)
    """Longest reaction emoji, in characters (a flag or a family sequence is several)."""
    max_mentions_per_message: int = setting(50, ge=0, commands=_S)
    """Most users one group message's ``@name`` words mention (the rest are plain text)."""
    max_fields_keys: int = setting(32, ge=1, commands=_S)
    """Most keys in a typed message's fields."""
    max_fields_size: int = setting(4096, ge=2, unit="B", commands=_S)
    """Largest typed message's fields, as compact JSON; larger is ``bad_fields``."""
    max_versions_per_message: int = setting(50, ge=1, commands=_S)
    """Most earlier texts kept of an edited message (the oldest go first)."""
    rate_limit: float = setting(50.0, ge=0, unit="/s", commands=_SR)
    """Sustained requests per second per connection (token bucket refill rate); 0 = off."""
    rate_burst: int = setting(200, ge=1, commands=_SR)
    """Requests a connection may send in a burst above the rate."""
    history_max_page: int = setting(200, ge=1, commands=_S)
    """Most messages in one history page, whatever the request asks."""
    offline_batch: int = setting(500, ge=1, commands=_S)
    """Offline messages pushed per batch at login."""
    sync_read_ahead: int = setting(2000, ge=1, commands=_S)
    """Most offline messages a login's sync holds read ahead of what it has pushed, over
    all the device's conversations: each conversation is read in pages of this shared
    among those with messages left (at least 1, at most ``offline_batch``)."""
    typing_timeout: float = setting(5.0, gt=0, unit="s", commands=_S)
    """How long a "typing" lasts unless repeated: recipients get it as ``expires_in``
    and clear it themselves; the server forgets it then too (typing is never stored)."""
    typing_interval: float = setting(1.0, ge=0, unit="s", commands=_S)
    """Least time between two "typing" events one connection relays into one
    conversation; sooner ones are dropped silently (the stop of one still on always
    goes through)."""
    store_batch_max: int = setting(2048, ge=1, commands=_S)
    """Most messages committed to the store in one transaction (group commit). A busy
    writer takes what has queued up to this: larger batches share each commit and
    each index page among more messages (docs/benchmarks.md: 512 -> 2048 took 4 µs off
    a message; 4096 was slower again)."""
    store_batch_max_acks: int = setting(4096, ge=1, commands=_S)
    """Most acked message ids committed in one store transaction; more wait for the
    next one, so no flood of acks holds up the messages batched with them."""
    token_ttl: float = setting(7 * 24 * 3600.0, gt=0, unit="s", commands=_S)
    """Seconds a login token stays valid for reconnects."""
    password_hash_time_cost: int = setting(2, ge=1, commands=_S)
    """argon2id passes per password hash (OWASP's baseline: 2 passes of 19 MiB)."""
    password_hash_memory_kib: int = setting(19 * 1024, ge=8, unit="KiB", commands=_S)
    """argon2id memory per password hash, in KiB. Lower only in tests: the hash is
    slow on purpose, so a leaked database is slow to crack."""
    password_hash_concurrency: int = setting(0, ge=0, commands=_S)
    """Password hashes computed at once, each taking ``password_hash_memory_kib``;
    more logins wait their turn. 0 = the number of cores."""
    login_free_attempts: int = setting(5, ge=1, commands=_S)
    """Failed password logins to one account before each further attempt must wait
    (a delay, never a lock-out: after it the right password works)."""
    login_address_free_attempts: int = setting(20, ge=1, commands=_S)
    """Failed password logins from one remote address (an IPv6 /64) before its
    attempts must wait; attempts under way count until they succeed."""
    login_address_concurrency: int = setting(4, ge=1, commands=_S)
    """Password logins from one address checked at once by a server; more wait their
    turn (so a burst of right ones is never throttled, and one address cannot fill
    the hashing queue). At most ``login_address_free_attempts``."""
    login_delay: float = setting(1.0, ge=0, unit="s", commands=_S)
    """The first wait after the free attempts; it doubles with each further
    failure. 0 = no login throttling."""
    login_max_delay: float = setting(30.0, ge=0, unit="s", commands=_S)
    """Longest wait one account imposes: what attackers elsewhere can delay its
    owner by."""
    login_address_max_delay: float = setting(300.0, ge=0, unit="s", commands=_S)
    """Longest wait one address imposes on its own attempts (at least
    ``login_max_delay``, so one address cannot keep an account busy)."""
    login_failure_window: float = setting(900.0, gt=0, unit="s", commands=_S)
    """Failures are forgotten this long after the last one (per account, per address)."""
    login_throttle_max_entries: int = setting(100_000, ge=1, commands=_S)
    """Accounts and addresses a standalone server remembers failures of (the oldest
    are forgotten first); a cluster keeps them in Redis, each expiring on its own."""
    password_login: bool = setting(True, commands=_S)
    """Users may log in with a name and password and sign up. When false, a password
    Login is ``login_failed`` and Register ``forbidden``: users come from JWT logins
    (or another authenticator of the server's) only; login tokens still work."""
    max_jwt_length: int = setting(8192, ge=1, commands=_S)
    """Longest JWT a Login may carry, in characters."""
    jwt_secret: str | None = setting(None, commands=_S, metavar="SECRET")
    """Shared secret of HS256 login JWTs (the product's backend signs with it)."""
    jwt_public_key_file: str | None = setting(None, commands=_S, metavar="FILE")
    """PEM public key of RS256 (RSA) or ES256 (P-256) login JWTs."""
    jwt_jwks_file: str | None = setting(None, commands=_S, metavar="FILE")
    """JSON Web Key Set of RS256/ES256 login JWTs, chosen by the token's ``kid``; read
    again when a token names a kid it lacks and the file changed (key rotation)."""
    jwt_issuer: str | None = setting(None, commands=_S, metavar="ISS")
    """When set, a login JWT's ``iss`` claim must be this."""
    jwt_audience: str | None = setting(None, commands=_S, metavar="AUD")
    """When set, a login JWT's ``aud`` claim must name this; unset, a JWT with an
    ``aud`` is refused."""
    jwt_leeway: float = setting(30.0, ge=0, unit="s", commands=_S)
    """Clock skew allowed when checking a login JWT's ``exp``, ``nbf`` and ``iat``."""
    jwt_user_claim: str = setting("sub", commands=_S, metavar="CLAIM")
    """The login JWT's claim that identifies the user: the same value is the same user."""
    jwt_name_claim: str = setting("name", commands=_S, metavar="CLAIM")
    """The login JWT's claim that names a user at their first login (made a valid,
    free name: see the README's JWT section)."""
    node_id: int = setting(0, ge=0, le=1023, commands=_S)
    """This server's node id, part of every message id; in cluster mode it must be
    given, unique per node."""

    # Backends: which centers the composition root builds.
    mode: str = setting(
        "standalone",
        choices=("standalone", "cluster"),
        commands=_S,
        flags=(("--cluster", "cluster"),),
    )
    """``standalone``: SQLite users and messages, in-memory connections; ``cluster``:
    PostgreSQL users and messages, Redis registry, connections and forwarding."""
    redis_url: str | None = setting(None, commands=_SR, aliases=("--redis",), metavar="URL")
    """Redis URL of the cluster (cluster mode, router), e.g. ``redis://127.0.0.1:6379/0``."""
    pg_dsn: str | None = setting(None, commands=_S, aliases=("--pg",), metavar="DSN")
    """PostgreSQL DSN of the cluster (cluster mode), e.g.
    ``postgresql://postgres@127.0.0.1:5432/bitchat``."""
    advertise: str | None = setting(None, commands=_S, metavar="HOST:PORT")
    """``HOST:PORT`` clients are given to reach this node (cluster mode; default: the
    bound address)."""

    # Cluster mode.
    node_ttl: float = setting(5.0, gt=0, unit="s", commands=_S)
    """A node's registration in Redis lives this long unless refreshed (every quarter
    of it): a killed node, and the users online on it, drop out within this time."""
    redis_max_connections: int = setting(100, ge=2, commands=_SR)
    """Most connections to Redis a node (or the router) opens; a command that finds
    them all busy waits for one, up to ``backend_timeout`` (a burst of logouts does
    not make Redis look down)."""
    redis_prefix: str = setting("bitchat:", commands=_SR, metavar="PREFIX")
    """Prefix of every Redis key and channel of the cluster (several clusters, or
    tests, may share one Redis)."""
    router_policy: str = setting(
        "least_connections",
        choices=("least_connections", "round_robin"),
        commands=(ROUTER,),
        aliases=("--policy",),
    )
    """How the router picks a node: ``least_connections`` or ``round_robin``."""
    pg_pool_size: int = setting(10, ge=1, commands=_S)
    """Most PostgreSQL connections one node opens."""
    backend_timeout: float = setting(5.0, gt=0, unit="s", commands=_SR)
    """Longest one Redis or PostgreSQL call may take before the request fails with
    ``unavailable``."""
    forward_queue_max: int = setting(100_000, ge=1, commands=_S)
    """Messages a node keeps waiting to be forwarded to other nodes while Redis is
    down; beyond, new ones are not queued (they are in the store, so they come at
    the recipient's next sync)."""
    ack_hold_max: int = setting(1024, ge=0, commands=_S)
    """A SendAck waits for its message's forward to other nodes only while fewer
    than this many forwards are queued (0: never waits); past it, it goes at once."""

    # HTTP / WebSocket on the same port.
    max_http_header_size: int = setting(16 * 1024, ge=1, unit="bytes", commands=_S)
    """Largest HTTP request head (request line and headers); above it: 431 and a close."""
    max_http_body_size: int = setting(64 * 1024, ge=0, unit="bytes", commands=_S)
    """Largest HTTP request body (no endpoint takes one); above it: 413 and a close."""
    max_ws_message_size: int = setting(1 << 20, ge=1, unit="bytes", commands=_S)
    """Largest WebSocket message (one whole frame, header included); above it: close 1009."""
    http_timeout: float = setting(10.0, gt=0, unit="s", commands=_S)
    """An HTTP connection with no complete request for this long is closed (keep-alive
    idle time, and the time a request may take to arrive)."""
    ws_close_timeout: float = setting(5.0, gt=0, unit="s", commands=_S)
    """Time a WebSocket peer has to answer the server's close frame before it is dropped."""
    admin_token: str | None = setting(None, commands=_S, metavar="TOKEN")
    """When set, /status/* requires ``Authorization: Bearer <token>``; else loopback only.
    It is also the server API's key with every scope."""
    max_api_body_size: int = setting(64 * 1024, ge=0, unit="bytes", commands=_S)
    """Largest JSON body of a server API request (/api/v1/); above it: 413."""
    api_keys: dict[str, Any] = field(
        default_factory=dict, metadata={"spec": Spec(commands=_S, metavar="JSON")}
    )
    """Named keys of the server API, a table ``name = { key = "...", scopes = [...] }``
    (scopes: ``users:read``, ``users:write``, ``groups:read``, ``groups:write``,
    ``messages:read``, ``messages:write``, ``admin``); in the environment and on the
    command line as JSON. A key has at least 16 characters."""

    # Files and images (bitchat.files): uploaded over HTTP, referred to by messages.
    max_file_size: int = setting(25 * 1024 * 1024, ge=1, unit="bytes", commands=_S)
    """Largest file an upload may carry (``POST /api/v1/files``); above it: 413
    ``body_too_large``, nothing stored."""
    file_quota_per_user: int = setting(1024 * 1024 * 1024, ge=0, unit="bytes", commands=_S)
    """Bytes of files a user may keep stored in all; an upload past it: 413
    ``quota_exceeded``, nothing stored."""
    file_types: tuple[str, ...] = setting(
        (
            "image/png",
            "image/jpeg",
            "image/gif",
            "image/webp",
            "application/pdf",
            "application/zip",
            "text/plain",
            "application/octet-stream",
        ),
        commands=_S,
        metavar="TYPE,...",
    )
    """Content types an upload may claim; its first bytes must agree with the claim
    (415 ``bad_content_type`` otherwise)."""
    file_upload_timeout: float = setting(300.0, gt=0, unit="s", commands=_S)
    """Time an upload's body may take to arrive in full; then: 408 and a close."""
    file_chunk_size: int = setting(256 * 1024, ge=4096, unit="bytes", commands=_S)
    """Unit of file storage and of reading: a chunk row in PostgreSQL, a read of a
    download; an upload buffers at most about two of them before the connection stops
    being read."""
    thumbnail_size: int = setting(320, ge=16, le=4096, unit="px", commands=_S)
    """Largest width and height of an image's thumbnail."""
    max_image_pixels: int = setting(50_000_000, ge=1, commands=_S)
    """Images with more pixels (width x height, read from their header) are stored
    but not decoded: no thumbnail (a decompression bomb decodes to nothing)."""

    # Webhooks (bitchat.webhooks): events POSTed to the product's endpoints.
    webhook_urls: tuple[str, ...] = setting((), commands=_S, metavar="URL,...")
    """Endpoints (``http://`` or ``https://`` URLs) that get every event of
    ``webhook_events``, signed with ``webhook_secret``; more, each with its own
    secret and events, in the config file's ``[[webhooks]]`` tables. Neither: no
    webhooks, and nothing is written for them."""
    webhook_secret: str | None = setting(None, commands=_S, metavar="SECRET")
    """Key of the HMAC-SHA256 signature of each delivery (``X-Bitchat-Signature``);
    required with ``webhook_urls``, the default of a ``[[webhooks]]`` table's own."""
    webhook_events: tuple[str, ...] = setting((), commands=_S, metavar="EVENT,...")
    """The events ``webhook_urls`` get (and a ``[[webhooks]]`` table without
    ``events``): of ``message.stored``, ``message.edited``, ``message.recalled``,
    ``user.online``, ``user.offline``, ``group.member_added``,
    ``group.member_removed``; empty = all."""
    webhooks: tuple[dict[str, Any], ...] = setting(())
    """Endpoints of their own, as ``[[webhooks]]`` tables of the config file: ``url``,
    and optionally ``secret`` and ``events`` (default: ``webhook_secret`` and
    ``webhook_events``)."""
    webhook_timeout: float = setting(10.0, gt=0, unit="s", commands=_S)
    """Longest one delivery (connect, send, answer) may take; longer is a failure. A
    delivery under way is leased for twice this: a node that dies with it leaves it
    to another node (or to itself, restarted) after that."""
    webhook_max_attempts: int = setting(12, ge=1, commands=_S)
    """Deliveries of one event to one endpoint before it becomes a dead letter
    (``bitchat webhooks dead`` lists them)."""
    webhook_backoff_base: float = setting(1.0, gt=0, unit="s", commands=_S)
    """Wait after the first failed delivery; it doubles with each further failure,
    with jitter (a random part of up to half)."""
    webhook_backoff_max: float = setting(3600.0, gt=0, unit="s", commands=_S)
    """Longest wait between two deliveries of one event (at least
    ``webhook_backoff_base``)."""
    webhook_concurrency: int = setting(16, ge=1, commands=_S)
    """Deliveries one server has under way at once (over all endpoints)."""
    webhook_batch: int = setting(100, ge=1, commands=_S)
    """Most outbox rows one server claims in one query (at most the free delivery
    slots)."""
    webhook_poll_interval: float = setting(1.0, gt=0, unit="s", commands=_S)
    """How often a server looks for due deliveries when nothing woke it (a retry
    coming due, another node's events); its own events wake it at once."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form settings of your own handlers (the config file's ``[extra]`` table)."""

    def __post_init__(self) -> None:
        # An array from TOML (or a program) is kept as the tuple the field holds.
        for name in _TUPLES:
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def db_path(self) -> str:
        return os.path.join(self.data_dir, "bitchat.db")

    def validate(self, origins: Mapping[str, str] | None = None) -> None:
        """Raise :class:`ConfigError` for the first value its field does not allow.

        It checks each field's type and range (its :class:`Spec`), then the rules
        between fields. ``origins`` names where each value came from (``--port``,
        ``environment BITCHAT_PORT``, ``bitchat.toml: port``), for the message;
        a field missing from it kept its default. Given ``origins`` (as the
        commands do), cluster mode also requires ``node_id`` to be set rather than
        defaulted, since two nodes with one id would mint the same message ids.
        """
        where = dict(origins or {})

        def fail(name: str, problem: str) -> ConfigError:
            return ConfigError(f"{where.get(name, name)}: {problem}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not allows(f.name, value):
                raise fail(f.name, f"expected {expectation(f.name)}, got {show(value)}")
        for low, high in _ORDERED:
            a, b = getattr(self, low), getattr(self, high)
            if a > b:
                source = where.get(high, "default")
                raise fail(low, f"expected at most {high} = {show(b)} ({source}), got {show(a)}")
        problem = api_keys_problem(self.api_keys)
        if problem:
            raise fail("api_keys", problem)
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key") if self.tls_key is None else _TLS_KEY_ONLY
            raise fail(given, f"{given} needs {missing} too")
        if self.mode == "cluster":
            for name, example in _CLUSTER_NEEDS.items():
                if getattr(self, name) is None:
                    raise fail("mode", f"cluster mode needs {_how_to_set(name)}, e.g. {example}")
            if origins is not None and "node_id" not in origins:
                raise fail("mode", f"cluster mode needs {_how_to_set('node_id')}, unique per node")
        if self.webhook_urls or self.webhooks:
            from bitchat.webhooks import endpoints  # its rules live with the webhooks

            try:
                endpoints(self)
            except ConfigError as exc:
                name, _, problem = str(exc).partition(": ")
                raise fail(name, problem) from None


_TUPLES = ("webhook_urls", "webhook_events", "webhooks")
"""The fields that hold a tuple (a TOML array)."""

API_SCOPES = (
    "users:read",
    "users:write",
    "groups:read",
    "groups:write",
    "messages:read",
    "messages:write",
    "admin",
)
"""The scopes a server API key may have (the admin token has them all)."""
MIN_API_KEY_LENGTH = 16


def api_keys_problem(keys: Mapping[str, Any]) -> str:
    """What is wrong with an ``api_keys`` table, or "" if nothing."""
    seen: set[str] = set()
    for name, entry in keys.items():
        if not isinstance(entry, dict) or set(entry) - {"key", "scopes"}:
            return f"{name}: expected a table with key and scopes"
        key, scopes = entry.get("key"), entry.get("scopes", [])
        if not isinstance(key, str) or len(key) < MIN_API_KEY_LENGTH:
            return f"{name}: expected a key of at least {MIN_API_KEY_LENGTH} characters"
        if key in seen:
            return f"{name}: the same key as another name"
        seen.add(key)
        if not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes):
            return f"{name}: expected scopes as an array of strings"
        unknown = [x for x in scopes if x not in API_SCOPES]
        if unknown:
            return f"{name}: unknown scope {unknown[0]!r} (known: {', '.join(API_SCOPES)})"
    return ""


_ORDERED = (
    ("write_low_water", "write_high_water"),
    ("write_high_water", "write_hard_limit"),
    ("reconnect_initial_delay", "reconnect_max_delay"),
    ("login_max_delay", "login_address_max_delay"),
    ("login_address_concurrency", "login_address_free_attempts"),
    ("webhook_backoff_base", "webhook_backoff_max"),
)
"""Pairs of fields where the first may not exceed the second."""
_TLS_KEY_ONLY = ("tls_key", "tls_cert")
_CLUSTER_NEEDS = {
    "redis_url": "redis://127.0.0.1:6379/0",
    "pg_dsn": "postgresql://postgres@127.0.0.1:5432/bitchat",
}
"""What cluster mode cannot do without (besides an explicit node_id), with examples."""


def _how_to_set(name: str) -> str:
    return f"{name} ({option_names(name)[0]}, {env_name(name)} or the config file)"


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}
"""The fields of :class:`Settings` by name, in the class's order."""

KINDS = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "str | None": str,
    "dict[str, Any]": dict,
    "tuple[str, ...]": tuple,
    "tuple[dict[str, Any], ...]": tuple,
}
"""The field types a setting may have, as written in the class. A table (``api_keys``,
``extra``) is JSON in the environment and on the command line; a tuple comes from a
TOML array, or a comma-separated list in the environment and on the command line."""


def spec(name: str) -> Spec:
    """The :class:`Spec` of field ``name`` (an empty one for ``extra``)."""
    value = FIELDS[name].metadata.get("spec", Spec())
    assert isinstance(value, Spec)
    return value


def kind(name: str) -> type:
    """The Python type of field ``name``'s values (``str`` for ``str | None``)."""
    return KINDS.get(str(FIELDS[name].type), dict)


def optional(name: str) -> bool:
    """Whether field ``name`` may be None (unset)."""
    return str(FIELDS[name].type).endswith("| None")


def default(name: str) -> Any:
    f = FIELDS[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def option_names(name: str) -> list[str]:
    """The command-line options of field ``name``: the generated one, then aliases."""
    return [f"--{name.replace('_', '-')}", *spec(name).aliases]


def env_name(name: str) -> str:
    """The environment variable of field ``name``: ``BITCHAT_MAX_MESSAGE_LENGTH``."""
    return f"BITCHAT_{name.upper()}"


def allows(name: str, value: Any) -> bool:
    """Whether ``value`` has field ``name``'s type and lies in its range."""
    s, k = spec(name), kind(name)
    if value is None:
        return optional(name)
    if k is dict:
        return isinstance(value, dict)
    if k is tuple:
        item = dict if "dict" in str(FIELDS[name].type) else str
        return isinstance(value, tuple) and all(isinstance(v, item) for v in value)
    if k is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            return False
    elif type(value) is not k:  # bool is an int subclass: not an integer here
        return False
    if s.choices and value not in s.choices:
        return False
    return not (
        (s.ge is not None and value < s.ge)
        or (s.gt is not None and value <= s.gt)
        or (s.le is not None and value > s.le)
    )


def expectation(name: str) -> str:
    """What field ``name`` expects, for messages: ``an integer from 0 to 65535``."""
    s, k = spec(name), kind(name)
    if s.choices:
        return "one of " + ", ".join(s.choices)
    if k is tuple:
        return "an array of tables" if "dict" in str(FIELDS[name].type) else "an array of strings"
    what = {int: "an integer", float: "a number", bool: "true or false", dict: "a table"}
    text = what.get(k, "a string")
    if s.ge is not None and s.le is not None:
        text += f" from {_number(s.ge)} to {_number(s.le)}"
    elif s.ge is not None:
        text += f" >= {_number(s.ge)}"
    elif s.gt is not None:
        text += f" > {_number(s.gt)}"
    return text


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def show(value: Any) -> str:
    """``value`` as a message shows it, TOML-like: ``"abc"``, ``true``, ``12``."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


@functools.cache
def docs() -> dict[str, str]:
    """Each field's docstring (the string below it in the class), whitespace folded.

    Read from the class's source with :mod:`ast`: attribute docstrings are not
    kept at run time. Empty if the source is not available.
    """
    try:
        source = textwrap.dedent(inspect.getsource(Settings))
    except (OSError, TypeError):
        return {}
    [cls] = ast.parse(source).body
    assert isinstance(cls, ast.ClassDef)
    found: dict[str, str] = {}
    for node, after in zip(cls.body, cls.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found[node.target.id] = " ".join(after.value.value.split())
    return found
