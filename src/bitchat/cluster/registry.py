"""The server registry in Redis: which nodes are alive, where, and how loaded.

Keys (``P`` is ``Settings.redis_prefix``, ``bitchat:`` by default)::

    P nodes           set     ids of registered nodes; an id whose node key expired
                              is pruned by every live node's heartbeat and every read
    P node:{id}       hash    host, port, conns, users, ready, instance, beat, started;
                              expires after node_ttl unless the node refreshes it
    P online:{id}     hash    user id -> connections of that user on node {id};
                              expires together with P node:{id}
    P inbox:{id}      channel messages forwarded to node {id} (pub/sub)
    P presence        channel users coming online / going offline (pub/sub)

Every heartbeat also reads which other nodes are alive (id and instance): a node
that drops out, killed or stopped, is seen by the others within ``node_ttl`` plus
one heartbeat, and they re-send their online users' pending messages (what the
dead node stored may never have been forwarded).

A node *claims* its id at start: the claim fails while another instance holds
it and that instance is still heartbeating, so two live nodes never share an
id (message ids embed it). A node killed with ``kill -9`` stops refreshing its
keys and drops out, with its online users, after ``node_ttl``; a restarted
node waits at most that long to claim its id again.

Everything runs in Lua scripts so each step is atomic and one round trip.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import RedisError

from bitchat.errors import BitchatError, ServiceUnavailable
from bitchat.settings import Settings

log = logging.getLogger("bitchat.cluster.registry")

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
"""What a Redis call may raise when Redis is down, restarting or unreachable."""


class NodeIdInUse(BitchatError):
    """Another live node already runs with this node id."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Names of the cluster's Redis keys and channels."""

    prefix: str = "bitchat:"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes"

    def node(self, node_id: int) -> str:
        return f"{self.prefix}node:{node_id}"

    def online(self, node_id: int) -> str:
        return f"{self.prefix}online:{node_id}"

    def inbox(self, node_id: int) -> str:
        return f"{self.prefix}inbox:{node_id}"

    @property
    def presence(self) -> str:
        return f"{self.prefix}presence"

    @property
    def typing(self) -> str:
        return f"{self.prefix}typing"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A registered node as the registry holds it."""

    node_id: int
    host: str
    port: int
    conns: int
    users: int
    ready: bool
    beat: int

    @classmethod
    def from_hash(cls, node_id: int, h: dict[str, str]) -> NodeInfo:
        return cls(
            node_id,
            h.get("host", ""),
            int(h.get("port", 0) or 0),
            int(h.get("conns", 0) or 0),
            int(h.get("users", 0) or 0),
            h.get("ready") == "1",
            int(h.get("beat", 0) or 0),
        )


def connect_redis(url: str, settings: Settings) -> aioredis.Redis:
    """A Redis client that fails fast: one quick retry (a stale pooled
    connection after a Redis restart), then the caller gets the error. Its pool
    holds ``redis_max_connections``; when all are busy a command waits for one (up
    to ``backend_timeout``): redis-py's default pool refuses at once, so a burst of
    commands (a hundred logouts together) looked like Redis being down."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.backend_timeout,
        decode_responses=False,
        socket_timeout=settings.backend_timeout,
        socket_connect_timeout=min(settings.backend_timeout, settings.connect_timeout),
        retry=Retry(ConstantBackoff(0.05), 1),
        health_check_interval=max(1, int(settings.node_ttl)),
    )
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # closed with the client, as from_url's
    return client


def safe_url(url: str) -> str:
    """A Redis URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def _prune(prefix_arg: int) -> str:
    """Lua that drops from the set ``KEYS[3]`` the ids whose node key expired (nodes
    killed with kill -9); ``ARGV[prefix_arg]`` is the key prefix. Part of claim, beat
    and release: no dead id stays while a node lives, and one left behind by the
    last node to go is dropped by the next one to start."""
    return f"""
for _, n in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('EXISTS', ARGV[{prefix_arg}] .. 'node:' .. n) == 0 then
    redis.call('SREM', KEYS[3], n)
  end
end
"""


# KEYS: node, online, nodes. ARGV: instance, ttl ms, node id, prefix, field, value, ...
_CLAIM = (
    """
local owner = redis.call('HGET', KEYS[1], 'instance')
if owner and owner ~= ARGV[1] then
  local h = redis.call('HMGET', KEYS[1], 'beat', 'host', 'port')
  return {0, owner, h[1] or '', h[2] or '', h[3] or ''}
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
"""
    + _prune(4)
    + """
return {1}
"""
)

# Same keys and arguments. Returns {1} (refreshed), {0} (was gone: registered
# again, the caller must rewrite its online users) or {-1} (another instance has
# the id); after a 1 or 0, the other live nodes as id, instance, id, instance...
_BEAT = (
    """
local owner = redis.call('HGET', KEYS[1], 'instance')
if owner and owner ~= ARGV[1] then return {-1} end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
"""
    + _prune(4)
    + """
