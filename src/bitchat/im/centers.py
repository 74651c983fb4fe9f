"""The three centers: users (and groups), messages, connections.

Each is an abstract class; the standalone backends are SQLite (users,
messages) and in-memory (connections); the cluster backends are PostgreSQL and
Redis. Handlers see only these interfaces. Backends translate their driver's
errors at this boundary: a store that is down raises
:class:`~bitchat.errors.ServiceUnavailable`, never a driver exception.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bitchat.errors import RequestError, codes
from bitchat.im.names import taken
from bitchat.im.passwords import Passwords

if TYPE_CHECKING:
    from bitchat.im.packets import TypingEvent
    from bitchat.protocol.packets import Packet
    from bitchat.session import Session


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Group:
    id: int
    name: str
    owner_id: int
    members: int = 0
    invite_only: bool = False
    history_visible: bool = False
    role: str = ""
    """The role of the user it was read for (:meth:`UserCenter.user_groups`), else ""."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "owner_id": self.owner_id,
            "members": self.members,
            "role": self.role,
            "invite_only": self.invite_only,
            "history_visible": self.history_visible,
        }


@dataclass(frozen=True, slots=True)
class Member:
    """A group member's standing: ``role`` "owner", "admin" or "member";
    ``muted_until`` Unix ms (0: not muted)."""

    user_id: int
    role: str
    muted_until: int = 0


@dataclass(frozen=True, slots=True)
class Blocks:
    """Whom a user blocks (``mine``) and who blocks them (``by``): no messages pass
    between the user and either set."""

    mine: frozenset[int] = frozenset()
    by: frozenset[int] = frozenset()

    def either(self, user_id: int) -> bool:
        return user_id in self.mine or user_id in self.by


NO_BLOCKS = Blocks()
"""The blocks of a user in none (shared: ``blocks is NO_BLOCKS`` is the quick test)."""


def make_blocks(mine: Iterable[int], by: Iterable[int]) -> Blocks:
    m, b = frozenset(mine), frozenset(by)
    return Blocks(m, b) if m or b else NO_BLOCKS


@dataclass(frozen=True, slots=True)
class Invite:
    code: str
    group_id: int
    expires_at: int
    """Unix ms."""
    max_uses: int = 0
    """0: unlimited."""


@dataclass(slots=True)
class Message:
    """A stored chat message. ``to`` is the recipient user (p2p) or the group."""

    id: int
    kind: str
    sender_id: int
    sender_name: str
    to: int
    text: str
    ts: int
    client_msg_id: str = ""
    seq: int = 0
    """The message's place in its conversation: 1, 2, 3... with no gap (given by the
    store, in commit order, when it stores the message)."""
    device: int = 0
    """The id of the sender's device it came from (never pushed back to it); not on
    the wire."""
    conv: str = ""
    """Its conversation's key (:func:`conversation`), once known; not on the wire."""
    op: str = ""
    """"" for a message; an event: "edit", "recall", "react" or "unreact"."""
    target: int = 0
    """An event's message."""
    type: str = "text"
    fields: str = ""
    """A typed message's fields as JSON ("" for none)."""
    reply_to: int = 0
    edited_at: int = 0
    recalled: int = 0
    reacts: int = 0
    """How many distinct emoji it carries (a read looks up reactions only when some)."""
    mentions: str = ""
    """The ids a group message's ``@name`` words named, as JSON ("" for none)."""
    no: int = 0
    """Its number among the conversation's messages (1, 2, 3...); an event has the
    number of the last message before it. Unread counts are differences of numbers."""
    extra: dict[str, Any] | None = None
    """What a read adds (``reactions``, ``reply``, ``mentions``); not a column."""

    @property
    def conversation_key(self) -> str:
        conv = self.conv
        if not conv:
            conv = self.conv = conversation(self.kind, self.sender_id, self.to)
        return conv

    def to_dict(self) -> dict[str, Any]:
        d = {
            "msg_id": self.id,
            "kind": self.kind,
            "sender_id": self.sender_id,
            "sender_name": self.sender_name,
            "to": self.to,
            "text": self.text,
            "ts": self.ts,
            "client_msg_id": self.client_msg_id,
            "seq": self.seq,
            "no": self.no,
        }
        # Plain messages (the hot path) carry only the fields above.
        if (
            self.op
            or self.reply_to
            or self.edited_at
            or self.recalled
            or self.fields
            or self.extra
            or self.mentions
            or self.type != "text"
        ):
            self._lively(d)
        return d

    def _lively(self, d: dict[str, Any]) -> None:
        if self.op in ("react", "unreact"):
            d["emoji"], d["text"] = self.text, ""  # a reaction's row keeps its emoji as text
        d["op"] = self.op
        d["target"] = self.target
        d["type"] = self.type
        d["fields"] = json.loads(self.fields) if self.fields else {}
        d["reply_to"] = self.reply_to
        d["edited_at"] = self.edited_at
        d["recalled"] = bool(self.recalled)
        d["mentions"] = json.loads(self.mentions) if self.mentions else []
        if self.extra:
            d.update(self.extra)


