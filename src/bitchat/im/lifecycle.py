"""Messages that live: edits, recalls, reactions, delete for me, replies, mentions and
typed messages (the handlers of :mod:`bitchat.im.packets` types 190-198).

Edits, recalls and reactions are events: rows of the conversation's sequence (their
own id and seq), stored through the same batch as messages, which also applies
their change to the message in the same transaction (:func:`bitchat.im.sql.event_statements`).
So they are pushed live like messages and a device that was away gets them in its
sync, with the same cursors and acks. Deleting for oneself is not an event of the
conversation: a row of ``hidden``, a :class:`~bitchat.im.packets.Hidden` push to the
user's other devices, and at each login the user's recent hidden ids again.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from bitchat.errors import ProtocolError, RequestError, codes
from bitchat.im.centers import Message
from bitchat.im.packets import (
    ADMIN,
    EDIT,
    FILE,
    GROUP,
    IMAGE,
    OWNER,
    P2P,
    REACT,
    RECALL,
    TEXT,
    UNREACT,
    DeleteForMe,
    EditMessage,
    GetReactions,
    GetVersions,
    Hidden,
    Ok,
    React,
    ReactionList,
    RecallMessage,
    SendAck,
    Versions,
)
from bitchat.im.sql import snippet
from bitchat.protocol.packets import Packet

if TYPE_CHECKING:
    from bitchat.im.service import IMService
    from bitchat.session import Session

Validator = Callable[["Session", dict[str, Any]], Awaitable[None]]
"""``async fn(session, fields)`` of :meth:`Lifecycle.type_validator`: raise a
:class:`~bitchat.errors.RequestError` (e.g. ``bad_fields``, ``forbidden``) to refuse."""


StoreHook = Callable[[Message, dict[str, Any]], Awaitable[None]]
"""``async fn(msg, fields)`` of :meth:`Lifecycle.on_store`."""


class FileFields(Packet):
    """The fields of a "file" message: a file the sender uploaded."""

    file_id: str
    name: str
    size: int
    content_type: str = ""


class ImageFields(Packet):
    """The fields of an "image" message."""

    file_id: str
    name: str
    size: int
    content_type: str = ""
    width: int = 0
    height: int = 0


_MENTION = re.compile(r"(?<![\w@])@([^\s@]+)")
_TRAILING = ".,;:!?)]}\"'"


def mentioned_names(text: str) -> list[str]:
    """The names ``@name`` words of ``text`` name (trailing punctuation dropped), in order."""
    out: list[str] = []
    for m in _MENTION.finditer(text):
        name = m.group(1).rstrip(_TRAILING)
        if name and name not in out:
            out.append(name)
    return out


class Lifecycle:
    """The rules of messages that live, over one :class:`~bitchat.im.service.IMService`."""

    def __init__(self, service: IMService) -> None:
        self.service = service
        self.settings = service.settings
        self.types: dict[str, type[Packet] | None] = {
            TEXT: None,
            FILE: FileFields,
            IMAGE: ImageFields,
        }
        """Message type -> the Packet-style class its fields are checked with (None: no
        fields)."""
        self.validators: dict[str, Validator] = {}
        self.before_store: dict[str, list[StoreHook]] = {}
        self.after_store: dict[str, list[StoreHook]] = {}
        self.after_recall: dict[str, list[StoreHook]] = {}
        service.messages.keep_versions = self.settings.max_versions_per_message

    # -- types ----------------------------------------------------------------------------

    def register_type(self, name: str, fields: type[Packet]) -> None:
        """Let messages of type ``name`` be sent, their fields checked against ``fields``
        (a :class:`~bitchat.Packet` subclass without a packet type: annotated fields,
        defaults, ``Limit`` bounds; the server's settings apply)."""
        if not name or name in (TEXT,) or len(name) > self.settings.max_name_length:
            raise ValueError(f"cannot register the message type {name!r}")
        self.types[name] = fields

    def type_validator(self, name: str, fn: Validator) -> None:
        """Run ``fn(session, fields)`` on every message of type ``name`` after its fields
        are decoded (e.g. "file"/"image": the file exists and is the sender's)."""
        if name not in self.types:
            raise ValueError(f"no message type {name!r}")
        self.validators[name] = fn

    def on_store(
        self,
        name: str,
        before: StoreHook | None = None,
        after: StoreHook | None = None,
        recalled: StoreHook | None = None,
    ) -> None:
        """Run ``before(msg, fields)`` once a message of type ``name`` passed every
        check, just before it is queued for storing (its conversation known, its id
        not yet, nobody pushed it), ``after(msg, fields)`` once it is stored (its id
        known; a retry's is the first one's), and ``recalled(msg, fields)`` (the
        fields it had) once its recall is stored. A ``before`` that raises refuses
        the message. (Files: the conversation may read the file before anyone is
        told, and no longer once the message is recalled.)"""
        if name not in self.types:
            raise ValueError(f"no message type {name!r}")
        for hook, hooks in (
            (before, self.before_store),
            (after, self.after_store),
            (recalled, self.after_recall),
        ):
            if hook is not None:
                hooks.setdefault(name, []).append(hook)

    async def stored(self, msg: Message, msg_id: int) -> None:
        """The ``after`` hooks of a stored typed message (``msg_id``: the stored one's)."""
        hooks = self.after_store.get(msg.type)
        if not hooks:
            return
        msg.id = msg_id
        fields = json.loads(msg.fields) if msg.fields else {}
        for hook in hooks:
            await hook(msg, fields)

    async def check_fields(self, session: Session, type_: str, fields: dict[str, Any]) -> str:
        """The fields of a typed message as stored (compact JSON; "" for none)."""
        if type_ not in self.types:
            raise RequestError(codes.BAD_TYPE, f"no message type {type_!r}")
        cls = self.types[type_]
        if cls is None:
            if fields:
                raise RequestError(codes.BAD_FIELDS, f"a {type_} message has no fields")
            return ""
        try:
            decoded = self.service.server.limits.from_dict(cls)(fields)
        except ProtocolError as exc:
            raise RequestError(codes.BAD_FIELDS, exc.message) from None
        clean = decoded.to_dict()
        text = json.dumps(clean, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) > self.settings.max_fields_size:
            raise RequestError(
                codes.BAD_FIELDS, f"fields are limited to {self.settings.max_fields_size} bytes"
            )
        validator = self.validators.get(type_)
        if validator is not None:
            await validator(session, clean)
        return text

    # -- sending: replies, types, mentions --------------------------------------------------

    async def prepare(
        self, session: Session, msg: Message, reply_to: int, type_: str, fields: dict[str, Any]
    ) -> None:
        """Check and fill in what a lively send adds to a plain one (before it is stored)."""
        if type_ != TEXT or fields:
            msg.type = type_
            msg.fields = await self.check_fields(session, type_, fields)
        if reply_to:
            quoted = await self.service.messages.target(reply_to)
            if quoted is None or quoted.conversation_key != msg.conversation_key:
                raise RequestError(
                    codes.NOT_FOUND, f"no message {reply_to} in this conversation to reply to"
                )
            msg.reply_to = reply_to
            msg.extra = {"reply": _quote(quoted)}
        if msg.kind == GROUP and "@" in msg.text:
            await self.mentions(msg)
        hooks = self.before_store.get(msg.type)
        if hooks:
            clean = json.loads(msg.fields) if msg.fields else {}
            for hook in hooks:
                await hook(msg, clean)

    async def mentions(self, msg: Message) -> None:
        names = mentioned_names(msg.text)
        if not names:
            return
        users = self.service.users
        members = await users.group_members(msg.to)
        by_name = {u.name.lower(): u.id for u in (await users.get_users(members)).values()}
        ids: list[int] = []
        for name in names:
            uid = by_name.get(name.lower())
            if uid is not None and uid != msg.sender_id and uid not in ids:
                ids.append(uid)
        ids = ids[: self.settings.max_mentions_per_message]
        if ids:
            msg.mentions = json.dumps(ids)

    # -- the events -------------------------------------------------------------------------

    async def _target(
        self, session: Session, msg_id: int, speaks: bool = False
    ) -> tuple[Message, list[int]]:
        """A message of one of the user's conversations, and who is in it but the user.
        ``speaks``: the user says something there (an edit, a reaction), which a block
        (one-to-one) or a mute (group) forbids as it forbids a message."""
        uid = session.user_id
        assert uid is not None
        m = await self.service.messages.target(msg_id)
        if m is None:
            raise RequestError(codes.NOT_FOUND, f"no message {msg_id}")
        users = self.service.users
        if m.kind == P2P:
            if uid not in (m.sender_id, m.to):
                raise RequestError(codes.NOT_MEMBER, "that message is not of your conversations")
            other = m.to if m.sender_id == uid else m.sender_id
            if speaks and other != uid and (await users.blocks(uid)).either(other):
                raise RequestError(codes.BLOCKED, "you cannot message this user")
            return m, [other]
        members = await users.group_members(m.to)
        if uid not in members:
            raise RequestError(codes.NOT_MEMBER, f"you are not in group {m.to}")
        # A member sees the group from where it starts (its join, unless the history was
        # visible then): nothing before is one of its messages.
        if m.seq <= await self.service.messages.member_floor(m.to, uid):
            raise RequestError(codes.NOT_FOUND, f"no message {msg_id}")
        if speaks:
            me = await users.member(m.to, uid)
            if me is not None and me.muted_until > _now_ms():
                raise RequestError(codes.MUTED, f"you are muted in group {m.to}")
        return m, [u for u in members if u != uid]

    def _event(self, session: Session, m: Message, op: str, text: str) -> Message:
        assert session.user_id is not None
        to = m.to
        if m.kind == P2P:
            to = m.to if m.sender_id == session.user_id else m.sender_id
        ev = Message(0, m.kind, session.user_id, session.user_name or "", to, text, 0)
        ev.op, ev.target = op, m.id
        return ev

    async def _store(self, session: Session, ev: Message, others: Sequence[int]) -> SendAck:
        stored: Any = self.service.server.loop.create_future()
        self.service._store_and_deliver(session, ev, list(others), stored)
        ack: SendAck = await stored
        return ack

    def _window(self, m: Message, seconds: int, what: str) -> None:
        if _now_ms() - m.ts >= seconds * 1000:  # 0: never
            raise RequestError(codes.WINDOW_PASSED, f"messages can be {what} for {seconds} s")

    async def on_edit(self, session: Session, p: EditMessage) -> SendAck:
        self.service._check_text(p.text)
        m, others = await self._target(session, p.msg_id, speaks=True)
        if m.sender_id != session.user_id:
            raise RequestError(codes.FORBIDDEN, "only its sender may edit a message")
        if m.recalled:
            raise RequestError(codes.RECALLED, "that message was recalled")
        self._window(m, self.settings.edit_window, "edited")
        return await self._store(session, self._event(session, m, EDIT, p.text), others)

    async def on_recall(self, session: Session, p: RecallMessage) -> SendAck:
        m, others = await self._target(session, p.msg_id)
        if m.recalled:
            raise RequestError(codes.RECALLED, "that message was recalled already")
        if m.sender_id == session.user_id:
            self._window(m, self.settings.recall_window, "recalled")
        else:
            me = None
            if m.kind == GROUP:
                assert session.user_id is not None
                me = await self.service.users.member(m.to, session.user_id)
            if me is None or me.role not in (OWNER, ADMIN):
                raise RequestError(
                    codes.FORBIDDEN, "only its sender or a group admin may recall a message"
                )
        ack = await self._store(session, self._event(session, m, RECALL, ""), others)
        for hook in self.after_recall.get(m.type, ()):
            await hook(m, json.loads(m.fields) if m.fields else {})
        return ack

    async def on_react(self, session: Session, p: React) -> SendAck:
        emoji = p.emoji
        if not emoji or emoji != emoji.strip() or any(c.isspace() for c in emoji):
            raise RequestError(codes.INVALID_PACKET, "an emoji is one word without spaces")
        m, others = await self._target(session, p.msg_id, speaks=p.on)
        if m.recalled:
            raise RequestError(codes.RECALLED, "that message was recalled")
        messages = self.service.messages
        full = p.on and m.reacts >= self.settings.max_reactions_per_message
        if full and not await messages.has_reaction(m.id, emoji):
            raise RequestError(
                codes.TOO_MANY_REACTIONS,
                f"a message carries at most {self.settings.max_reactions_per_message} emoji",
            )
        ev = self._event(session, m, REACT if p.on else UNREACT, emoji)
        return await self._store(session, ev, others)

    async def on_delete_for_me(self, session: Session, p: DeleteForMe) -> Ok:
        uid = session.user_id
        assert uid is not None
        ids = list(dict.fromkeys(p.msg_ids))
        for msg_id in ids:  # all checked before any is hidden
            await self._target(session, msg_id)
        await self.service.messages.hide(uid, ids, _now_ms())
        self.service.connections.deliver_event(Hidden(ids), [uid], exclude_session=session.id)
        return Ok()

    async def on_get_versions(self, session: Session, p: GetVersions) -> Versions:
        m, _ = await self._target(session, p.msg_id)
        if m.sender_id != session.user_id:
            raise RequestError(codes.FORBIDDEN, "only its sender may read earlier versions")
        found = await self.service.messages.versions(m.id)
        return Versions(m.id, [{"text": t, "ts": ts} for t, ts in found])

    async def on_get_reactions(self, session: Session, p: GetReactions) -> ReactionList:
        m, _ = await self._target(session, p.msg_id)
        found = await self.service.messages.reactions(m.id)
        users = await self.service.users.get_users({u for _, u in found})
        by_emoji: dict[str, list[dict[str, Any]]] = {}
        for emoji, u in found:
            by_emoji.setdefault(emoji, []).append(
                {"id": u, "name": users[u].name if u in users else ""}
            )
        return ReactionList(m.id, [{"emoji": e, "users": us} for e, us in by_emoji.items()])

    async def hidden_at_login(self, user_id: int) -> list[int]:
        """The user's recent hidden messages: a device that was away learns them."""
        return await self.service.messages.hidden_of(user_id, self.settings.max_ack_ids)


def _quote(m: Message) -> dict[str, Any]:
    return {
        "msg_id": m.id,
        "sender_id": m.sender_id,
        "sender_name": m.sender_name,
        "snippet": "" if m.recalled else snippet(m.text),
        "recalled": bool(m.recalled),
    }


def _now_ms() -> int:
    return int(time.time() * 1000)
