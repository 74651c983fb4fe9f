"""The cluster connection center: who is online where (Redis), and cross-node delivery.

Each node keeps its own sessions in memory and mirrors them into Redis as
``P online:{node}`` (user id -> connection count), a hash that expires with
the node's registration. So "user -> the nodes where the user is online" is
one read across the live nodes' hashes (:meth:`RedisConnectionCenter.locate`,
one Lua script), and a dead node's users drop out when its keys expire, with
no clean-up by anyone.

Delivery: :meth:`deliver` pushes to this node's sessions at once, then queues
the message for forwarding; one forwarder task takes the queue in order,
finds which other nodes hold the recipients, and publishes each message once
per node on that node's ``P inbox:{node}`` channel. The receiving node pushes
it to its own sessions of those users. The sender's ack waits for that publish
(:meth:`after_forward`), unless Redis is down or the queue is long: a node killed
right after an ack has already handed the message on.

Why pub/sub and not streams: the store (PostgreSQL) is the source of truth and
the forward only saves the recipient a wait, so it need not be durable. A
message lost in transit is still pending in the store and comes at the
recipient's next sync; and every node re-syncs its sessions from the store
whenever its subscription comes back after an outage, which covers what a
stream's replay would; and whenever another node drops out of the registry
(killed, cut off, or stopped), since what it stored last may never have been
forwarded. Pub/sub keeps nothing in Redis, needs no trimming or
consumer groups, and a dead node leaves no backlog behind.

Events (typing, read states, receipts: any IM push but a message) cross nodes on
one cluster-wide ``P typing`` channel, each as its packet type and body with its
recipients, and each node pushes to those it holds: no lookup of where the
recipients are, since events are small, rate-limited or rare and worth less than
the round trip; never stored, and one lost in transit is simply lost. A forced
logout or a ban (:meth:`RedisConnectionCenter.disconnect_user`) rides the same
channel: each node closes the user's sessions it holds (their tokens are revoked
in PostgreSQL first, so a node that missed it cannot log them in again).

While Redis is down the node refuses logins and online lists with ``unavailable``
(it cannot tell the cluster where the user is), keeps serving its connected
users, and forwards what was queued once Redis is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
from redis.asyncio.client import PubSub

from bitchat.cluster.health import Backoff, Health
from bitchat.cluster.registry import (
    REDIS_ERRORS,
    Keys,
    NodeRegistry,
    connect_redis,
    safe_url,
)
from bitchat.errors import BitchatError, ServiceUnavailable
from bitchat.im.centers import ConnectionCenter, Message, close_sessions
from bitchat.im.delivery import push_message
from bitchat.im.packets import TypingEvent
from bitchat.protocol.packets import Packet, registry
from bitchat.settings import Settings

if TYPE_CHECKING:
    from bitchat.session import Session

log = logging.getLogger("bitchat.cluster.connections")

# KEYS: none (node keys are derived). ARGV: prefix, this node's id, user ids...
# Returns {node id, {user ids online there}, ...} for live nodes other than this one.
_LOCATE = """
local prefix = ARGV[1]
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', prefix .. 'nodes')) do
  if n ~= ARGV[2] and redis.call('EXISTS', prefix .. 'node:' .. n) == 1 then
    local counts = redis.call('HMGET', prefix .. 'online:' .. n, unpack(ARGV, 3))
    local here = {}
    for i, c in ipairs(counts) do
      if c then here[#here + 1] = ARGV[i + 2] end
    end
    if #here > 0 then
      out[#out + 1] = n
      out[#out + 1] = here
    end
  end
end
return out
"""

# ARGV: prefix. The user ids online on any live node.
_ONLINE = """
local prefix = ARGV[1]
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', prefix .. 'nodes')) do
  if redis.call('EXISTS', prefix .. 'node:' .. n) == 1 then
    for _, u in ipairs(redis.call('HKEYS', prefix .. 'online:' .. n)) do
      out[#out + 1] = u
    end
  end
end
return out
"""

_LOCATE_CHUNK = 1000  # users per script call: Lua's unpack() has a stack limit
FORWARD_BATCH = 512
_DISCONNECT = "disconnect"  # an event that closes a user's sessions on every node


def _message_row(m: Message) -> list[Any]:
    # seq last: a node before it sends 8 values, and Message's seq defaults to 0.
    row = [m.id, m.kind, m.sender_id, m.sender_name, m.to, m.text, m.ts, m.client_msg_id, m.seq]
    if m.op or m.type != "text" or m.reply_to or m.extra or m.fields or m.mentions:
        # A lively message or event: what it carries beyond a plain message, in
        # Message's field order (a plain one keeps its short row).
        row += [0, m.conv, m.op, m.target, m.type, m.fields, m.reply_to, m.edited_at]
        row += [m.recalled, m.reacts, m.mentions, m.no, m.extra]
    return row


class RedisConnectionCenter(ConnectionCenter):
    """Sessions in memory, online users in Redis, forwarding over Redis pub/sub."""

    def __init__(self, redis_url: str, settings: Settings, node_id: int) -> None:
        self.redis_url = redis_url
        self.settings = settings
        self.node_id = node_id
        self.keys = Keys(settings.redis_prefix)
        self.health = Health("Redis", log)
        self.redis = connect_redis(redis_url, settings)
        self.registry = NodeRegistry(self.redis, settings, node_id)
        self.load: Callable[[], int] = lambda: 0
        """Connections on this node (set by :func:`~bitchat.cluster.node.join_cluster`);
        published as its load."""
        self.on_evicted: Callable[[], None] | None = None
        """Called if another instance took this node id over (this node must stop:
        :func:`~bitchat.cluster.node.join_cluster` stops the server)."""
        self.forwarded = 0
        self.received = 0
        self._locate = self.redis.register_script(_LOCATE)
        self._online = self.redis.register_script(_ONLINE)
        self._by_user: dict[int, list[Session]] = {}
        # Mirror of _by_user in Redis, written by one task (so writes keep their order).
        self._dirty: set[int] = set()
        self._rewrite_all = False
        self._write_waiters: list[asyncio.Future[None]] = []
        self._write_wake = asyncio.Event()
        self._forward: collections.deque[tuple[Message, tuple[int, ...]]] = collections.deque()
        self._forward_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._publishing: set[asyncio.Task[None]] = set()
        self._forward_idle = asyncio.Event()
        self._forward_idle.set()
        # Callbacks of after_forward, by how many messages must have left first.
        self._queued = 0  # messages ever put in the forward queue
        self._left_queue = 0  # of those, forwarded (or given up on)
        self._after_forward: collections.deque[tuple[int, Callable[[], None]]] = collections.deque()
        self._peers: dict[int, str] | None = None  # other live nodes: id -> instance
        self._events_out: list[bytes] = []
        self._events_task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closing = False
        self._left = False
        self._beat_lock = asyncio.Lock()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Claim the node id (refusing a duplicate), then start the background tasks."""
        await self.registry.claim()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._heartbeat_loop(), name="bitchat-heartbeat"),
            loop.create_task(self._write_loop(), name="bitchat-online-writer"),
            loop.create_task(self._forward_loop(), name="bitchat-forwarder"),
            loop.create_task(self._subscribe_loop(), name="bitchat-subscriber"),
        ]
        try:
            await asyncio.wait_for(self._subscribed.wait(), self.settings.backend_timeout)
        except TimeoutError:
            log.warning("not yet subscribed to this node's inbox; continuing")
        log.info(
            "node %d uses Redis at %s (key prefix %r)",
            self.node_id,
            safe_url(self.redis_url),
            self.keys.prefix,
        )

    async def announce(self, host: str, port: int) -> None:
        """The server listens: publish the address and let the router send clients."""
        self.registry.host = host
        self.registry.port = port
        self.registry.ready = True
        await self._beat_once()
        log.info("node %d announced at %s:%d", self.node_id, host, port)

    async def leave(self) -> None:
        """Leave the registry at once, first thing in a clean stop: the router stops
        sending clients here while the connections drain. The heartbeat stops too,
        so the node does not register again; a second call does nothing."""
        if self._left:
            return
        self._left = True
        async with self._beat_lock:
            pass  # a heartbeat under way ends first: after the release, it would register again
        try:
            if await asyncio.wait_for(self.registry.release(), self.settings.backend_timeout):
                log.info("node %d left the registry", self.node_id)
        except REDIS_ERRORS as exc:
            log.warning(
                "could not leave the registry (%s); it expires in %.1fs",
                exc,
                self.settings.node_ttl,
            )

    async def close(self) -> None:
        await self.leave()
        self._closing = True
        if self._forward and self.health.up:
            # Give queued forwards a moment to leave (they are in the store anyway).
            self._forward_wake.set()
            try:
                await asyncio.wait_for(self._forward_idle.wait(), 1.0)
            except TimeoutError:
                log.warning("%d forwards left to the recipients' next sync", len(self._forward))
        tasks = [*self._tasks, *self._publishing]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._release(self._queued)
        with contextlib.suppress(*REDIS_ERRORS):
            await self.redis.aclose()

    # -- the ConnectionCenter interface ------------------------------------------------------

    async def attach(self, user_id: int, session: Session) -> None:
        sessions = self._by_user.setdefault(user_id, [])
        if session in sessions:
            return
        sessions.append(session)
        try:
            await self._flush(user_id)
        except ServiceUnavailable:
            # Not online cluster-wide: undo, so the login fails cleanly.
            self._remove(user_id, session)
            raise

    async def detach(self, session: Session) -> None:
        user_id = session.user_id
        if user_id is None or not self._remove(user_id, session):
            return
        with contextlib.suppress(ServiceUnavailable):  # rewritten in full once Redis is back
            await self._flush(user_id)

    def _remove(self, user_id: int, session: Session) -> bool:
        sessions = self._by_user.get(user_id)
        if not sessions or session not in sessions:
            return False
        sessions.remove(session)
        if not sessions:
            del self._by_user[user_id]
        return True

    def local_sessions(self, user_id: int) -> Sequence[Session]:
        return self._by_user.get(user_id, ())

    def local_users(self) -> list[int]:
        return sorted(self._by_user)

    async def online_users(self) -> list[int]:
        try:
            raw = await self._online(args=[self.keys.prefix])
        except REDIS_ERRORS as exc:
            self._failed(exc, "listing online users")
            raise ServiceUnavailable("the online list is unavailable (Redis is down)") from exc
        self._ok()
        return sorted({int(u) for u in raw} | set(self._by_user))

    async def is_online(self, user_id: int) -> bool:
        if user_id in self._by_user:
            return True
        return bool(await self.locate([user_id]))

    async def locate(self, user_ids: Iterable[int]) -> dict[int, set[int]]:
        """The other live nodes holding any of ``user_ids``: node id -> those users."""
        users = list(dict.fromkeys(user_ids))
        found: dict[int, set[int]] = {}
        for start in range(0, len(users), _LOCATE_CHUNK):
            chunk = users[start : start + _LOCATE_CHUNK]
            try:
                raw = await self._locate(args=[self.keys.prefix, self.node_id, *chunk])
            except REDIS_ERRORS as exc:
                self._failed(exc, "locating users")
                raise ServiceUnavailable("cannot locate users (Redis is down)") from exc
            for i in range(0, len(raw), 2):
                found.setdefault(int(raw[i]), set()).update(int(u) for u in raw[i + 1])
        self._ok()
        return found

    def deliver(self, message: Message, user_ids: Iterable[int], exclude_session: int = 0) -> None:
        targets = tuple(user_ids)
        push_message(
            message,
            (s for u in targets for s in self._by_user.get(u, ()) if s.id != exclude_session),
        )
        if self._closing:
            return
        if len(self._forward) >= self.settings.forward_queue_max:
            log.warning(
                "forward queue full: message %d left to the recipients' next sync", message.id
            )
            return
        self._forward.append((message, targets))
        self._queued += 1
        self._forward_idle.clear()
        self._forward_wake.set()

    def after_forward(self, callback: Callable[[], None]) -> None:
        """``callback()`` once what was delivered so far has been published to the
        other nodes (or could not be: Redis down). At once if nothing is queued, if
        Redis is down, or behind a backlog of over ``ack_hold_max`` messages (a
        backlog would make acks slow; the store and the re-syncs still cover them)."""
        if (
            not self._forward
            or not self.health.up
            or len(self._forward) > self.settings.ack_hold_max
        ):
            callback()
            return
        self._after_forward.append((self._queued, callback))

    def _release(self, upto: int) -> None:
        """Run the after_forward callbacks waiting for at most ``upto`` messages."""
        waiting = self._after_forward
        while waiting and waiting[0][0] <= upto:
            _, callback = waiting.popleft()
            try:
                callback()
            except Exception:
                log.exception("an after_forward callback failed")

    # -- presence across nodes --------------------------------------------------------------

    def publish_presence(self, user_id: int, name: str, online: bool, last_seen: int = 0) -> None:
        """Tell the other nodes' watchers (best effort: a lost one is only a late list);
        they hear it through their own :attr:`on_presence`."""
        if self._closing:
            return
        payload = msgpack.packb([self.node_id, user_id, name, online, last_seen])

        async def publish() -> None:
            try:
                await self.redis.publish(self.keys.presence, payload)
            except REDIS_ERRORS as exc:
                self._failed(exc, "publishing presence")

        task = asyncio.get_running_loop().create_task(publish())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    # -- pushes of events across nodes -------------------------------------------------------

    def deliver_event(
        self, packet: Packet, user_ids: Sequence[int], exclude_session: int = 0
    ) -> None:
        by_user = self._by_user
        for u in user_ids:
            for s in by_user.get(u, ()):
                if s.id != exclude_session:
                    s.push(packet)
        if self._closing or len(self._events_out) >= self.settings.forward_queue_max:
            return  # best effort: dropped
        # The excluded session is one of this node's: the others push to all they hold.
        self._events_out.append(
            msgpack.packb([self.node_id, packet.TYPE, packet.to_dict(), list(user_ids)])
        )
        if self._events_task is None:
            task = asyncio.get_running_loop().create_task(self._publish_events())
            self._events_task = task
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _publish_events(self) -> None:
        """Publish what is queued, in one pipeline per round, until nothing is left."""
        try:
            while self._events_out:
                batch, self._events_out = self._events_out, []
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for payload in batch:
                            pipe.publish(self.keys.typing, payload)
                        await pipe.execute()
                except REDIS_ERRORS as exc:
                    self._failed(exc, "publishing events")  # lost: best effort
        finally:
            self._events_task = None

    async def disconnect_user(self, user_id: int, code: str, message: str) -> None:
        close_sessions(self.local_sessions(user_id), code, message)
        # On the events channel: every node closes the sessions of the user it holds.
        payload = msgpack.packb([self.node_id, _DISCONNECT, [user_id], code, message])
        try:
            await self.redis.publish(self.keys.typing, payload)
        except REDIS_ERRORS as exc:
            self._failed(exc, "publishing a disconnect")
            raise ServiceUnavailable(
                "Redis is unavailable: the user's connections on other nodes stay open"
            ) from exc

    def _event_received(self, data: list[Any]) -> None:
        if len(data) == 5 and data[1] == _DISCONNECT:
            node, _, users, code, message = data
            if node != self.node_id:
                for u in users:
                    close_sessions(self._by_user.get(u, ()), str(code), str(message))
            return
        if len(data) == 8:
            # A node from before events carries typing only, field by field.
            node, user_id, name, to, group_id, typing, expires_in, users = data
            packet: Packet = TypingEvent(user_id, name, to, group_id, typing, expires_in)
        else:
            node, type_, body, users = data
            cls = registry.get(type_)
            if cls is None:
                log.warning("dropping an event of unknown packet type %r", type_)
                return
            packet = cls.from_dict(body)
        if node == self.node_id:
            return
        by_user = self._by_user
        for u in users:
            for s in by_user.get(u, ()):
                s.push(packet)

    # -- health -----------------------------------------------------------------------------

    def _failed(self, exc: BaseException, doing: str) -> None:
        self.health.failed(exc, doing)

    def _ok(self) -> None:
        if self.health.ok():
            # Writes may have been lost meanwhile: mirror every local user again.
            self._rewrite_all = True
            self._write_wake.set()
            self._forward_wake.set()

    # -- the mirror of local users in Redis --------------------------------------------------

    async def _flush(self, user_id: int) -> None:
        """Write the user's local connection count; resolves once Redis has it."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._dirty.add(user_id)
        self._write_waiters.append(fut)
        self._write_wake.set()
        await fut

    async def _write_loop(self) -> None:
        key = self.keys.online(self.node_id)
        ttl_ms = max(1, int(self.settings.node_ttl * 1000))
        while True:
            await self._write_wake.wait()
            self._write_wake.clear()
            if not (self._dirty or self._rewrite_all or self._write_waiters):
                continue
            dirty, self._dirty = self._dirty, set()
            waiters, self._write_waiters = self._write_waiters, []
            rewrite = self._rewrite_all
            self._rewrite_all = False
            if self._left:
                # Out of the registry (stopping): the online hash went with it, and
                # writing it again would leave a stray key behind until it expires.
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
                continue
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    if rewrite:
                        pipe.delete(key)
                        counts = {u: len(s) for u, s in self._by_user.items()}
                        if counts:
                            pipe.hset(key, mapping=counts)  # type: ignore[arg-type]
                    else:
                        for u in dirty:
                            n = len(self._by_user.get(u, ()))
                            if n:
                                pipe.hset(key, str(u), n)
                            else:
                                pipe.hdel(key, str(u))
                    pipe.pexpire(key, ttl_ms)
                    await pipe.execute()
            except REDIS_ERRORS as exc:
                self._failed(exc, "publishing online users")
                self._rewrite_all = True  # once Redis is back, rewrite the whole hash
                err = ServiceUnavailable("the connection center is unavailable (Redis is down)")
                for w in waiters:
                    if not w.done():
                        w.set_exception(err)
                continue
            self._ok()
            if rewrite:
                log.info(
                    "node %d: %d online users written to Redis again",
                    self.node_id,
                    len(self._by_user),
                )
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    # -- heartbeat --------------------------------------------------------------------------

    async def _beat_once(self) -> None:
        async with self._beat_lock:
            if self._left:
                return
            try:
                result, peers = await self.registry.beat(self.load(), len(self._by_user))
            except REDIS_ERRORS as exc:
                self._failed(exc, "refreshing the node's registration")
                return
        if result < 0:
            log.critical(
                "node id %d was taken over by another instance while this node "
                "could not reach Redis; stopping this node",
                self.node_id,
            )
            if self.on_evicted is not None:
                self.on_evicted()
            return
        if result == 0:
            log.warning(
                "node %d's registration had expired (Redis restarted, or this node "
                "was cut off for over %.1fs); registered again",
                self.node_id,
                self.settings.node_ttl,
            )
            self._rewrite_all = True
            self._write_wake.set()
        self._ok()
        self._seen_peers(peers)

    def _seen_peers(self, peers: dict[int, str]) -> None:
        """The other live nodes as of this heartbeat: if one has gone since the last
        (or came back as a new instance), re-sync the local users from the store."""
        before, self._peers = self._peers, peers
        if before is None:
            return
        gone = sorted(n for n, instance in before.items() if peers.get(n) != instance)
        if gone:
            log.warning(
                "node %d: node(s) %s left the registry; re-sending pending messages "
                "to the %d users online here",
                self.node_id,
                ", ".join(map(str, gone)),
                len(self._by_user),
            )
            self._resync_all()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.registry.interval)
            await self._beat_once()

    # -- forwarding -------------------------------------------------------------------------

    async def _forward_loop(self) -> None:
        backoff = Backoff(0.05, 1.0)
        while True:
            await self._forward_wake.wait()
            self._forward_wake.clear()
            while self._forward:
                n = min(len(self._forward), FORWARD_BATCH)
                batch = [self._forward[i] for i in range(n)]
                try:
                    await self._forward_batch(batch)
                except ServiceUnavailable:
                    # Keep the batch; retry when Redis answers (the heartbeat probes it).
                    # The acks waiting for it go now: an ack means stored, not forwarded.
                    self._release(self._queued)
                    await asyncio.sleep(backoff.delay())
                    continue
                backoff.reset()
                for _ in range(n):
                    self._forward.popleft()
                self._left_queue += n
                self._release(self._left_queue)
            self._forward_idle.set()

    async def _forward_batch(self, batch: list[tuple[Message, tuple[int, ...]]]) -> None:
        users: dict[int, None] = {}
        for _, targets in batch:
            users.update(dict.fromkeys(targets))
        where = await self.locate(users)
        if not where:
            return
        out: dict[int, list[Any]] = {}
        for message, targets in batch:
            for node, present in where.items():
                here = [u for u in targets if u in present]
                if here:
                    out.setdefault(node, []).append([_message_row(message), here])
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for node, items in out.items():
                    pipe.publish(self.keys.inbox(node), msgpack.packb(items))
                await pipe.execute()
        except REDIS_ERRORS as exc:
            self._failed(exc, "forwarding messages")
            raise ServiceUnavailable("cannot forward (Redis is down)") from exc
        self.forwarded += sum(len(items) for items in out.values())

    # -- receiving --------------------------------------------------------------------------

    async def _subscribe_loop(self) -> None:
        backoff = Backoff(0.05, 1.0)
        first = True
        inbox = self.keys.inbox(self.node_id)
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(inbox, self.keys.presence, self.keys.typing)
                if not first:
                    log.warning(
                        "node %d subscribed again to its inbox; re-sending pending "
                        "messages to its %d online users",
                        self.node_id,
                        len(self._by_user),
                    )
                    self._resync_all()
                first = False
                self._subscribed.set()
                backoff.reset()
                while True:
                    msg = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self.settings.node_ttl
                    )
                    if msg is not None:
                        self._received(msg)
            except REDIS_ERRORS as exc:
                self._subscribed.clear()
                self._failed(exc, "listening on the node's inbox")
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*REDIS_ERRORS):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff.delay())

    def _received(self, msg: dict[str, Any]) -> None:
        channel = _text(msg.get("channel"))
        try:
            data = msgpack.unpackb(msg["data"], raw=False)
        except Exception:
            log.warning("dropping an undecodable message on %s", channel)
            return
        if channel == self.keys.typing:
            try:
                self._event_received(data)
            except (TypeError, ValueError, BitchatError):
                log.warning("dropping a malformed event")
            return
        if channel == self.keys.presence:
            node, user_id, name, online, *rest = data  # a node before last seen sends 4
            if node != self.node_id and self.on_presence is not None:
                self.on_presence(user_id, name, online, int(rest[0]) if rest else 0)
            return
        for row, users in data:
            message = Message(*row)
            self.received += 1
            push_message(message, (s for u in users for s in self._by_user.get(u, ())))

    def _resync_all(self) -> None:
        if self.on_resync is None:
            return
        for sessions in list(self._by_user.values()):
            for s in list(sessions):
                if not s.closed:
                    self.on_resync(s)

    async def wait_subscribed(self, timeout: float) -> None:
        await asyncio.wait_for(self._subscribed.wait(), timeout)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