@dataclass(slots=True)
class Conversation:
    """One entry of a user's conversation list (see ConversationList)."""

    kind: str
    peer_id: int
    group_id: int
    name: str
    last_seq: int
    read_seq: int
    peer_read_seq: int
    peer_delivered_seq: int
    activity: int
    last_message: Message | None
    mentions: int = 0
    """Unread messages that mention the user."""
    last_no: int = -1
    """The number of the conversation's last message (-1: unknown, counted by seq)."""
    read_no: int = 0
    """The number of the last message the user read."""

    @property
    def unread(self) -> int:
        if self.last_no >= 0:  # messages, not the events between them
            return max(0, self.last_no - self.read_no)
        return max(0, self.last_seq - self.read_seq)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "peer_id": self.peer_id,
            "group_id": self.group_id,
            "name": self.name,
            "last_seq": self.last_seq,
            "read_seq": self.read_seq,
            "unread": self.unread,
            "mentions": self.mentions,
            "peer_read_seq": self.peer_read_seq,
            "peer_delivered_seq": self.peer_delivered_seq,
            "activity": self.activity,
            "last_message": None if self.last_message is None else self.last_message.to_dict(),
            # The numbers unread is the difference of (messages, not events): a client that
            # counts arrivals itself starts from them.
            "last_no": max(self.last_no, 0),
            "read_no": self.read_no if self.last_no >= 0 else 0,
        }


def conversation(kind: str, a: int, b: int) -> str:
    """The key of a conversation, as the message stores keep it: a p2p pair
    (unordered) or a group (``b``)."""
    if kind == "group":
        return f"g:{b}"
    lo, hi = (a, b) if a < b else (b, a)
    return f"p:{lo}:{hi}"


# The batching both SQL message stores share (see im/sqlite.py's docstring).


def first_of_each(
    stores: Sequence[tuple[Message, Any, Any]],
) -> tuple[list[int], dict[int, int]]:
    """Split a batch: the positions of the messages to insert, and each later
    repeat of a (sender, client_msg_id) in the batch -> the position of its first."""
    fresh: list[int] = []
    repeats: dict[int, int] = {}
    seen: dict[tuple[int, str], int] = {}
    for i, (m, _, _) in enumerate(stores):
        if m.client_msg_id:
            key = (m.sender_id, m.client_msg_id)
            first = seen.get(key)
            if first is not None:
                repeats[i] = first
                continue
            seen[key] = i
        fresh.append(i)
    return fresh, repeats


def conversation_counts(convs: Iterable[str]) -> dict[str, int]:
    """How many new messages each conversation gets, in key order: the order every
    writer takes the conversations' row locks in (no deadlock between nodes)."""
    counts = collections.Counter(convs)
    return {c: counts[c] for c in sorted(counts)}


def id_order(msgs: Sequence[Message]) -> list[int]:
    """The positions of ``msgs`` in id order: the order seqs are given in (found once
    per batch, for :func:`read_offsets` and :func:`number` both)."""
    return sorted(range(len(msgs)), key=lambda i: msgs[i].id)


