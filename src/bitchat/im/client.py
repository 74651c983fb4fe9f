"""The IM client functions (the seed's Funcs) over :class:`bitchat.Client`.

::

    im = IMClient("127.0.0.1", 8864, device="laptop")
    await im.connect()
    im.on_message(lambda m: print(m.sender_name, m.text))
    me = await im.login("houyi", "123456")
    await im.send_p2p(2, "hello, gris")

Incoming messages are acked automatically (in one Ack per loop iteration) and
deduplicated, so a message redelivered after a reconnect is seen once. A message
that comes while nothing consumes them yet (no :meth:`~IMClient.on_message`
callback, no :meth:`~IMClient.messages` iterator; say, those the server pushes
right after a login that comes before ``on_message``) is kept, not acked, and
handed to the first consumer registered, then acked: at most ``dedupe_window``
of them, the first that came; those beyond are not kept, nor acked (the next login
pushes them again, unless a later one of their conversation is acked first;
:meth:`~IMClient.history` has them). After a
reconnect the client logs in again with its token and its device, and the
server pushes what this device missed (unless the server closed the connection
with ``logged_out`` or ``banned``: a forced logout sticks). Sends carry a client message id and are
retried with it when the connection drops, so a retry is never stored twice.

A device is the client's stable id on the server (``IMClient(device=...)`` or
``login(..., device=...)``): the server keeps, per device, how far it has each
conversation. Without one, the server names a new device at a password login;
:attr:`IMClient.device` holds it after the login: keep it and pass it next time,
or every run is a new device that starts at the user's read position.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from bitchat.client import Client, Resolver, State
from bitchat.errors import ConnectionClosed, RequestError, RequestTimeout, UsageError, codes
from bitchat.im.centers import User
from bitchat.im.packets import (
    EDIT,
    REACT,
    RECALL,
    TEXT,
    UNREACT,
    Ack,
    AddMember,
    AnswerJoinRequest,
    BanMember,
    Block,
    BlockedList,
    ChatMessage,
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
    GroupEvent,
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
    OnlineUsers,
    Presence,
    React,
    ReactionList,
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
    TypingEvent,
    UserInfo,
    Versions,
)
from bitchat.protocol.packets import Packet
from bitchat.settings import Settings

log = logging.getLogger("bitchat.im.client")

_STAY_OUT = (codes.LOGGED_OUT, codes.BANNED)
"""Why the server closes a connection after which the client does not log in again."""

MessageCallback = Callable[[ChatMessage], Any]
ReloginCallback = Callable[[LoginOk | None, Exception | None], Any]


def new_client_msg_id() -> str:
    """A client message id: time-ordered (hex nanoseconds) with a random tail.

    Ordered ids land at the end of the server's dedup index instead of all over
    it, which keeps its inserts cheap; the random tail keeps two devices apart.
    """
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


class IMClient:
    """An IM user's connection: login, online list, chat, groups, history, the
    conversation list, read positions and receipts."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8864,
        settings: Settings | None = None,
        *,
        serializer: int | str = "json",
        resolve: Resolver | None = None,
        auto_ack: bool = True,
        dedupe_window: int = 10_000,
        client: Client | None = None,
        device: str = "",
        **kw: Any,
    ) -> None:
        self.client = client or Client(
            host, port, settings, serializer=serializer, resolve=resolve, **kw
        )
        self.auto_ack = auto_ack
        self.user: User | None = None
        self.token: str | None = None
        self.device = device
        """This client's device id, sent at every login; after a login, the one the
        server says this session is (:attr:`LoginOk.device`)."""
        self._password: tuple[str, str] | None = None
        self._callbacks: list[MessageCallback] = []
        self._event_callbacks: dict[str, list[MessageCallback]] = {}
        self._queues: list[asyncio.Queue[ChatMessage]] = []
        self._seen: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._dedupe_window = dedupe_window
        # Messages that came while nothing consumed them, for the first consumer.
        self._kept: collections.OrderedDict[int, ChatMessage] = collections.OrderedDict()
        self._to_ack: list[int] = []
        self._ack_scheduled = False
        self._relogin_callbacks: list[ReloginCallback] = []
        self.client.on(ChatMessage, self._on_chat)
        self.client.on_connected.append(self._relogin)

    # -- connection ---------------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> None:
        await self.client.connect(timeout)

    async def close(self) -> None:
        await self.client.close()
        for q in self._queues:
            q.put_nowait(_CLOSED)

    async def __aenter__(self) -> IMClient:
        await self.connect(self.client.settings.connect_timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def on_relogin(self, callback: ReloginCallback) -> None:
        """Call ``callback(login_ok, None)`` after every automatic login that follows a
        reconnect, or ``callback(None, error)`` when it failed."""
        self._relogin_callbacks.append(callback)

    async def _relogin(self, client: Client) -> None:
        if self.user is None:
            return
        ok: LoginOk | None = None
        error: RequestError | None = None
        reason = client.close_reason  # why the last connection ended, if the server said
        try:
            if reason is not None and reason.code in _STAY_OUT:
                # Logged out (or banned) by the server: a forced logout sticks.
                self.token = self._password = None
                raise reason
            if self.token:
                try:
                    ok = await self._login(Login(token=self.token, device=self.device))
                except RequestError as exc:
                    if self._password is None:
                        raise
                    log.info("token refused (%s); logging in with the password", exc.code)
            if ok is None and self._password is not None:
                name, password = self._password
                ok = await self._login(Login(name, password, device=self.device))
        except RequestError as exc:
            # A warning: the on_relogin callbacks report it (the CLI prints one line).
            log.warning("logging in again after the reconnect failed: %s", exc)
            error = exc
        for cb in list(self._relogin_callbacks):
            try:
                cb(ok, error)
            except Exception:
                log.exception("relogin callback failed")

    async def _login(self, packet: Login) -> LoginOk:
        ok = await self.client.request(packet)
        assert isinstance(ok, LoginOk)
        self.user = User(ok.user_id, ok.name)
        self.token = ok.token
        if ok.device:  # an older server names none: keep ours
            self.device = ok.device
        return ok

    # -- the seed's Funcs ---------------------------------------------------------------------

    async def register(self, name: str, password: str) -> User:
        info = await self.client.request(Register(name, password))
        assert isinstance(info, UserInfo)
        return User(info.user_id, info.name)

    async def login(
        self,
        name: str = "",
        password: str = "",
        *,
        token: str = "",
        jwt: str = "",
        device: str | None = None,
    ) -> LoginOk:
        """Log in (``-lo name password``), or with a JWT the product's backend signed
        (``jwt=``); raises RequestError ``login_failed``. After a reconnect the client
        logs in again with the token this login got (a JWT may have expired by then).

        ``device`` (default: :attr:`device`) is this client's device id; empty, the
        server names one (a password login) or takes the token's. Either way
        :attr:`device` is then the session's device, used at every login after a
        reconnect."""
        if device is not None:
            self.device = device
        ok = await self._login(Login(name, password, token, self.device, jwt))
        if name:
            self._password = (name, password)
        return ok

    async def logout(self) -> None:
        await self.client.request(Logout())
        self.user = None
        self.token = None
        self._password = None

    async def online_users(self, watch: bool = False) -> list[User]:
        """Everyone online (``-lu``); ``watch`` also subscribes to Presence pushes."""
        resp = await self.client.request(ListOnline(watch))
        assert isinstance(resp, OnlineUsers)
        return [User(u["id"], u["name"]) for u in resp.users]

    async def send_p2p(
        self,
        to: int,
        text: str,
        client_msg_id: str | None = None,
        retries: int = 3,
        timeout: float | None = None,
        *,
        reply_to: int = 0,
        type: str = TEXT,
        fields: dict[str, Any] | None = None,
    ) -> SendAck:
        """Send a one-to-one message (``-pc id message``); returns once it is stored.

        A connection lost meanwhile is waited for and the message resent with the
        same ``client_msg_id`` (stored once), up to ``retries`` times within
        ``timeout`` (default ``request_timeout``); then the error is raised:
        :class:`RequestTimeout` or :class:`ConnectionClosed`.

        ``reply_to`` quotes a message of the conversation; ``type`` and ``fields``
        make a typed message ("file", "image" or one the server registered), ``text``
        then being the fallback older clients show.
        """
        cid = client_msg_id or new_client_msg_id()
        return await self._send(
            SendP2P(to, text, cid, reply_to, type, fields or {}), retries, timeout
        )

    async def send_group(
        self,
        group_id: int,
        text: str,
        client_msg_id: str | None = None,
        retries: int = 3,
        timeout: float | None = None,
        *,
        reply_to: int = 0,
        type: str = TEXT,
        fields: dict[str, Any] | None = None,
    ) -> SendAck:
        """Send to a group (``-gc id message``), as :meth:`send_p2p`; ``@name`` words
        naming members mention them."""
        cid = client_msg_id or new_client_msg_id()
        return await self._send(
            SendGroup(group_id, text, cid, reply_to, type, fields or {}), retries, timeout
        )

    # -- messages that live -------------------------------------------------------------------

    async def edit(self, msg_id: int, text: str) -> SendAck:
        """Replace the text of your message ``msg_id`` (``-edit``): the edit event's ack."""
        return await self._event(EditMessage(msg_id, text))

    async def recall(self, msg_id: int) -> SendAck:
        """Take back a message (``-recall``): yours, or any of a group you administer."""
        return await self._event(RecallMessage(msg_id))

    async def react(self, msg_id: int, emoji: str) -> SendAck:
        """Add an emoji reaction to a message of your conversations (``-react``)."""
        return await self._event(React(msg_id, emoji, True))

    async def unreact(self, msg_id: int, emoji: str) -> SendAck:
        """Remove your emoji reaction (``-unreact``)."""
        return await self._event(React(msg_id, emoji, False))

    async def _event(self, packet: Packet) -> SendAck:
        ack = await self.client.request(packet)
        assert isinstance(ack, SendAck)
        return ack

    async def delete_for_me(self, msg_ids: list[int]) -> None:
        """Hide messages from all your devices (``-delete``); others keep them."""
        await self.client.request(DeleteForMe(msg_ids))

    async def versions(self, msg_id: int) -> list[dict[str, Any]]:
        """The earlier texts of your own message, oldest first: ``{"text", "ts"}``."""
        resp = await self.client.request(GetVersions(msg_id))
        assert isinstance(resp, Versions)
        return resp.versions

    async def reactions(self, msg_id: int) -> list[dict[str, Any]]:
        """Who reacted with what: ``{"emoji", "users": [{"id", "name"}]}``."""
        resp = await self.client.request(GetReactions(msg_id))
        assert isinstance(resp, ReactionList)
        return resp.reactions

    async def _send(self, packet: Packet, retries: int, timeout: float | None) -> SendAck:
        """Send until stored: a connection lost before the answer came is waited out
        (the client reconnects and logs in again) and the same packet resent, at
        most ``retries`` times, all within ``timeout`` (``request_timeout``)."""
        client = self.client
        timeout = client.settings.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt = 0
        while True:
            try:
                ack = await client.request(packet, max(deadline - loop.time(), 0.0))
            except ConnectionClosed:
                # The same client_msg_id makes the resend harmless if it was stored. The
                # next request waits for the reconnect: resends are spaced by it.
                attempt += 1
                if attempt > retries or client.state is State.CLOSED:
                    raise
                if loop.time() >= deadline:
                    raise self._not_stored(packet, timeout) from None
                continue
            except RequestTimeout:
                raise self._not_stored(packet, timeout) from None
            assert isinstance(ack, SendAck)
            return ack

    def _not_stored(self, packet: Packet, timeout: float) -> RequestTimeout:
        why = "no answer" if self.client.connected else "not connected"
        return RequestTimeout(f"{type(packet).__name__} not stored within {timeout:.1f}s ({why})")

    async def typing(self, to: int = 0, group_id: int = 0, typing: bool = True) -> None:
        """Tell the other side of a conversation (user ``to`` or ``group_id``) that you
        are typing, or stopped (``typing=False``): one-way and best effort.

        A "typing" lasts the server's ``typing_timeout`` (about 5 s): repeat it every
        few seconds while the user types. A message sent there also means stopped.
        A refusal (no such user, not a member) comes back as an Error push, not raised.
        """
        if bool(to) == bool(group_id):
            raise UsageError("typing() takes either to or group_id")
        await self.client.send(Typing(to, group_id, typing))

    async def create_group(self, name: str) -> GroupInfo:
        g = await self.client.request(CreateGroup(name))
        assert isinstance(g, GroupInfo)
        return g

    async def join_group(self, group_id: int, invite: str = "") -> GroupInfo:
        """Join a group (with an ``invite`` code for an invite-only one). Without an
        invite, an invite-only group records a join request: the answer has
        ``pending`` set, and an admin approves it or not."""
        g = await self.client.request(JoinGroup(group_id, invite))
        assert isinstance(g, GroupInfo)
        return g

    async def leave_group(self, group_id: int) -> None:
        await self.client.request(LeaveGroup(group_id))

    async def my_groups(self) -> list[dict[str, Any]]:
        resp = await self.client.request(MyGroups())
        assert isinstance(resp, GroupList)
        return resp.groups

    async def set_show_last_seen(self, on: bool) -> None:
        """Whether others see when this user was last seen (member lists, Presence)."""
        await self.client.request(SetPrivacy(on))

    async def group_members(self, group_id: int) -> list[dict[str, Any]]:
        """Each ``{"id", "name", "online", "last_seen", "role", "muted_until"}``;
        ``last_seen`` is Unix ms for an offline member who shows it, else None;
        ``muted_until`` Unix ms (0: not muted). Members only."""
        resp = await self.client.request(GroupMembers(group_id))
        assert isinstance(resp, MemberList)
        return resp.members

    # -- moderation ---------------------------------------------------------------------------

    async def set_role(self, group_id: int, user_id: int, role: str) -> None:
        """The owner makes a member "admin" or "member"; "owner" hands the group over."""
        await self.client.request(SetRole(group_id, user_id, role))

    async def kick(self, group_id: int, user_id: int) -> None:
        """Remove a member (who may join again); admins and the owner."""
        await self.client.request(KickMember(group_id, user_id))

    async def ban(self, group_id: int, user_id: int, ban: bool = True) -> None:
        """Ban a user from the group (removed if a member), or lift it (``ban=False``)."""
        await self.client.request(BanMember(group_id, user_id, ban))

    async def mute(self, group_id: int, user_id: int, seconds: int) -> None:
        """Mute a member for ``seconds`` (0 unmutes): their group messages are refused."""
        await self.client.request(MuteMember(group_id, user_id, seconds))

    async def set_group_options(
        self,
        group_id: int,
        invite_only: bool | None = None,
        history_visible: bool | None = None,
    ) -> GroupInfo:
        """Change a group's options (None: unchanged); admins and the owner."""
        g = await self.client.request(SetGroupOptions(group_id, invite_only, history_visible))
        assert isinstance(g, GroupInfo)
        return g

    async def create_invite(self, group_id: int, ttl: int = 0, max_uses: int = 0) -> InviteInfo:
        """An invite code for :meth:`join_group` (``ttl`` seconds, 0: the server's
        default; ``max_uses`` 0: unlimited)."""
        resp = await self.client.request(CreateInvite(group_id, ttl, max_uses))
        assert isinstance(resp, InviteInfo)
        return resp

    async def add_member(self, group_id: int, user_id: int) -> None:
        """Add a user to the group directly."""
        await self.client.request(AddMember(group_id, user_id))

    async def join_requests(self, group_id: int) -> list[dict[str, Any]]:
        """The waiting join requests: each ``{"user_id", "name", "ts"}``, oldest first."""
        resp = await self.client.request(GetJoinRequests(group_id))
        assert isinstance(resp, JoinRequestList)
        return resp.requests

    async def answer_join_request(self, group_id: int, user_id: int, approve: bool) -> None:
        await self.client.request(AnswerJoinRequest(group_id, user_id, approve))

    async def block(self, user_id: int, block: bool = True) -> None:
        """Block a user (``block=False`` unblocks): no messages either way, and they see
        you offline."""
        await self.client.request(Block(user_id, block))

    async def blocked(self) -> list[User]:
        """The users you block, by id."""
        resp = await self.client.request(GetBlocked())
        assert isinstance(resp, BlockedList)
        return [User(u["id"], u["name"]) for u in resp.users]

    async def history(
        self,
        peer_id: int = 0,
        group_id: int = 0,
        before: int = 0,
        limit: int = 50,
        *,
        before_seq: int = 0,
        after_seq: int = 0,
    ) -> HistoryPage:
        """A page of a conversation, newest first; page on with ``before=last id`` or
        ``before_seq=last seq``. With ``after_seq``, the messages after it, oldest first."""
        if bool(peer_id) == bool(group_id):
            raise UsageError("history() takes either peer_id or group_id")
        resp = await self.client.request(
            History(peer_id, group_id, before, limit, before_seq, after_seq)
        )
        assert isinstance(resp, HistoryPage)
        return resp

    # -- conversations, read state, receipts --------------------------------------------------

    async def conversations(self, limit: int = 50, before: int = 0) -> ConversationList:
        """A page of this user's conversations, most recent activity first (the server
        caps ``limit`` at its ``conversations_max_page``); page on with ``before`` =
        the last one's ``activity`` while ``more``. Each is a dict: ``kind``,
        ``peer_id`` / ``group_id``, ``name``, ``last_seq``, ``read_seq``, ``unread``,
        ``peer_read_seq``, ``peer_delivered_seq``, ``activity``, ``last_message``."""
        resp = await self.client.request(GetConversations(limit, before))
        assert isinstance(resp, ConversationList)
        return resp

    async def all_conversations(self, page: int = 50) -> AsyncIterator[dict[str, Any]]:
        """Every conversation, most recent first, asked for ``page`` at a time."""
        before = 0
        while True:
            resp = await self.conversations(page, before)
            for c in resp.conversations:
                yield c
            if not resp.more or not resp.conversations:
                return
            before = resp.conversations[-1]["activity"]

    async def mark_read(self, peer_id: int = 0, group_id: int = 0, seq: int = 0) -> ReadState:
        """The user has read the conversation with ``peer_id`` (or the group
        ``group_id``) up to ``seq`` (0: its latest message). Never moves back: the
        answer has the read position now and what is left unread. The user's other
        sessions get it as a push (:meth:`on_read_state`), the senders a
        :class:`Receipt`. Nothing marks read unless asked."""
        if bool(peer_id) == bool(group_id):
            raise UsageError("mark_read() takes either peer_id or group_id")
        resp = await self.client.request(MarkRead(peer_id, group_id, seq))
        assert isinstance(resp, ReadState)
        return resp

    async def receipts(self, group_id: int, seq: int, who: bool = False) -> Receipts:
        """How many members of the group have message ``seq`` on a device
        (``delivered``) and have read it (``read``), its sender not counted; with
        ``who``, ``readers`` lists each ``{"id", "name", "read"}``."""
        resp = await self.client.request(GetReceipts(group_id, seq, who))
        assert isinstance(resp, Receipts)
        return resp

    # -- files --------------------------------------------------------------------------------

    def _files_url(self) -> tuple[str, str]:
        from bitchat.im import files_client

        if self.token is None:
            raise UsageError("log in first: files are sent with the login token")
        c = self.client
        return files_client.base_url(c.host, c.port, c.ssl), self.token

    async def upload_file(self, path: str, content_type: str | None = None) -> dict[str, Any]:
        """Upload the file at ``path`` (streamed from disk); its info: ``file_id``,
        ``name``, ``size``, ``content_type``, ``width``, ``height``, ``thumbnail``.
        The type is guessed from the name unless given. Raises RequestError (its code:
        ``body_too_large``, ``quota_exceeded``, ``bad_content_type``, ...)."""
        from bitchat.im import files_client

        url, token = self._files_url()
        return await files_client.upload(
            url, token, path, content_type=content_type, tls=self.client.ssl
        )

    async def send_file(
        self,
        path: str,
        to: int = 0,
        group_id: int = 0,
        *,
        text: str = "",
        content_type: str | None = None,
    ) -> tuple[SendAck, dict[str, Any]]:
        """Upload the file at ``path`` and send a message of type "image" (an image
        the server could read) or "file" referring to it, to user ``to`` or group
        ``group_id``; the message's ack and the file's info. ``text`` is the fallback
        clients that do not know the type show (default: ``[file] name (size bytes)``)."""
        from bitchat.im import files_client

        if bool(to) == bool(group_id):
            raise UsageError("send_file() takes either to or group_id")
        info = await self.upload_file(path, content_type)
        kind, fields = files_client.message_fields(info)
        text = text or f"[{kind}] {info['name']} ({info['size']} bytes)"
        cmid = new_client_msg_id()
        packet: Packet = (
            SendGroup(group_id, text, cmid, type=kind, fields=fields)
            if group_id
            else SendP2P(to, text, cmid, type=kind, fields=fields)
        )
        return await self._send(packet, 3, None), info

    async def download_file(
        self, file_id: str, folder: str = ".", *, thumbnail: bool = False
    ) -> str:
        """Save a file (or its thumbnail) in ``folder`` under its own name (streamed);
        the path. Raises RequestError (``forbidden``, ``not_found``)."""
        from bitchat.im import files_client

        url, token = self._files_url()
        return await files_client.download(
            url, token, file_id, folder, thumbnail=thumbnail, tls=self.client.ssl
        )

    # -- incoming -----------------------------------------------------------------------------

    def on_message(self, callback: MessageCallback) -> None:
        """Call ``callback(ChatMessage)`` for every new incoming message.

        The first consumer (this or :meth:`messages`) is first handed, at once,
        the messages that came before any consumer (those pushed at a login that
        came first), oldest first; they are acked then."""
        self._callbacks.append(callback)
        self._hand_kept()

    def on_presence(self, callback: Callable[[Presence], Any]) -> None:
        """Call ``callback(Presence)`` for each presence push (``online_users(watch=True)``
        asks for them); a user going offline comes with ``last_seen`` (0: hidden)."""
        self.client.on(Presence, callback)

    def on_typing(self, callback: Callable[[TypingEvent], Any]) -> None:
        """Call ``callback(TypingEvent)`` when someone starts or stops typing to you or
        in one of your groups. A ``typing=True`` is over after its ``expires_in``
        seconds unless repeated, or when a message from that user arrives there."""
        self.client.on(TypingEvent, callback)

    def on_receipt(self, callback: Callable[[Receipt], Any]) -> None:
        """Call ``callback(Receipt)`` when someone has your messages on a device
        (``kind`` "delivered", one-to-one only) or has read them (``kind`` "read"),
        up to ``seq``: one-to-one (``group_id`` 0; the conversation with
        ``user_id``) or in ``group_id``. Best effort; :meth:`conversations` and
        :meth:`receipts` have the stored state."""
        self.client.on(Receipt, callback)

    def on_group_event(self, callback: Callable[[GroupEvent], Any]) -> None:
        """Call ``callback(GroupEvent)`` when something changes in one of your groups
        (a member added, removed, kicked, banned, muted, a role, the options, a join
        request for an admin), or to you in a group (kicked, banned)."""
        self.client.on(GroupEvent, callback)

    def on_edit(self, callback: MessageCallback) -> None:
        """Call ``callback(ChatMessage)`` for each edit event (``op`` "edit"): ``target``
        is the message, ``text`` its new text, ``edited_at`` when. Events are not
        handed to :meth:`on_message` (they are acked like messages)."""
        self._event_callbacks.setdefault(EDIT, []).append(callback)

    def on_recall(self, callback: MessageCallback) -> None:
        """Call ``callback(ChatMessage)`` for each recall (``op`` "recall", ``target``)."""
        self._event_callbacks.setdefault(RECALL, []).append(callback)

    def on_reaction(self, callback: MessageCallback) -> None:
        """Call ``callback(ChatMessage)`` for each reaction added (``op`` "react") or
        removed ("unreact"): ``sender_id`` reacted to ``target`` with ``emoji``."""
        self._event_callbacks.setdefault(REACT, []).append(callback)
        self._event_callbacks.setdefault(UNREACT, []).append(callback)

    def on_hidden(self, callback: Callable[[Hidden], Any]) -> None:
        """Call ``callback(Hidden)`` when messages were deleted for this user (on another
        device, or before this login)."""
        self.client.on(Hidden, callback)

    def on_read_state(self, callback: Callable[[ReadState], Any]) -> None:
        """Call ``callback(ReadState)`` when another session of this user marked a
        conversation read (this session's own :meth:`mark_read` returns it)."""
        self.client.on(ReadState, callback)

    async def messages(self) -> AsyncIterator[ChatMessage]:
        """Iterate over incoming messages until the client closes.

        The first consumer (this or :meth:`on_message`) starts with the messages
        that came before any consumer, oldest first (see :meth:`on_message`); the
        iterator is one from its first ``__anext__``."""
        q: asyncio.Queue[ChatMessage] = asyncio.Queue()
        self._queues.append(q)
        self._hand_kept()
        try:
            while True:
                m = await q.get()
                if m is _CLOSED:
                    return
                yield m
        finally:
            self._queues.remove(q)

    def _on_chat(self, m: ChatMessage) -> None:
        if m.msg_id in self._kept:
            return  # pushed again while kept: still unacked, handed once
        nobody = not self._callbacks and not self._queues
        if m.op and self._event_callbacks.get(m.op):
            nobody = False  # an event is handed to its own callbacks
        if m.msg_id not in self._seen and nobody:
            # Nobody to hand it to yet: kept unacked for the first consumer. Beyond the
            # window one is not kept (the memory is bounded), nor acked: the oldest are
            # kept, since acking a newer one would move the cursor past those dropped.
            if len(self._kept) < self._dedupe_window:
                self._kept[m.msg_id] = m
            return
        self._deliver(m)

    def _hand_kept(self) -> None:
        kept, self._kept = self._kept, collections.OrderedDict()
        for m in kept.values():
            self._deliver(m)

    def _deliver(self, m: ChatMessage) -> None:
        # Own messages too: one sent from another device comes here to be acked, or
        # the server pushes it again at this device's next login.
        if self.auto_ack:
            self._ack_later(m.msg_id)
        if m.msg_id in self._seen:
            return
        self._seen[m.msg_id] = None
        if len(self._seen) > self._dedupe_window:
            self._seen.popitem(last=False)
        callbacks = self._event_callbacks.get(m.op, ()) if m.op else self._callbacks
        for cb in callbacks:
            try:
                r = cb(m)
                if asyncio.iscoroutine(r):
                    asyncio.get_running_loop().create_task(r)
            except Exception:
                log.exception("message callback failed")
        if m.op:
            return  # events go to their own callbacks only
        for q in self._queues:
            q.put_nowait(m)

    def _ack_later(self, msg_id: int) -> None:
        self._to_ack.append(msg_id)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        ids, self._to_ack = self._to_ack, []
        step = self.client.settings.max_ack_ids  # the server refuses longer Acks
        with contextlib.suppress(ConnectionClosed):  # unacked ones come again at next login
            for start in range(0, len(ids), step):
                self.client.send_nowait(Ack(ids[start : start + step]))

    def ack(self, msg_ids: list[int]) -> None:
        """Ack by hand (with ``auto_ack=False``)."""
        for m in msg_ids:
            self._ack_later(m)


_CLOSED: Any = object()
