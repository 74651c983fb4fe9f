"""The IM service: login, users, one-to-one and group chat, history, acks, typing.

It installs its handlers on a :class:`~bitchat.Server` and works against the
three center interfaces only, so standalone and cluster share every line: what a
cluster adds (presence from other nodes, a re-sync after pushes were lost in
transit) comes through the connection center's hooks, and the composition root
(:func:`bitchat.app.build_server`) picks the centers and the order they start in.

Delivery: a message gets its id when its request is handled (so a
connection's messages keep their order), is stored for every recipient
before the sender's :class:`SendAck`, then pushed to every connection of the
recipients (and the sender's other devices); in a cluster the ack also waits
until the message has left for the other nodes. A retry of a stored message
(same ``client_msg_id``) is pushed again, since its first try may have died with
its node. A recipient's :class:`Ack` clears it; what is not acked is pushed
again at the next login, in id order, or when the connection center says pushes
may have been lost (``on_resync``).

Typing is relayed, never stored: :mod:`bitchat.im.typing_relay`. Who may do what
in a group, and what a block stops: :mod:`bitchat.im.moderation` (the send paths
check a muted sender and a block against the user center's caches).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import heapq
import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from bitchat.dispatch import Deferred
from bitchat.errors import RequestError, codes
from bitchat.im.auth import Authenticator, JwtAuthenticator
from bitchat.im.centers import (
    NO_BLOCKS,
    ConnectionCenter,
    Group,
    Message,
    MessageCenter,
    User,
    UserCenter,
    conversation,
    p2p_pair,
)
from bitchat.im.delivery import DEVICE, SYNCING, DeviceState, push_message
from bitchat.im.ids import IdGenerator
from bitchat.im.lifecycle import Lifecycle, Validator
from bitchat.im.moderation import Moderation
from bitchat.im.names import name_candidates, name_key, normalize_name
from bitchat.im.packets import (
    EDIT,
    GROUP,
    P2P,
    TEXT,
    Ack,
    AddMember,
    AnswerJoinRequest,
    BanMember,
    Block,
    BlockedList,
    ConversationList,
    CreateGroup,
    CreateInvite,
    DeleteForMe,
    EditMessage,
    GetBlocked,
    GetConversations,
    GetJoinRequests,
    GetReactions,
    GetReceipts,
    GetVersions,
    GroupInfo,
    GroupList,
    GroupMembers,
    Hidden,
    History,
    HistoryPage,
    InviteInfo,
    JoinGroup,
    JoinRequestList,
    KickMember,
    LeaveGroup,
    ListOnline,
    Login,
    LoginOk,
    Logout,
    MarkRead,
    MemberList,
    MuteMember,
    MyGroups,
    Ok,
    OnlineUsers,
    Presence,
    React,
    ReadState,
    RecallMessage,
    Receipt,
    Receipts,
    Register,
    SendAck,
    SendGroup,
    SendP2P,
    SetGroupOptions,
    SetPrivacy,
    SetRole,
    Typing,
    UserInfo,
)
from bitchat.im.throttle import LoginThrottle, MemoryLoginThrottle, remote_address, throttled
from bitchat.im.typing_relay import TYPING_KEY, TypingRelay
from bitchat.server import Server
from bitchat.session import Session

if TYPE_CHECKING:
    from bitchat.im.webhook_dispatch import WebhookDispatcher
    from bitchat.protocol.packets import Packet

log = logging.getLogger("bitchat.im")

_OK = Ok()  # no fields: one instance answers every Ack
_CHAIN = "bitchat.send_chain"
_TOKEN = "bitchat.token"
_DEVICE_NAME = re.compile(r"[A-Za-z0-9._:-]+")


def _valid_name(name: str, max_len: int) -> str:
    """The name in its stored form (NFKC, nothing invisible): bitchat.im.names."""
    return normalize_name(name, max_len)


Center = UserCenter | MessageCenter | ConnectionCenter


class IMService:
    """The IM handlers over one set of centers.

    ``start_order`` is the order the centers start in (default: users, messages,
    connections); they close in the order connections, messages, users, once the
    service's own tasks are done. ``throttle`` slows password guessing (default:
    counts in this process). ``authenticator`` checks the ``jwt`` of a Login
    (default: :class:`~bitchat.im.auth.JwtAuthenticator` over the settings).
    """

    def __init__(
        self,
        server: Server,
        users: UserCenter,
        messages: MessageCenter,
        connections: ConnectionCenter,
        *,
        start_order: Sequence[Center] | None = None,
        throttle: LoginThrottle | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.server = server
        self.settings = server.settings
        self.throttle = throttle or MemoryLoginThrottle(self.settings)
        self.authenticator = authenticator or JwtAuthenticator(self.settings)
        self.users = users
        self.messages = messages
        self.connections = connections
        self.start_order: tuple[Center, ...] = tuple(start_order or (users, messages, connections))
        self.ids = IdGenerator(self.settings.node_id)
        self.watchers: dict[Session, int] = {}
        """Sessions that asked for Presence pushes, with the user each asked as: a
        watch ends at logout, and a login as another user does not inherit it."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._syncs: set[asyncio.Task[None]] = set()
        self.typing = TypingRelay(self.settings, users, connections)
        self.webhooks: WebhookDispatcher | None = None
        """Delivers the webhook outbox (the composition root sets it when webhooks are
        configured); it starts after the centers and stops before them."""
        self.moderation = Moderation(self)
        """The group moderation and block rules (the server API calls them too)."""
        self.life = Lifecycle(self)
        """Edits, recalls, reactions, delete for me, replies, mentions, message types."""
        connections.on_presence = self._tell_watchers
        connections.on_resync = self._resync
        self._install()

    # -- wiring ---------------------------------------------------------------------------

    def _install(self) -> None:
        s = self.server
        s.add_handler(Register, self.on_register, poolable=False)
        s.add_handler(Login, self.on_login, poolable=False)
        for cls, func in (
            (Logout, self.on_logout),
            (ListOnline, self.on_list_online),
            (SendP2P, self.on_send_p2p),
            (SendGroup, self.on_send_group),
            (Ack, self.on_ack),
            (CreateGroup, self.on_create_group),
            (JoinGroup, self.on_join_group),
            (LeaveGroup, self.on_leave_group),
            (MyGroups, self.on_my_groups),
            (GroupMembers, self.on_group_members),
            (History, self.on_history),
            (SetPrivacy, self.on_set_privacy),
            (GetConversations, self.on_get_conversations),
            (MarkRead, self.on_mark_read),
            (GetReceipts, self.on_get_receipts),
            (Typing, self.typing.on_typing),
            (SetRole, self.on_set_role),
            (KickMember, self.on_kick),
            (BanMember, self.on_ban),
            (MuteMember, self.on_mute),
            (SetGroupOptions, self.on_set_group_options),
            (CreateInvite, self.on_create_invite),
            (AddMember, self.on_add_member),
            (GetJoinRequests, self.on_get_join_requests),
            (AnswerJoinRequest, self.on_answer_join_request),
            (Block, self.on_block),
            (GetBlocked, self.on_get_blocked),
            (EditMessage, self.life.on_edit),
            (RecallMessage, self.life.on_recall),
            (React, self.life.on_react),
            (DeleteForMe, self.life.on_delete_for_me),
            (GetVersions, self.life.on_get_versions),
            (GetReactions, self.life.on_get_reactions),
        ):
            s.add_handler(cls, func, login_required=True, poolable=False)
        s.on_startup.append(self._start)
        s.on_shutdown.append(self._stop)
        s.on_session_close.append(self._session_closed)

    async def _start(self, server: Server) -> None:
        # If a step fails, the server runs the shutdown hooks: every center closes.
        await self.authenticator.start()
        for center in self.start_order:
            await center.start()
        last = await self.messages.last_id(self.settings.node_id)
        self.ids = IdGenerator(self.settings.node_id, last)
        if self.webhooks is not None:
            await self.webhooks.start()

    async def _stop(self, server: Server) -> None:
        # Offline syncs stop, detaches of closed sessions finish, before the centers close.
        for task in self._syncs:
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.shutdown_grace)
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.connections.close()
        await self.messages.close()
        await self.users.close()
        await self.throttle.close()
        await self.authenticator.close()

    def _session_closed(self, session: Session) -> None:
        self.watchers.pop(session, None)
        if session.user_id is not None:
            task = self.server.loop.create_task(self._logged_out(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def register_type(self, name: str, fields: type[Packet]) -> None:
        """Let clients send messages of type ``name`` with fields checked against
        ``fields`` (see :meth:`bitchat.im.lifecycle.Lifecycle.register_type`)."""
        self.life.register_type(name, fields)

    def type_validator(self, name: str, fn: Validator) -> None:
        """Check the fields of every message of type ``name`` with ``fn(session, fields)``
        too (see :meth:`bitchat.im.lifecycle.Lifecycle.type_validator`)."""
        self.life.type_validator(name, fn)

    # -- sessions -------------------------------------------------------------------------

    async def on_register(self, session: Session, p: Register) -> UserInfo:
        if not self.settings.password_login:
            raise RequestError(
                codes.FORBIDDEN, "password accounts are off on this server: log in with a JWT"
            )
        if not self.settings.open_registration:
            raise RequestError(codes.FORBIDDEN, "sign-ups are closed on this server")
        name = _valid_name(p.name, self.settings.max_name_length)
        self.check_password(p.password)
        user = await self.users.register(name, p.password)
        return UserInfo(user.id, user.name)

    def check_password(self, password: str) -> None:
        """RequestError ``invalid_packet`` unless a password has an allowed length."""
        if not 1 <= len(password) <= self.settings.max_password_length:
            raise RequestError(
                codes.INVALID_PACKET,
                f"a password has 1 to {self.settings.max_password_length} characters",
            )

    async def on_login(self, session: Session, p: Login) -> LoginOk:
        before = session.user_id
        was_syncing = SYNCING in session.data
        try:
            return await self._login(session, p)
        except BaseException:
            # A backend failed half-way (Redis or PostgreSQL down), or the connection
            # closed: the session must not stay logged in, nor keep its pushes held back.
            if session.user_id is not None and session.user_id != before:
                await self.connections.detach(session)
                session.user_id = session.user_name = None
                session.data.pop(_TOKEN, None)
                session.data.pop(DEVICE, None)
            held = None if was_syncing else session.data.pop(SYNCING, None)
            if held and session.user_id is not None:
                push_message_each(held, session)
            raise

    async def _login(self, session: Session, p: Login) -> LoginOk:
        if p.device:
            self._check_device(p.device)
        token_device = 0
        if p.token:
            found = await self.users.check_token(p.token)
            if found is None:
                self.server.metrics.login_failures.inc()
                raise RequestError(codes.LOGIN_FAILED, "the token is unknown or expired")
            (user, token_device), token = found, p.token
        elif p.jwt:
            try:
                user = await self._external(p.jwt)
            except RequestError:
                self.server.metrics.login_failures.inc()
                raise
            token = ""
        elif not self.settings.password_login:
            self.server.metrics.login_failures.inc()
            raise RequestError(
                codes.LOGIN_FAILED, "password logins are off on this server: log in with a JWT"
            )
        else:
            name = _valid_name(p.name, self.settings.max_name_length)
            self.check_password(p.password)
            try:
                user = await self._authenticate(session, name, p.password)
            except RequestError:
                self.server.metrics.login_failures.inc()
                raise
            token = ""
        if await self.users.is_server_banned(user.id):
            self.server.metrics.login_failures.inc()
            raise RequestError(codes.BANNED, "this account is banned from the server")
        device_id, device = await self._device(user, p.device, token_device)
        if token and not token_device:
            # A token from before devices becomes the device's: it does not make a new
            # device at every use (each would push a real one out at the cap). Another
            # login that bound it first made it its device's: this one gets its own.
            if not await self.users.bind_token(token, device_id):
                token = await self.users.issue_token(user.id, self.settings.token_ttl, device_id)
        elif not token or device_id != token_device:
            token = await self.users.issue_token(user.id, self.settings.token_ttl, device_id)
        if session.closed:
            raise RequestError(codes.LOGIN_FAILED, "the connection closed during login")
        if session.user_id is not None and session.user_id != user.id:
            self.watchers.pop(session, None)
            await self._logged_out(session)
        # Acks the device sent just before (say on the connection this one replaces) may
        # still be queued for the store: an empty cursor move resolves after them, so what
        # the device acked is not counted, nor pushed, again.
        await self.messages.ack(user.id, device_id, [])
        pending = await self.messages.count_pending(user.id, device_id)
        # Seen now: should the node die, the user was last seen at least at this login.
        await self.users.touch_last_seen([user.id], _now_ms())
        show_last_seen = await self.users.show_last_seen(user.id)
        first = not await self.connections.is_online(user.id)
        # From here on, live messages for the user are held until the offline ones
        # are out (see _sync), so the session sees everything in id order.
        held: list[Message] = []
        session.data[SYNCING] = held
        session.data[DEVICE] = DeviceState(
            device_id,
            device,
            self.settings.ack_window,
            self._resync_gap,
            self.settings.push_gap_wait,
        )
        session.user_id = user.id
        session.user_name = user.name
        session.login_at = time.time()
        session.data[_TOKEN] = token
        await self.connections.attach(user.id, session)
        if session.closed:
            # Closed while being attached: its close hook may have run before the
            # attach, so detach here, or the user would stay online for good.
            await self._logged_out(session)
            raise RequestError(codes.LOGIN_FAILED, "the connection closed during login")
        if await self.users.is_server_banned(user.id):
            # A ban that came during this login: its disconnect may have run before the
            # attach and its revocation before this token. The ban is written first, so
            # either that disconnect found the session or this finds the ban.
            await self._logged_out(session)
            await self.users.revoke_token(token)
            self.server.metrics.login_failures.inc()
            raise RequestError(codes.BANNED, "this account is banned from the server")
        self.server.metrics.logins.inc()
        # Offline messages go out after the LoginOk answer, in id order.
        task = self.server.loop.create_task(self._sync(session, user.id, device_id, held))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._syncs.add(task)
        task.add_done_callback(self._syncs.discard)
        if first:
            self._presence(user, True)
        return LoginOk(user.id, user.name, token, pending, show_last_seen, device)

    async def _external(self, credential: str) -> User:
        """The user of an external credential (the Login's ``jwt``), created at its
        subject's first login with the name it asks for, made valid and free."""
        identity = await self.authenticator.authenticate(credential)
        names = name_candidates(identity.name or identity.subject, self.settings.max_name_length)
        return await self.users.external_user(identity.provider, identity.subject, names)

    def _check_device(self, name: str) -> None:
        limit = self.settings.max_device_length
        if len(name) > limit or not _DEVICE_NAME.fullmatch(name):
            raise RequestError(
                codes.INVALID_PACKET,
                f"a device id has 1 to {limit} letters, digits, '.', '_', ':' or '-'",
            )

    async def _device(self, user: User, asked: str, token_device: int) -> tuple[int, str]:
        """The session's device: the token's, else the one asked for, else a new one
        named here. A device new to the server starts at the user's read positions."""
        name = ""
        if token_device:
            name = await self.users.device_name(user.id, token_device) or ""
        if not name:
            name = asked or "d-" + secrets.token_urlsafe(9)
        device_id, new = await self.users.device(user.id, name, self.settings.max_devices_per_user)
        if new:
            await self.messages.start_device(user.id, device_id)
        return device_id, name

    async def _authenticate(self, session: Session, name: str, password: str) -> User:
        """A password login, through the throttle: an attempt that comes too early is
        refused unchecked; a wrong password counts against the account and the address."""
        account, address = name_key(name), remote_address(session.remote)
        s = self.settings
        async with self.throttle.turn(address):
            wait = await self.throttle.attempt(account, address)
            if wait > 0:
                raise throttled(wait)
            try:
                user = await self.users.authenticate(
                    name, password, s.auto_register and s.open_registration
                )
            except RequestError as exc:
                if exc.code != codes.LOGIN_FAILED:  # a name too like another, a store down
                    await self._forgive(account, address)
                raise
            await self._forgive(account, address)
        return user

    async def _forgive(self, account: str, address: str) -> None:
        try:
            await self.throttle.forgive(account, address)
        except RequestError as exc:  # the throttle's store is down: the attempt stays counted
            log.warning("cannot update the login throttle: %s", exc.message)

    async def _sync(
        self,
        session: Session,
        user_id: int,
        device_id: int,
        held: list[Message],
        again: bool = False,
    ) -> None:
        """Push what the device misses in id order, then the messages held meanwhile.

        The device's own messages past its cursors are read too, never pushed: it has
        them, so they are no gap in what it has (and its cursor moves over those right
        after it, which a device that only sends would otherwise read at every login).
        """
        sent: set[int] = set()
        own: dict[str, list[int]] = {}
        limit = self.settings.offline_batch

        def current() -> bool:  # a later login on this session replaces this sync
            return (
                not session.closed
                and session.user_id == user_id
                and session.data.get(SYNCING) is held
            )

        failed = False
        try:
            if again and await self.users.device_name(user_id, device_id) is None:
                # Forgotten over the device cap since its login, cursors and all: from
                # the start of every conversation is not what it misses. It comes back
                # as a new device, at the user's read positions.
                log.info("session %d: its device was forgotten; closing it", session.id)
                failed = True
                session.close()
                return
            positions = await self.messages.positions(user_id, device_id)
            cursors = {conv: at for conv, (at, _) in positions.items()}
            device: DeviceState | None = session.data.get(DEVICE)
            if not current() or device is None:
                return
            device.seed(cursors)
            # What the user deleted for themselves: not pushed, but passed over like the
            # device's own messages; and told again, for the copies it had before.
            hidden = await self.life.hidden_at_login(user_id)
            if hidden and current():
                session.push(Hidden(hidden))
            hide = set(hidden)
            backlog = Backlog(self.messages, positions, limit, self.settings.sync_read_ahead)
            while current():
                batch = await backlog.next_batch()
                if not current():
                    return
                push = []
                for m in batch:
                    if (m.sender_id == user_id and m.device == device_id) or m.id in hide:
                        device.note(m.conversation_key, m.seq)
                        own.setdefault(m.conversation_key, []).append(m.seq)
                    else:
                        push.append(m)
                push_message_each(push, session)
                sent.update(m.id for m in push)
                if len(batch) < limit:
                    break
                await session.drain()
            if own:
                await self._past_own(user_id, device_id, cursors, own)
        except Exception:
            log.exception("pushing offline messages to user %d failed", user_id)
            # Pushed the held messages, the device would ack them past what it never
            # got. It stays held back; the client comes back and this sync runs again.
            failed = True
            session.close()
        finally:
            if not failed and session.data.get(SYNCING) is held:
                del session.data[SYNCING]
                late = sorted((m for m in held if m.id not in sent), key=lambda m: m.id)
                if late and not session.closed and session.user_id == user_id:
                    push_message_each(late, session)

    async def _past_own(
        self, user_id: int, device_id: int, cursors: dict[str, int], own: dict[str, list[int]]
    ) -> None:
        """Move the device's cursors over its own messages that follow them."""
        moves: list[tuple[str, int]] = []
        for conv, seqs in own.items():
            start = at = cursors.get(conv, 0)
            for seq in sorted(seqs):
                if seq != at + 1:
                    break
                at = seq
            if at > start:
                moves.append((conv, at))
        if moves:
            try:
                await self.messages.ack(user_id, device_id, moves)
            except RequestError as exc:  # the next sync reads them again
                log.warning("cannot move the cursors of user %d: %s", user_id, exc.message)

    async def _logged_out(self, session: Session) -> None:
        user_id = session.user_id
        if user_id is None:
            return
        self.typing.stop_all(session)
        try:
            await self.connections.detach(session)
            if not await self.connections.is_online(user_id):
                # The last connection anywhere closed: only now is the user last seen.
                name = session.user_name or ""
                self._presence(User(user_id, name), False, await self._seen_now(user_id))
        except Exception:
            log.exception("detaching a session of user %d failed", user_id)

    async def _seen_now(self, user_id: int) -> int:
        """Store that the user was last seen now; the time if others may know it, else 0."""
        now = _now_ms()
        try:
            await self.users.touch_last_seen([user_id], now)
            return now if await self.users.show_last_seen(user_id) else 0
        except RequestError as exc:  # a store down: presence still goes out
            log.warning("cannot write when user %d was last seen: %s", user_id, exc.message)
            return 0

    async def on_logout(self, session: Session, p: Logout) -> Ok:
        self.watchers.pop(session, None)
        token = session.data.pop(_TOKEN, None)
        if token:
            await self.users.revoke_token(token)
        await self._logged_out(session)
        session.user_id = None
        session.user_name = None
        return Ok()

    def _presence(self, user: User, online: bool, last_seen: int = 0) -> None:
        """The user came online or went offline (their first session anywhere, their
        last one anywhere): tell every watcher, and the webhooks."""
        self._tell_watchers(user.id, user.name, online, last_seen)
        if self.webhooks is not None:
            self.webhooks.presence(user.id, user.name, online)
        self.connections.publish_presence(user.id, user.name, online, last_seen)

    def _tell_watchers(self, user_id: int, name: str, online: bool, last_seen: int = 0) -> None:
        """Push a presence change to this node's watchers (the center's ``on_presence``)."""
        if not self.watchers:
            return
        packet = Presence(user_id, name, online, 0 if online else last_seen)
        known_blocks = self.users.known_blocks
        for s, watcher in list(self.watchers.items()):
            if s.user_id != watcher:  # no longer the user who asked: the watch is over
                del self.watchers[s]
            elif watcher != user_id:
                # A watcher the user blocks sees them offline: told nothing (the
                # watcher's blocks are cached from the watch on; best effort if not).
                blocks = known_blocks(watcher)
                if blocks is None or blocks is NO_BLOCKS or user_id not in blocks.by:
                    s.push(packet)

    def _resync(self, session: Session) -> None:
        """Push what the session's device misses again (the center's ``on_resync``: pushes
        may have been lost in transit)."""
        user_id = session.user_id
        device = session.data.get(DEVICE)
        if (
            user_id is None
            or device is None
            or session.closed
            or session.data.get(SYNCING) is not None
        ):
            return
        held: list[Message] = []
        session.data[SYNCING] = held
        # What it has with no gap is found again from the pushes of this sync.
        device.reset()
        task = self.server.loop.create_task(
            self._sync(session, user_id, device.device_id, held, again=True)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resync_gap(self, session: Session) -> None:
        """A push skipped a seq of its conversation (lost between nodes): push again."""
        if session.closed:
            return
        log.info("session %d missed a message in transit; pushing again", session.id)
        self.server.loop.call_soon(self._resync, session)

    async def on_list_online(self, session: Session, p: ListOnline) -> OnlineUsers:
        if p.watch and session.user_id is not None:
            self.watchers[session] = session.user_id
        ids = await self.connections.online_users()
        if session.user_id is not None:
            blocks = await self.users.blocks(session.user_id)
            if blocks.by:  # those who block the asker show offline to them
                ids = [u for u in ids if u not in blocks.by]
        users = await self.users.get_users(ids)
        return OnlineUsers([{"id": u, "name": users[u].name} for u in ids if u in users])

    async def on_set_privacy(self, session: Session, p: SetPrivacy) -> Ok:
        assert session.user_id is not None
        await self.users.set_show_last_seen(session.user_id, p.show_last_seen)
        return Ok()

    # -- messages ---------------------------------------------------------------------------

    def _check_text(self, text: str) -> None:
        if not text:
            raise RequestError(codes.INVALID_PACKET, "a message needs text")
        if len(text) > self.settings.max_message_length:
            raise RequestError(
                codes.MESSAGE_TOO_LONG,
                f"messages are limited to {self.settings.max_message_length} characters",
            )

    def on_send_p2p(self, session: Session, p: SendP2P) -> Any:
        text = p.text
        if not text or len(text) > self.settings.max_message_length:
            self._check_text(text)  # raises
        assert session.user_id is not None
        if TYPING_KEY in session.data:  # a message means stopped typing
            self.typing.message_sent(session, p.to, 0)
        # As _new_message does, written out: this is every one-to-one message's path.
        msg = Message(
            0, P2P, session.user_id, session.user_name or "", p.to, text, 0, p.client_msg_id
        )
        if p.reply_to or p.type != TEXT or p.fields:
            return self._send_lively(
                session, msg, p.reply_to, p.type, p.fields, lambda: self._p2p_recipients(msg)
            )
        chain = session.data.get(_CHAIN)
        if chain is None or chain.done():
            blocks = self.users.known_blocks(session.user_id)
            if blocks is not None:
                if blocks is not NO_BLOCKS and blocks.either(p.to):
                    raise _blocked(blocks.mine, p.to)
                user = self.users.known_user(p.to)
                if user is not None:
                    return self._store_and_deliver(session, msg, [p.to])
        queued = self._chain(session)
        return asyncio.ensure_future(
            self._send_slow(session, msg, chain, queued, self._p2p_recipients(msg))
        )

    async def _p2p_recipients(self, msg: Message) -> list[int]:
        if await self.users.get_user(msg.to) is None:
            raise RequestError(codes.NOT_FOUND, f"no user {msg.to}")
        blocks = await self.users.blocks(msg.sender_id)
        if blocks.either(msg.to):
            raise _blocked(blocks.mine, msg.to)
        return [msg.to]

    async def _send_slow(
        self,
        session: Session,
        msg: Message,
        chain: asyncio.Future[Any] | None,
        queued: asyncio.Future[None],
        recipients: Coroutine[Any, Any, Sequence[int]],
    ) -> SendAck:
        """A send that needs I/O before it can be queued (an uncached user or group),
        or that follows one: it waits its turn, so the connection's order is kept."""
        try:
            if chain is not None:
                await asyncio.wait([chain])
            targets = await recipients
            stored: asyncio.Future[SendAck] = self.server.loop.create_future()
            self._store_and_deliver(session, msg, targets, stored)
        finally:
            recipients.close()  # never awaited when the chain failed first: no warning
            _resolve(queued)
        return await stored

    def on_send_group(self, session: Session, p: SendGroup) -> Any:
        self._check_text(p.text)
        if TYPING_KEY in session.data:
            self.typing.message_sent(session, 0, p.group_id)
        msg = self._new_message(session, GROUP, p.group_id, p.text, p.client_msg_id)
        if p.reply_to or p.type != TEXT or p.fields or "@" in p.text:
            return self._send_lively(
                session,
                msg,
                p.reply_to,
                p.type,
                p.fields,
                lambda: self._group_recipients(msg),
            )
        chain = session.data.get(_CHAIN)
        if chain is None or chain.done():
            members = self.users.known_members(p.group_id)
            if members is not None:
                mutes = self.users.known_mutes(p.group_id)
                if mutes is not None:
                    self._check_member(members, session, p.group_id)
                    if mutes:
                        _check_muted(mutes.get(msg.sender_id, 0), p.group_id)
                    return self._store_and_deliver(session, msg, members)
        queued = self._chain(session)
        return asyncio.ensure_future(
            self._send_slow(session, msg, chain, queued, self._group_recipients(msg))
        )

    def _send_lively(
        self,
        session: Session,
        msg: Message,
        reply_to: int,
        type_: str,
        fields: dict[str, Any],
        recipients: Callable[[], Coroutine[Any, Any, Sequence[int]]],
    ) -> asyncio.Future[SendAck]:
        """A reply, a typed message or one with mentions: checked (I/O) before it is
        queued, in the connection's order as the slow path keeps it."""

        async def checked() -> Sequence[int]:
            targets = await recipients()
            await self.life.prepare(session, msg, reply_to, type_, fields)
            return targets

        chain = session.data.get(_CHAIN)
        queued = self._chain(session)
        sending = self._send_slow(session, msg, chain, queued, checked())
        if type_ not in self.life.after_store:
            return asyncio.ensure_future(sending)

        async def sent() -> SendAck:
            ack = await sending
            await self.life.stored(msg, ack.msg_id)
            return ack

        return asyncio.ensure_future(sent())

    async def _group_recipients(self, msg: Message) -> Sequence[int]:
        # Cached members (no I/O) let a busy connection's sends leave the slow path.
        members = self.users.known_members(msg.to)
        if members is None:
            if await self.users.get_group(msg.to) is None:
                raise RequestError(codes.NOT_FOUND, f"no group {msg.to}")
            members = await self.users.group_members(msg.to)
        if msg.sender_id not in members:
            raise RequestError(codes.NOT_MEMBER, f"you are not in group {msg.to}")
        mutes = self.users.known_mutes(msg.to)
        if mutes is not None:
            _check_muted(mutes.get(msg.sender_id, 0), msg.to)
        else:
            me = await self.users.member(msg.to, msg.sender_id)
            _check_muted(me.muted_until if me else 0, msg.to)
        return members

    @staticmethod
    def _check_member(members: Sequence[int], session: Session, group_id: int) -> None:
        if session.user_id not in members:
            raise RequestError(codes.NOT_MEMBER, f"you are not in group {group_id}")

    def _chain(self, session: Session) -> asyncio.Future[None]:
        # Later sends of this connection wait until this one is queued for storing
        # (it has its id): their order is kept, without waiting for its commit.
        queued: asyncio.Future[None] = self.server.loop.create_future()
        session.data[_CHAIN] = queued
        return queued

    def _new_message(
        self, session: Session, kind: str, to: int, text: str, client_msg_id: str
    ) -> Message:
        assert session.user_id is not None
        # The id is given when the message is queued for storing (_store_and_deliver).
        return Message(
            0, kind, session.user_id, session.user_name or "", to, text, 0, client_msg_id
        )

    def _store_and_deliver(
        self,
        session: Session,
        msg: Message,
        recipients: Sequence[int],
        answer: Deferred | asyncio.Future[SendAck] | None = None,
    ) -> Deferred | asyncio.Future[SendAck]:
        """Queue ``msg`` for storing; once committed, push it and answer the SendAck.

        The answer is an :class:`Deferred` (the fast path: the SendAck is queued on
        the connection from the commit's callback), or the given future.
        """
        # Ids are issued in the order messages are queued, which is the order they are
        # committed and pushed: every recipient sees a conversation in id order.
        now_ms = int(time.time() * 1000)
        msg.id = self.ids.next(now_ms)
        msg.ts = now_ms
        if msg.op == EDIT:
            msg.edited_at = now_ms
        device = session.data.get(DEVICE)
        if device is not None:
            msg.device = device.device_id
        # Pushed to the recipients and the sender's other devices (what each device
        # misses follows from its cursors, so nothing is written per recipient).
        targets = recipients if msg.sender_id in recipients else [*recipients, msg.sender_id]
        out = Deferred() if answer is None else answer
        # A partial rather than a closure: fewer objects per message for the collector.
        self.messages.store_then(
            msg, targets, functools.partial(self._stored, out, session.id, device, msg, targets)
        )
        if device is not None:
            device.sends_started += 1  # after: a store that raised here answers nothing
        return out

    def _stored(
        self,
        out: Deferred | asyncio.Future[SendAck],
        session_id: int,
        device: DeviceState | None,
        sent: Message,
        targets: Sequence[int],
        result: tuple[Message, bool] | None,
        error: BaseException | None,
    ) -> None:
        """A message was committed (or failed): push it, then answer the sender once
        it has left for the other nodes (a node dying after the ack loses nothing)."""
        if device is not None:
            # The sending device has its own (a failed send fills no gap).
            if result is None:
                device.sent("", 0)
            else:
                device.sent(result[0].conversation_key, result[0].seq)
        if out.done():
            return
        if result is None:
            out.set_exception(error or RuntimeError("no result"))
            return
        msg, duplicate = result
        try:
            if not duplicate:
                self.server.metrics.message_stored(msg.kind)
            # A duplicate is a retry: its first try may have been stored by a node that
            # died before it answered or forwarded, so the stored message goes out again
            # (clients drop what they have by msg_id); unless the retry names another
            # conversation, which is no retry of it.
            if not duplicate or (msg.kind, msg.to) == (sent.kind, sent.to):
                self.connections.deliver(msg, targets, exclude_session=session_id)
            ack = SendAck(msg.id, msg.ts, msg.client_msg_id, duplicate, msg.seq)
        except Exception as exc:
            out.set_exception(exc)
            return
        self.connections.after_forward(functools.partial(_answer, out, ack))

    def on_ack(self, session: Session, p: Ack) -> Any:
        device: DeviceState | None = session.data.get(DEVICE)
        if not p.msg_ids or device is None:
            return _OK
        assert session.user_id is not None
        # Each conversation's cursor moves to the largest seq acked, but never past a
        # gap in what this connection was pushed; nor at all in one a re-sync has not
        # pushed again yet (what it has there is unknown until then).
        moves: dict[str, int] = {}
        pop = device.unacked.pop
        for msg_id in p.msg_ids:
            entry = pop(msg_id, None)
            if entry is not None:
                conv, seq = entry
                if moves.get(conv, 0) < seq:
                    moves[conv] = seq
        ahead = device.ahead
        if ahead:
            # A push is missing: this connection gets it again, unless it arrives
            # meanwhile (forwarded by another node, or the device's own in flight).
            gaps = [c for c in moves if c in ahead]
            if gaps:
                device.gap_at_ack(session, gaps)
        seqs = device.seqs
        for conv, seq in list(moves.items()):
            have = seqs.get(conv, 0)
            if have <= 0:
                del moves[conv]
            elif have < seq:
                moves[conv] = have
        if not moves:
            return _OK
        answer = Deferred()
        cursors = list(moves.items())
        user_id, name = session.user_id, session.user_name or ""

        def acked(f: asyncio.Future[None]) -> None:
            if f.cancelled():
                answer.set_exception(asyncio.CancelledError())
            elif (exc := f.exception()) is not None:
                answer.set_exception(exc)
            else:
                answer.set_result(_OK)
                self._delivered(device, user_id, name, cursors)

        aw = self.messages.ack(user_id, device.device_id, cursors)
        (aw if isinstance(aw, asyncio.Future) else asyncio.ensure_future(aw)).add_done_callback(
            acked
        )
        return answer

    def _delivered(
        self, device: DeviceState, user_id: int, name: str, cursors: list[tuple[str, int]]
    ) -> None:
        """Tell one-to-one peers their messages reached a device of the user."""
        receipted = device.receipted
        for conv, seq in cursors:
            pair = p2p_pair(conv)
            if pair is None or receipted.get(conv, 0) >= seq:
                continue
            receipted[conv] = seq
            peer = pair[1] if pair[0] == user_id else pair[0]
            if peer != user_id:
                # Not to a peer either one blocks (from the cache: no I/O on the ack path).
                blocks = self.users.known_blocks(user_id)
                if blocks is not None and blocks is not NO_BLOCKS and blocks.either(peer):
                    continue
                self.connections.deliver_event(Receipt("delivered", user_id, name, seq), [peer])

    async def _conversation_of(self, session: Session, peer_id: int, group_id: int) -> str:
        """The key of the session user's conversation named by a request."""
        assert session.user_id is not None
        if bool(peer_id) == bool(group_id):
            raise RequestError(codes.INVALID_PACKET, "name either peer_id or group_id")
        if group_id:
            members = await self.users.group_members(group_id)
            if session.user_id not in members and await self.users.get_group(group_id) is None:
                raise RequestError(codes.NOT_FOUND, f"no group {group_id}")
            self._check_member(members, session, group_id)
            return conversation("group", session.user_id, group_id)
        if self.users.known_user(peer_id) is None and await self.users.get_user(peer_id) is None:
            raise RequestError(codes.NOT_FOUND, f"no user {peer_id}")
        return conversation("p2p", session.user_id, peer_id)

    async def on_get_conversations(self, session: Session, p: GetConversations) -> ConversationList:
        assert session.user_id is not None
        limit = max(1, min(p.limit, self.settings.conversations_max_page))
        convs = await self.messages.conversations(session.user_id, max(0, p.before), limit + 1)
        keep = min(limit, self._fitting(_worst(c.last_message) + 6 * len(c.name) for c in convs))
        return ConversationList([c.to_dict() for c in convs[:keep]], len(convs) > keep)

    def _fitting(self, sizes: Iterable[int]) -> int:
        """How many entries of these worst-case ``sizes`` (:func:`_worst`; at least one)
        one answer can carry and still fit in a frame, with room for its other fields.
        A page is cut there, ``more`` set."""
        room = self.settings.max_frame_size - 1024
        n = 0
        for size in sizes:
            room -= size
            if room < 0:
                break
            n += 1
        return max(1, n)

    async def on_mark_read(self, session: Session, p: MarkRead) -> ReadState:
        assert session.user_id is not None
        user_id, name = session.user_id, session.user_name or ""
        conv = await self._conversation_of(session, p.peer_id, p.group_id)
        read_seq, last_seq, senders = await self.messages.mark_read(user_id, conv, max(0, p.seq))
        if senders and p.group_id:
            # Only members learn who read a group: not those who wrote there and left.
            members = set(await self.users.group_members(p.group_id))
            senders = [u for u in senders if u in members]
        if senders:
            # A block hides the blocker from the other one: receipts too.
            blocks = self.users.known_blocks(user_id)
            if blocks is None:
                blocks = await self.users.blocks(user_id)
            if blocks is not NO_BLOCKS:
                senders = [u for u in senders if not blocks.either(u)]
        # What is left counts messages, not the events between them.
        unread = await self.messages.unread(conv, read_seq) if last_seq > read_seq else 0
        state = ReadState(p.peer_id, p.group_id, read_seq, unread)
        # The user's other devices clear their count; the senders learn it was read.
        self.connections.deliver_event(state, [user_id], exclude_session=session.id)
        if senders:
            self.connections.deliver_event(
                Receipt("read", user_id, name, read_seq, p.group_id), senders
            )
        return state

    async def on_get_receipts(self, session: Session, p: GetReceipts) -> Receipts:
        await self._conversation_of(session, 0, p.group_id)
        have = await self.messages.receipts(p.group_id, p.seq)
        readers: list[dict[str, Any]] = []
        if p.who:
            users = await self.users.get_users(u for u, _ in have)
            readers = [
                {"id": u, "name": users[u].name if u in users else "", "read": r} for u, r in have
            ]
        return Receipts(p.group_id, p.seq, len(have), sum(1 for _, r in have if r), readers)

    async def on_history(self, session: Session, p: History) -> HistoryPage:
        assert session.user_id is not None
        if bool(p.peer_id) == bool(p.group_id):
            raise RequestError(codes.INVALID_PACKET, "name either peer_id or group_id")
        if p.group_id:
            members = await self.users.group_members(p.group_id)
            if session.user_id not in members and await self.users.get_group(p.group_id) is None:
                raise RequestError(codes.NOT_FOUND, f"no group {p.group_id}")
            self._check_member(members, session, p.group_id)
        elif (
            self.users.known_user(p.peer_id) is None
            and await self.users.get_user(p.peer_id) is None
        ):
            raise RequestError(codes.NOT_FOUND, f"no user {p.peer_id}")
        limit = max(1, min(p.limit, self.settings.history_max_page))
        # One more than the page: whether older messages exist, without a second query.
        msgs = await self.messages.history(
            session.user_id,
            p.peer_id,
            p.group_id,
            p.before,
            limit + 1,
            max(0, p.before_seq),
            max(0, p.after_seq),
        )
        keep = min(limit, self._fitting(_worst(m) for m in msgs))
        return HistoryPage([m.to_dict() for m in msgs[:keep]], len(msgs) > keep)

    # -- for the server API (bitchat.web.api): as a user, without a connection ------------

    async def send_as(
        self, sender_id: int, to: int, group_id: int, text: str, client_msg_id: str = ""
    ) -> SendAck:
        """Send a message as user ``sender_id`` (to user ``to`` or to group ``group_id``),
        checked, stored and delivered as a device's would be (its devices get it too)."""
        if bool(to) == bool(group_id):
            raise RequestError(codes.INVALID_PACKET, "name either to or group_id")
        self._check_text(text)
        limit = self.settings.max_client_msg_id_length
        if len(client_msg_id) > limit:
            raise RequestError(
                codes.INVALID_PACKET, f"a client_msg_id has at most {limit} characters"
            )
        sender = await self.users.get_user(sender_id)
        if sender is None:
            raise RequestError(codes.NOT_FOUND, f"no user {sender_id}")
        if await self.users.is_server_banned(sender_id):
            raise RequestError(codes.BANNED, f"user {sender_id} is banned from the server")
        kind, target = (GROUP, group_id) if group_id else (P2P, to)
        msg = Message(0, kind, sender_id, sender.name, target, text, 0, client_msg_id)
        # The checks a device's send gets: membership and mutes, users and blocks.
        recipients = await (self._group_recipients(msg) if group_id else self._p2p_recipients(msg))
        # As _store_and_deliver, with no connection: no device of the sender has it yet.
        now_ms = _now_ms()
        msg.id = self.ids.next(now_ms)
        msg.ts = now_ms
        targets = recipients if sender_id in recipients else [*recipients, sender_id]
        out: asyncio.Future[SendAck] = self.server.loop.create_future()
        self.messages.store_then(
            msg, targets, functools.partial(self._stored, out, 0, None, msg, targets)
        )
        return await out

    async def log_out_everywhere(self, user_id: int, code: str, message: str) -> int:
        """Revoke every token of the user's devices, then close each of the user's
        connections on every node (told why: an Error push ``code``); how many tokens."""
        revoked = await self.users.revoke_user_tokens(user_id)
        await self.connections.disconnect_user(user_id, code, message)
        return revoked

    async def set_banned(self, user_id: int, banned: bool) -> None:
        """Ban the user from the server (logins refused with ``banned``, every session
        closed, every token revoked), or lift the ban; ``not_found`` for no such user."""
        if not await self.users.set_banned(user_id, banned, _now_ms()):
            raise RequestError(codes.NOT_FOUND, f"no user {user_id}")
        if banned:
            await self.log_out_everywhere(
                user_id, codes.BANNED, "this account is banned from the server"
            )

    # -- groups -----------------------------------------------------------------------------

    async def on_create_group(self, session: Session, p: CreateGroup) -> GroupInfo:
        assert session.user_id is not None
        return _info(await self.create_group(session.user_id, p.name))

    async def create_group(self, owner_id: int, name: str) -> Group:
        """A new group of ``owner_id``, its name checked (as a CreateGroup's)."""
        name = name.strip()
        limit = self.settings.max_group_name_length
        if not 1 <= len(name) <= limit:
            raise RequestError(codes.INVALID_PACKET, f"a group name has 1 to {limit} characters")
        # The rules of _valid_name, but a space inside a group name is fine ("moon base");
        # str.isprintable() lets only the ASCII space through of the spaces.
        if not name.isprintable():
            raise RequestError(codes.INVALID_PACKET, "a group name has no control characters")
        await self.check_group_count(owner_id, 0)
        return await self.users.create_group(owner_id, name)

    async def check_group_count(self, user_id: int, joining: int) -> None:
        """``forbidden`` if the user is in ``max_groups_per_user`` groups (but ``joining``)."""
        limit = self.settings.max_groups_per_user
        groups = await self.users.user_groups(user_id)
        if len(groups) >= limit and all(g.id != joining for g in groups):
            raise RequestError(codes.FORBIDDEN, f"a user may be in at most {limit} groups")

    async def on_join_group(self, session: Session, p: JoinGroup) -> GroupInfo:
        assert session.user_id is not None
        g, pending = await self.moderation.join(session.user_id, p.group_id, p.invite)
        return _info(g, pending)

    async def seed_group_start(self, user_id: int, group_id: int) -> None:
        """The user joined the group: each of its connections here learns where the group
        starts for it, so a first push lost in transit shows as a gap (not taken as the
        start)."""
        conv = conversation("group", user_id, group_id)
        starts: dict[int, int | None] = {}  # per device: its sessions share its cursors
        try:
            for s in self.connections.local_sessions(user_id):
                device: DeviceState | None = s.data.get(DEVICE)
                if device is None or conv in device.seqs:
                    continue
                if device.device_id not in starts:
                    cursors = await self.messages.cursors(user_id, device.device_id)
                    starts[device.device_id] = cursors.get(conv)
                at = starts[device.device_id]
                if at is not None:
                    device.seqs.setdefault(conv, at)
        except RequestError as exc:
            # The join is in: without the seed a first push is taken as the start there.
            log.warning("cannot read where group %d starts: %s", group_id, exc.message)

    async def on_leave_group(self, session: Session, p: LeaveGroup) -> Ok:
        assert session.user_id is not None
        user_id = session.user_id
        await self.moderation.remove(p.group_id, user_id, "left")
        await self.moderation.tell(p.group_id, "member_removed", user_id, user_id, also=[user_id])
        return Ok()

    async def on_my_groups(self, session: Session, p: MyGroups) -> GroupList:
        assert session.user_id is not None
        groups = await self.users.user_groups(session.user_id)
        return GroupList([g.to_dict() for g in groups])

    async def on_group_members(self, session: Session, p: GroupMembers) -> MemberList:
        assert session.user_id is not None
        info = await self.users.members_info(p.group_id)
        if not any(m.user_id == session.user_id for m in info):
            if await self.users.get_group(p.group_id) is None:
                raise RequestError(codes.NOT_FOUND, f"no group {p.group_id}")
            raise RequestError(codes.NOT_MEMBER, f"you are not in group {p.group_id}")
        ids = [m.user_id for m in info]
        users = await self.users.get_users(ids)
        online = set(await self.connections.online_users())
        # Those who block the asker show offline to them, without a last seen.
        hidden = (await self.users.blocks(session.user_id)).by
        seen = await self.users.last_seen(
            [u for u in ids if u not in online and u not in hidden], session.user_id
        )
        return MemberList(
            p.group_id,
            [
                {
                    "id": m.user_id,
                    "name": users[m.user_id].name if m.user_id in users else "",
                    "online": m.user_id in online and m.user_id not in hidden,
                    "last_seen": None if m.user_id in hidden else seen.get(m.user_id),
                    "role": m.role,
                    "muted_until": m.muted_until,
                }
                for m in info
            ],
        )

    # -- moderation (the rules: bitchat.im.moderation) ------------------------------------------

    async def on_set_role(self, session: Session, p: SetRole) -> Ok:
        assert session.user_id is not None
        await self.moderation.set_role(session.user_id, p.group_id, p.user_id, p.role)
        return Ok()

    async def on_kick(self, session: Session, p: KickMember) -> Ok:
        assert session.user_id is not None
        await self.moderation.kick(session.user_id, p.group_id, p.user_id)
        return Ok()

    async def on_ban(self, session: Session, p: BanMember) -> Ok:
        assert session.user_id is not None
        await self.moderation.ban(session.user_id, p.group_id, p.user_id, p.ban)
        return Ok()

    async def on_mute(self, session: Session, p: MuteMember) -> Ok:
        assert session.user_id is not None
        await self.moderation.mute(session.user_id, p.group_id, p.user_id, p.seconds)
        return Ok()

    async def on_set_group_options(self, session: Session, p: SetGroupOptions) -> GroupInfo:
        assert session.user_id is not None
        g = await self.moderation.set_options(
            session.user_id, p.group_id, p.invite_only, p.history_visible
        )
        member = await self.users.member(p.group_id, session.user_id)
        return _info(dataclasses.replace(g, role=member.role if member else ""))

    async def on_create_invite(self, session: Session, p: CreateInvite) -> InviteInfo:
        assert session.user_id is not None
        inv = await self.moderation.create_invite(session.user_id, p.group_id, p.ttl, p.max_uses)
        return InviteInfo(inv.group_id, inv.code, inv.expires_at, inv.max_uses)

    async def on_add_member(self, session: Session, p: AddMember) -> Ok:
        assert session.user_id is not None
        await self.moderation.add_member(session.user_id, p.group_id, p.user_id)
        return Ok()

    async def on_get_join_requests(self, session: Session, p: GetJoinRequests) -> JoinRequestList:
        assert session.user_id is not None
        return JoinRequestList(
            p.group_id, await self.moderation.join_requests(session.user_id, p.group_id)
        )

    async def on_answer_join_request(self, session: Session, p: AnswerJoinRequest) -> Ok:
        assert session.user_id is not None
        await self.moderation.answer_request(session.user_id, p.group_id, p.user_id, p.approve)
        return Ok()

    async def on_block(self, session: Session, p: Block) -> Ok:
        assert session.user_id is not None
        await self.moderation.block(session.user_id, p.user_id, p.block)
        return Ok()

    async def on_get_blocked(self, session: Session, p: GetBlocked) -> BlockedList:
        assert session.user_id is not None
        users = await self.moderation.blocked(session.user_id)
        return BlockedList([{"id": u.id, "name": u.name} for u in users])


def _info(g: Group, pending: bool = False) -> GroupInfo:
    return GroupInfo(
        g.id, g.name, g.owner_id, g.members, g.invite_only, g.history_visible, g.role, pending
    )


def _check_muted(until: int, group_id: int) -> None:
    """``muted`` while the mute lasts (the caller found the member among the muted)."""
    if until and until > time.time() * 1000:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until / 1000))
        raise RequestError(codes.MUTED, f"you are muted in group {group_id} until {when}")


def _blocked(mine: frozenset[int], other: int) -> RequestError:
    if other in mine:
        return RequestError(codes.BLOCKED, "you blocked this user")
    return RequestError(codes.BLOCKED, "you cannot message this user")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _answer(out: Deferred | asyncio.Future[SendAck], ack: SendAck) -> None:
    if not out.done():  # a future is cancelled when its sender went away
        out.set_result(ack)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _worst(m: Message | None) -> int:
    """The most bytes a message (or a conversation's other fields) takes once encoded:
    each character of its strings at its worst (a control character is six bytes of
    JSON), and room for the keys and numbers."""
    if m is None:
        return 512
    return 6 * (len(m.text) + len(m.sender_name) + len(m.client_msg_id)) + 1024


def push_message_each(messages: Sequence[Message], session: Session) -> None:
    """Push messages to one session, bypassing the hold of its own sync."""
    held = session.data.pop(SYNCING, None)
    try:
        for m in messages:
            push_message(m, (session,))
    finally:
        if held is not None:
            session.data[SYNCING] = held


class Backlog:
    """What a device misses, read conversation by conversation and merged by id.

    Each conversation past the device's position there is read in pages in seq
    order (an index range each); the pages are merged by message id, so the
    device is pushed everything in id order, and within a conversation in seq
    order, without one query sorting the whole backlog for every page.

    At most about ``read_ahead`` messages are held read and not yet handed out,
    whatever the number of conversations: a page is ``read_ahead`` shared among
    the conversations with messages left (at least 1, at most ``page``).
    """

    def __init__(
        self,
        messages: MessageCenter,
        positions: dict[str, tuple[int, int]],
        page: int,
        read_ahead: int = 0,
    ) -> None:
        self.messages = messages
        self.page = page
        self.read_ahead = read_ahead or 4 * page
        self.after = {conv: at for conv, (at, last) in positions.items() if last > at}
        self.buffers: dict[str, collections.deque[Message]] = {}
        self.heap: list[tuple[int, str]] = []
        self.started = False
        # Conversations with messages left (to read, or read and not handed out): the
        # read-ahead is shared among them, so what is held stays within it.
        self.left = len(self.after)

    async def _fill(self, conv: str) -> None:
        size = max(1, min(self.page, self.read_ahead // max(1, self.left)))
        rows = await self.messages.messages_after(conv, self.after[conv], size)
        if len(rows) < size:
            del self.after[conv]  # read to its end
        elif rows:
            self.after[conv] = rows[-1].seq
        if rows:
            self.buffers.setdefault(conv, collections.deque()).extend(rows)
            heapq.heappush(self.heap, (rows[0].id, conv))
        else:
            self.buffers.pop(conv, None)
            self.left -= 1

    async def next_batch(self) -> list[Message]:
        """The next ``page`` messages in id order (fewer at the end)."""
        if not self.started:
            self.started = True
            for conv in list(self.after):
                await self._fill(conv)
        out: list[Message] = []
        while self.heap and len(out) < self.page:
            _, conv = heapq.heappop(self.heap)
            buffer = self.buffers[conv]
            out.append(buffer.popleft())
            if buffer:
                heapq.heappush(self.heap, (buffer[0].id, conv))
            elif conv in self.after:
                await self._fill(conv)
            else:
                del self.buffers[conv]
                self.left -= 1
        return out