def number(
    msgs: Sequence[Message],
    convs: Sequence[str],
    counts: dict[str, int],
    last: dict[str, int],
    order: Sequence[int],
    last_no: dict[str, int] | None = None,
    message_counts: dict[str, int] | None = None,
) -> None:
    """Give the new messages of each conversation its next seqs, in id order
    (``order``): the conversation's ``counts[c]`` numbers up to ``last[c]`` (its
    counter, moved on); and with ``last_no``, each message (not event) its number,
    the conversation's ``message_counts[c]`` numbers up to ``last_no[c]``."""
    nxt = {c: last[c] - n + 1 for c, n in counts.items()}
    for i in order:
        c = convs[i]
        msgs[i].seq = nxt[c]
        nxt[c] += 1
    if last_no is None or message_counts is None:
        return
    no = {c: last_no[c] - message_counts.get(c, 0) for c in counts}
    for i in order:
        c, m = convs[i], msgs[i]
        if not m.op:
            no[c] += 1
        m.no = no[c]


def message_counts(msgs: Sequence[Message], convs: Sequence[str]) -> dict[str, int]:
    """How many of a batch's rows in each conversation are messages (not events)."""
    out: dict[str, int] = {}
    for m, c in zip(msgs, convs, strict=True):
        if not m.op:
            out[c] = out.get(c, 0) + 1
    return out


class AckJob:
    """One ack call waiting to be written: ``cursors[pos:]`` of the device are left."""

    __slots__ = ("cursors", "device_id", "pos", "user_id", "waiter")

    def __init__(
        self,
        user_id: int,
        device_id: int,
        cursors: Sequence[tuple[str, int]],
        waiter: asyncio.Future[None],
    ) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.cursors = cursors
        self.pos = 0
        self.waiter = waiter


def take_acks(
    jobs: collections.deque[AckJob], most: int
) -> tuple[list[Any], list[asyncio.Future[None]], AckJob | None]:
    """Up to ``most`` cursor moves from the oldest jobs, for one transaction.

    Returns the ``(user_id, conv, device_id, seq)`` rows laid end to end, one per
    cursor (the largest seq of the jobs taken), the waiters of the jobs taken whole
    (removed from ``jobs``), and the job taken in part, if any (still first in
    ``jobs``, its ``pos`` moved on).
    """
    moves: dict[tuple[int, str, int], int] = {}
    done: list[asyncio.Future[None]] = []
    room = most
    partial: AckJob | None = None
    while jobs:
        job = jobs[0]
        left = len(job.cursors) - job.pos
        take = min(left, room)
        for conv, seq in job.cursors[job.pos : job.pos + take]:
            key = (job.user_id, conv, job.device_id)
            if moves.get(key, -1) < seq:
                moves[key] = seq
        room -= take
        if take < left:
            job.pos += take
            partial = job
            break
        jobs.popleft()
        done.append(job.waiter)
        if not room:
            break
    flat: list[Any] = []
    for (user_id, conv, device_id), seq in moves.items():
        flat += (user_id, conv, device_id, seq)
    return flat, done, partial


def p2p_pair(conv: str) -> tuple[int, int] | None:
    """The two users of a one-to-one conversation key, or None for a group's."""
    if not conv.startswith("p:"):
        return None
    _, lo, hi = conv.split(":")
    return int(lo), int(hi)


def read_offsets(
    msgs: Sequence[Message], convs: Sequence[str], order: Sequence[int]
) -> dict[str, tuple[int | None, int | None, int, int, int]]:
    """Per conversation of a batch: ``(lo, hi, last_id, lo_off, hi_off)``, the p2p pair
    (None for a group), the largest new id, and the 1-based places (in id order, as
    :func:`number` gives seqs) of the last message the pair's lower and higher user
    sent, 0 if none: the senders' read positions move to their own messages."""
    out: dict[str, list[Any]] = {}
    for i in order:
        m, c = msgs[i], convs[i]
        entry = out.get(c)
        if entry is None:
            pair = p2p_pair(c)
            entry = out[c] = [pair[0] if pair else None, pair[1] if pair else None, 0, 0, 0, 0]
        entry[5] += 1
        entry[2] = m.id
        if entry[0] is not None:
            if m.sender_id == entry[0]:
                entry[3] = entry[5]
            if m.sender_id == entry[1]:
                entry[4] = entry[5]
    return {c: (e[0], e[1], e[2], e[3], e[4]) for c, e in out.items()}