local out = {0}
if owner then out[1] = 1 end
for _, n in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if n ~= ARGV[3] then
    local inst = redis.call('HGET', ARGV[4] .. 'node:' .. n, 'instance')
    if inst then
      out[#out + 1] = n
      out[#out + 1] = inst
    end
  end
end
return out
"""
)

# KEYS: node, online, nodes. ARGV: instance, node id, prefix. Deletes only this
# instance's registration.
_RELEASE = (
    _prune(3)
    + """
if redis.call('HGET', KEYS[1], 'instance') == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[2])
  return 1
end
return 0
"""
)

# KEYS: nodes. ARGV: prefix. Every live node as {id, {field, value, ...}}; prunes dead ids.
_NODES = """
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HGETALL', ARGV[1] .. 'node:' .. n)
  if #h == 0 then
    redis.call('SREM', KEYS[1], n)
  else
    out[#out + 1] = n
    out[#out + 1] = h
  end
end
return out
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class NodeRegistry:
    """One node's registration: claim, heartbeat, release; and listing live nodes."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, node_id: int) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.node_id = node_id
        self.instance = f"{uuid.uuid4().hex[:12]}@{os.getpid()}"
        self.host = ""
        self.port = 0
        self.ready = False
        self.started = time.time()
        self._beats = 0
        self._claim = redis.register_script(_CLAIM)
        self._beat = redis.register_script(_BEAT)
        self._release = redis.register_script(_RELEASE)

    @property
    def interval(self) -> float:
        """Seconds between heartbeats: a quarter of the TTL."""
        return self.settings.node_ttl / 4

    def _keys(self) -> list[str]:
        return [self.keys.node(self.node_id), self.keys.online(self.node_id), self.keys.nodes]

    def _args(self, conns: int, users: int) -> list[Any]:
        self._beats += 1
        ttl_ms = max(1, int(self.settings.node_ttl * 1000))
        return [
            self.instance,
            ttl_ms,
            self.node_id,
            self.keys.prefix,
            "instance",
            self.instance,
            "host",
            self.host,
            "port",
            self.port,
            "conns",
            conns,
            "users",
            users,
            "ready",
            int(self.ready),
            "beat",
            self._beats,
            "started",
            f"{self.started:.3f}",
        ]

    async def claim(self) -> None:
        """Take this node id, waiting out the registration of a dead instance.

        Raises :class:`NodeIdInUse` if a live node has it (it heartbeats while
        we watch), :class:`ServiceUnavailable` if Redis cannot be reached.
        """
        ttl = self.settings.node_ttl
        deadline = time.monotonic() + ttl + 2 * self.interval
        seen: tuple[str, str] | None = None
        # Bounded: a poll every half interval until the old registration's TTL ran out.
        for _ in range(int((ttl + 2 * self.interval) / (self.interval / 2)) + 3):
            try:
                r = await self._claim(keys=self._keys(), args=self._args(0, 0))
            except REDIS_ERRORS as exc:
                raise ServiceUnavailable(
                    f"cannot reach Redis to register node {self.node_id}: {exc}"
                ) from exc
            if int(r[0]) == 1:
                log.info("registered as node %d (instance %s)", self.node_id, self.instance)
                return
            owner, beat, host, port = (_s(x) for x in r[1:5])
            where = f"{host}:{port}" if host else "an address not yet announced"
            if seen is None:
                seen = (owner, beat)
                log.warning(
                    "node id %d is registered by instance %s at %s; waiting up to "
                    "%.1fs to see whether it is still alive",
                    self.node_id,
                    owner,
                    where,
                    ttl,
                )
            elif seen != (owner, beat) or time.monotonic() > deadline:
                raise NodeIdInUse(
                    f"node id {self.node_id} is already used by a live node at {where} "
                    f"(instance {owner}); give every node its own --node-id"
                )
            await asyncio.sleep(self.interval / 2)
        raise NodeIdInUse(f"node id {self.node_id} stayed registered by another instance")

    async def beat(self, conns: int, users: int) -> tuple[int, dict[int, str]]:
        """Refresh the registration: 1 refreshed, 0 re-created, -1 taken by another;
        with the other live nodes (id -> instance; empty after -1)."""
        raw = await self._beat(keys=self._keys(), args=self._args(conns, users))
        peers = {int(_s(raw[i])): _s(raw[i + 1]) for i in range(1, len(raw) - 1, 2)}
        return int(raw[0]), peers

    async def release(self) -> bool:
        """Leave the registry at once (a clean stop): the router stops sending clients.

        False if this instance was not registered (it never claimed the id).
        """
        args: list[Any] = [self.instance, self.node_id, self.keys.prefix]
        return bool(await self._release(keys=self._keys(), args=args))


async def live_nodes(redis: aioredis.Redis, keys: Keys) -> list[NodeInfo]:
    """Every registered node whose registration has not expired, by id."""
    raw = await redis.eval(_NODES, 1, keys.nodes, keys.prefix)
    nodes = []
    for i in range(0, len(raw), 2):
        flat = [_s(x) for x in raw[i + 1]]
        h = dict(zip(flat[::2], flat[1::2], strict=True))
        nodes.append(NodeInfo.from_hash(int(_s(raw[i])), h))
    nodes.sort(key=lambda n: n.node_id)
    return nodes