def refused(exc: BaseException) -> RequestError:
    """What the sender of a message the store could not keep gets (the others of
    its batch are stored)."""
    return RequestError(codes.INVALID_PACKET, f"the store cannot keep this message: {exc}")


StoreCallback = Callable[[tuple[Message, bool] | None, BaseException | None], None]
"""``then(result, error)`` of :meth:`MessageCenter.store_then`: exactly one is None."""

PresenceHook = Callable[[int, str, bool, int], None]
"""``on_presence(user_id, name, online, last_seen)`` of :class:`ConnectionCenter`
(``last_seen``: Unix ms of an offline user who shows it, else 0)."""
ResyncHook = Callable[["Session"], None]
"""``on_resync(session)`` of :class:`ConnectionCenter`."""


class UserCenter(abc.ABC):
    """Users, credentials, tokens and groups."""

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Open connections, run migrations."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release everything."""

    @abc.abstractmethod
    async def register(self, name: str, password: str) -> User:
        """Create a user; RequestError ``name_taken`` if the name exists or looks like
        one that does (:mod:`bitchat.im.names`: its keys are unique)."""

    passwords: Passwords = Passwords()
    """Hashes and checks passwords (its pool starts with the first hash)."""

    @abc.abstractmethod
    async def credentials(self, name: str) -> tuple[int, str, str] | None:
        """The id, name and stored password hash of the user called ``name``, or else
        of the one whose :func:`~bitchat.im.names.name_key` it has (``HOUYI`` is
        ``houyi``), if any."""

    async def authenticate(self, name: str, password: str, auto_register: bool) -> User:
        """The user for these credentials (registering an unknown name when
        ``auto_register``); RequestError ``login_failed`` otherwise, or ``name_taken``
        for a new name too like an existing one."""
        found = await self.credentials(name)
        if found is None:
            if not auto_register:
                # As slow as a wrong password: timing does not tell which names exist.
                await self.passwords.hash(password)
                raise RequestError(codes.LOGIN_FAILED, "unknown user or wrong password")
            try:
                return await self.register(name, password)
            except RequestError as exc:
                if exc.code != codes.NAME_TAKEN:
                    raise
            # Registered meanwhile by another login (maybe on another node), or the
            # name looks like one that exists.
            found = await self.credentials(name)
            if found is None:
                raise taken(name) from None
        user_id, stored_name, stored = found
        if not await self.passwords.verify(stored, password):
            raise RequestError(codes.LOGIN_FAILED, "unknown user or wrong password")
        return User(user_id, stored_name)

    @abc.abstractmethod
    async def external_user(self, provider: str, subject: str, names: Sequence[str]) -> User:
        """The user an external identity (:mod:`bitchat.im.auth`) maps to; at its first
        login a new user, named the first of ``names`` that is free (they are valid
        names; RequestError ``name_taken`` if none is), with no password, mapped in the
        same transaction (so two first logins at once make one user)."""

    @abc.abstractmethod
    async def issue_token(self, user_id: int, ttl: float, device_id: int = 0) -> str:
        """A new login token for reconnects of this device."""

    @abc.abstractmethod
    async def check_token(self, token: str) -> tuple[User, int] | None:
        """The user a live token belongs to, and its device (0: a token from before
        devices, which gets a new one)."""

    @abc.abstractmethod
    async def device(self, user_id: int, name: str, max_devices: int) -> tuple[int, bool]:
        """The id of the user's device called ``name``, and whether it is new (then
        registered here, in one transaction with the cursors
        :meth:`~MessageCenter.start_device` gives, so a device never exists without
        them). Marks it seen. With ``max_devices``
        devices already, the one seen longest ago is forgotten, cursors and tokens
        with it."""

    @abc.abstractmethod
    async def device_name(self, user_id: int, device_id: int) -> str | None:
        """The name of the user's device, if it still exists."""

    @abc.abstractmethod
    async def revoke_token(self, token: str) -> None: ...

    @abc.abstractmethod
    async def revoke_user_tokens(self, user_id: int) -> int:
        """Revoke every token of every device of the user (a forced logout); how many."""

    @abc.abstractmethod
    async def set_banned(self, user_id: int, banned: bool, ts: int = 0) -> bool:
        """Ban the user from the server since ``ts`` (Unix ms), or lift the ban; False
        if there is no such user."""

    @abc.abstractmethod
    async def is_server_banned(self, user_id: int) -> bool:
        """Whether the user is banned from the server (asked at each login)."""

    @abc.abstractmethod
    async def bind_token(self, token: str, device_id: int) -> bool:
        """A token from before devices (device 0) is the device's from now on; False if
        it is no longer one (another login bound it first: it is that device's)."""

    @abc.abstractmethod
    async def get_users(self, ids: Iterable[int]) -> dict[int, User]: ...

    async def get_user(self, user_id: int) -> User | None:
        return (await self.get_users([user_id])).get(user_id)

    def known_user(self, user_id: int) -> User | None:
        """The user if this node has it cached (no I/O); None means "ask get_user"."""
        return None

    def known_members(self, group_id: int) -> list[int] | None:
        """A group's member ids if cached and current (no I/O); None means "ask"."""
        return None

    # Last seen: when a user's last connection closed (or they logged in), and whether
    # others may know it. Written only when the user went offline everywhere.

    @abc.abstractmethod
    async def touch_last_seen(self, user_ids: Sequence[int], ts: int) -> None:
        """The users were seen at ``ts`` (Unix ms); a later time is never replaced by
        an earlier one (two nodes may both see a user go)."""

    @abc.abstractmethod
    async def last_seen(self, user_ids: Iterable[int], viewer: int) -> dict[int, int]:
        """When each user was last seen, as ``viewer`` may know it: users who hide it
        (but the viewer themself) and users never seen are left out."""

    @abc.abstractmethod
    async def set_show_last_seen(self, user_id: int, on: bool) -> None:
        """Whether others may see when the user was last seen (default: yes)."""

    @abc.abstractmethod
    async def show_last_seen(self, user_id: int) -> bool: ...

    @abc.abstractmethod
    async def create_group(self, owner_id: int, name: str) -> Group:
        """Create a group with its owner as first member."""

    @abc.abstractmethod
    async def join_group(
        self, group_id: int, user_id: int, max_size: int, *, reason: str = "joined"
    ) -> Group:
        """RequestError ``not_found`` or ``group_full``; joining twice is harmless.
        The only way a member is added: a webhook's ``group.member_added`` is written
        here, in the join's transaction, with ``reason``."""

    @abc.abstractmethod
    async def leave_group(self, group_id: int, user_id: int, *, reason: str = "left") -> None:
        """RequestError ``not_found`` / ``not_member``. The only way a member is
        removed: ``group.member_removed`` is written here, with ``reason``."""

    @abc.abstractmethod
    async def get_group(self, group_id: int) -> Group | None: ...

    @abc.abstractmethod
    async def user_groups(self, user_id: int) -> list[Group]: ...

    @abc.abstractmethod
    async def group_members(self, group_id: int) -> list[int]:
        """Member ids, ascending."""

    # Moderation (bitchat.im.moderation holds the rules; these only read and write).
    # ``join_group`` refuses a banned user (``banned``), drops the user's join request,
    # and starts a member at 0 in a group whose history is visible; ``leave_group``
    # hands a leaving owner's group to the first admin (else the first member).

    def known_mutes(self, group_id: int) -> dict[int, int] | None:
        """The group's muted members (user id -> Unix ms until), if cached and current
        (no I/O; kept with :meth:`known_members`); None means "ask"."""
        return None

    @abc.abstractmethod
    async def members_info(self, group_id: int) -> list[Member]:
        """Every member's role and mute, ascending by id."""

    @abc.abstractmethod
    async def member(self, group_id: int, user_id: int) -> Member | None:
        """The user's standing in the group, None if not a member."""

    @abc.abstractmethod
    async def set_role(self, group_id: int, user_id: int, role: str) -> None:
        """Give a member a role; "owner" hands the group over (``groups.owner_id``
        too; the old owner becomes "admin"), in one transaction. ``not_member``."""

    @abc.abstractmethod
    async def set_muted(self, group_id: int, user_id: int, until: int) -> None:
        """Mute a member until ``until`` (Unix ms; 0 unmutes). ``not_member``."""

    @abc.abstractmethod
    async def set_ban(self, group_id: int, user_id: int, by_id: int, on: bool) -> bool:
        """Ban (or lift the ban of) a user; whether anything changed. It does not
        remove a member: that is :meth:`leave_group`."""

    @abc.abstractmethod
    async def is_banned(self, group_id: int, user_id: int) -> bool: ...

    @abc.abstractmethod
    async def set_group_options(
        self, group_id: int, invite_only: bool | None, history_visible: bool | None
    ) -> Group:
        """Change the options given (None: unchanged). ``not_found``."""

    @abc.abstractmethod
    async def add_invite(self, invite: Invite, created_by: int, most: int) -> None:
        """Store an invite; ``forbidden`` if the group has ``most`` unexpired ones
        already (expired ones are dropped here)."""

    @abc.abstractmethod
    async def use_invite(self, code: str, group_id: int, now_ms: int) -> bool:
        """Spend one use of an invite of the group that is unexpired and not used up;
        False if there is none such."""

    @abc.abstractmethod
    async def add_join_request(self, group_id: int, user_id: int, now_ms: int, most: int) -> bool:
        """Record a join request; False if it was there already; ``forbidden`` if the
        group has ``most`` waiting."""

    @abc.abstractmethod
    async def join_requests(self, group_id: int) -> list[tuple[int, int]]:
        """The waiting requests: ``(user_id, Unix ms)``, oldest first."""

    @abc.abstractmethod
    async def drop_join_request(self, group_id: int, user_id: int) -> bool:
        """Forget a request; whether there was one."""

    @abc.abstractmethod
    async def set_block(self, user_id: int, other_id: int, on: bool, most: int) -> bool:
        """``user_id`` blocks (or unblocks) ``other_id``; whether anything changed;
        ``forbidden`` past ``most`` blocks."""

    @abc.abstractmethod
    async def blocks(self, user_id: int) -> Blocks:
        """Whom the user blocks and who blocks the user."""

    def known_blocks(self, user_id: int) -> Blocks | None:
        """:meth:`blocks` if cached and current (no I/O); None means "ask"."""
        return None


class MessageCenter(abc.ABC):
    """Durable messages, each device's cursors, read positions, and history.

    What a device has not got is not a row per message: it is every message past
    its cursor in each of the user's conversations (one row per device and
    conversation, moved by acks). Read positions are one per user and
    conversation; sending moves the sender's to the message sent.
    """

    keep_versions: int = 50
    """Earlier texts kept per edited message (the service sets it from the settings)."""

    # Messages that live (bitchat.im.lifecycle); the SQL stores answer them (im/sql.py).
    async def target(self, msg_id: int) -> Message | None:
        """A message (not an event) as it is now."""
        raise NotImplementedError

    async def versions(self, msg_id: int) -> list[tuple[str, int]]:
        """A message's earlier texts and when each was replaced, oldest first."""
        raise NotImplementedError

    async def reactions(self, msg_id: int) -> list[tuple[str, int]]:
        """``(emoji, user_id)`` of a message's reactions, in the order given."""
        raise NotImplementedError

    async def has_reaction(self, msg_id: int, emoji: str) -> bool:
        raise NotImplementedError

    async def hide(self, user_id: int, msg_ids: Sequence[int], ts: int) -> None:
        """Delete messages for the user only."""
        raise NotImplementedError

    async def hidden_of(self, user_id: int, limit: int) -> list[int]:
        """The user's most recently hidden messages."""
        raise NotImplementedError

    async def member_floor(self, group_id: int, user_id: int) -> int:
        """The seq a member's view of a group starts after (0: its whole history)."""
        raise NotImplementedError

    async def unread(self, conv: str, read_seq: int) -> int:
        """Messages (not events) of ``conv`` after ``read_seq``."""
        raise NotImplementedError

    async def start(self) -> None: ...  # noqa: B027 (optional hook)

    async def close(self) -> None: ...  # noqa: B027 (optional hook)

    @abc.abstractmethod
    def store(self, message: Message, recipients: Sequence[int]) -> Awaitable[tuple[Message, bool]]:
        """Store ``message``, for ``recipients`` (the SQL stores write nothing per
        recipient: each device's cursors say what it misses; a store of one's own may
        use them); resolves when durable.

        Called in the order messages must be stored (it is not a coroutine, so
        the order of calls is the order of queueing). If the sender already
        stored a message with the same non-empty ``client_msg_id``, nothing is
        written and it resolves to ``(that message, True)``.
        """

    def store_then(self, message: Message, recipients: Sequence[int], then: StoreCallback) -> None:
        """:meth:`store`, then ``then(result, None)`` or ``then(None, error)`` on the loop.

        For the send path, which needs no future of its own: a backend may call
        ``then`` straight from its group commit (the default waits on ``store``).
        """

        def done(f: asyncio.Future[tuple[Message, bool]]) -> None:
            if f.cancelled():
                then(None, asyncio.CancelledError())
            elif (exc := f.exception()) is not None:
                then(None, exc)
            else:
                then(f.result(), None)

        asyncio.ensure_future(self.store(message, recipients)).add_done_callback(done)

    @abc.abstractmethod
    def ack(
        self, user_id: int, device_id: int, cursors: Sequence[tuple[str, int]]
    ) -> Awaitable[None]:
        """The device has each conversation ``conv`` up to ``seq``: its cursors move
        there (never back)."""

    @abc.abstractmethod
    async def pending(
        self, user_id: int, device_id: int, after_id: int, limit: int, own: bool = False
    ) -> list[Message]:
        """Messages past the device's cursors with id > ``after_id``, ascending by id
        (not those the device sent itself, unless ``own``)."""

    @abc.abstractmethod
    async def count_pending(self, user_id: int, device_id: int) -> int: ...

    async def cursors(self, user_id: int, device_id: int) -> dict[str, int]:
        """Where the device is in each of the user's conversations: its cursor, or
        where it starts there (what :meth:`pending` gives is past it)."""
        return {c: at for c, (at, _) in (await self.positions(user_id, device_id)).items()}

    @abc.abstractmethod
    async def positions(self, user_id: int, device_id: int) -> dict[str, tuple[int, int]]:
        """:meth:`cursors`, each with its conversation's last seq."""

    @abc.abstractmethod
    async def messages_after(self, conv: str, after_seq: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages of ``conv`` with a seq past ``after_seq``, in seq
        order (a sync reads each conversation's backlog this way, not as one sort)."""

    @abc.abstractmethod
    async def start_device(self, user_id: int, device_id: int) -> None:
        """A new device: its cursor in each of the user's conversations is the user's
        read position there."""

    @abc.abstractmethod
    async def conversations(self, user_id: int, before: int, limit: int) -> list[Conversation]:
        """The user's conversations by activity, newest first; only those with
        activity < ``before`` unless it is 0."""

    @abc.abstractmethod
    async def mark_read(self, user_id: int, conv: str, seq: int) -> tuple[int, int, list[int]]:
        """Move the user's read position in ``conv`` to ``seq`` (0: its last message;
        never back, never past the last). Returns the read position, the last seq,
        and the other users who sent messages in the newly read range (at most
        ``max_group_size``; those to tell)."""

    @abc.abstractmethod
    async def receipts(self, group_id: int, seq: int) -> list[tuple[int, bool]]:
        """Members of the group who have message ``seq`` on a device, each with
        whether they read it, ascending by id; the message's sender left out."""

    @abc.abstractmethod
    async def history(
        self,
        user_id: int,
        peer_id: int,
        group_id: int,
        before: int,
        limit: int,
        before_seq: int = 0,
        after_seq: int = 0,
    ) -> list[Message]:
        """A conversation, newest first: p2p between ``user_id`` and ``peer_id``,
        or the group ``group_id``; only ids < ``before`` unless it is 0, and only
        seqs < ``before_seq`` unless it is 0. With ``after_seq``, the messages with
        a larger seq instead, oldest first."""

    @abc.abstractmethod
    async def last_id(self, node_id: int) -> int:
        """The largest message id issued by ``node_id`` (seeds the id generator)."""


class ConnectionCenter(abc.ABC):
    """Where users are online, and the delivery of pushes to them.

    A center that spans several nodes also carries presence between them and may
    lose pushes in transit; the IM service subscribes to both with the two hooks
    below. The in-memory center (one node) calls neither, and publishes nothing.
    """

    on_presence: PresenceHook | None = None
    """Set by the IM service: called for a presence change published by another node."""
    on_resync: ResyncHook | None = None
    """Set by the IM service: called for each local session whose pushes may have been
    lost in transit (their messages are still pending in the store)."""

    async def start(self) -> None: ...  # noqa: B027 (optional hook)

    async def close(self) -> None: ...  # noqa: B027 (optional hook)

    def publish_presence(  # noqa: B027
        self, user_id: int, name: str, online: bool, last_seen: int = 0
    ) -> None:
        """Tell the other nodes that the user came online or went offline anywhere
        (best effort), with when they were last seen if they show it (else 0); this
        node's watchers are told by the IM service itself."""

    @abc.abstractmethod
    async def attach(self, user_id: int, session: Session) -> None:
        """``session`` is now logged in as ``user_id``."""

    @abc.abstractmethod
    async def detach(self, session: Session) -> None:
        """``session`` logged out or closed."""

    @abc.abstractmethod
    def local_sessions(self, user_id: int) -> Sequence[Session]:
        """This node's sessions of the user."""

    @abc.abstractmethod
    async def online_users(self) -> list[int]:
        """Ids of every user online anywhere, ascending."""

    @abc.abstractmethod
    async def is_online(self, user_id: int) -> bool: ...

    @abc.abstractmethod
    def deliver(self, message: Message, user_ids: Iterable[int], exclude_session: int = 0) -> None:
        """Push ``message`` to every connection of ``user_ids`` wherever it is,
        except the session ``exclude_session`` (the sender's own)."""

    def deliver_typing(self, event: TypingEvent, user_ids: Sequence[int]) -> None:
        """Push ``event`` to every connection of ``user_ids`` wherever it is, at once and
        best effort: never stored, never held back, and one lost in transit is lost."""
        self.deliver_event(event, user_ids)

    @abc.abstractmethod
    def deliver_event(
        self, packet: Packet, user_ids: Sequence[int], exclude_session: int = 0
    ) -> None:
        """Push ``packet`` (an IM push: typing, a receipt, a read state) to every
        connection of ``user_ids`` wherever it is but the local session
        ``exclude_session``; at once and best effort, as :meth:`deliver_typing`."""

    async def disconnect_user(self, user_id: int, code: str, message: str) -> None:
        """Close every connection of the user wherever it is, each told why first (an
        Error push with ``code``); a center that spans nodes resolves once the others
        have been told (:class:`~bitchat.errors.ServiceUnavailable` if they cannot be)."""
        close_sessions(self.local_sessions(user_id), code, message)

    def after_forward(self, callback: Callable[[], None]) -> None:
        """``callback()`` once what :meth:`deliver` was given so far has left for the
        other nodes, or at once if that cannot be quick (the sender's ack waits for
        it, so a node that dies after an ack has handed the message on). One node
        forwards nothing: at once."""
        callback()


def close_sessions(sessions: Iterable[Session], code: str, message: str) -> None:
    """Tell each session why (an Error push ``code``), then close it."""
    for s in list(sessions):
        s.send_error(code, message)
        s.close()
