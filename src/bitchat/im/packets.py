"""The built-in IM packets (types 100-999).

Requests and their answers; ``ChatMessage``, ``Presence``, ``TypingEvent`` and
``GroupEvent`` are server pushes.
User, group and message ids are integers; message ids are 64-bit snowflakes
(time-ordered, node id inside). Timestamps are Unix milliseconds.

Every string and list field is bounded by a setting (see
:class:`~bitchat.protocol.packets.Limit`), which the server enforces when it
decodes a request; the answers it sends stay within the same settings.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any

from bitchat.errors import codes
from bitchat.protocol.packets import Limit, Packet

P2P = "p2p"
GROUP = "group"

Name = Annotated[str, Limit("max_name_length")]
Password = Annotated[str, Limit("max_password_length")]
Token = Annotated[str, Limit("max_token_length")]
Text = Annotated[str, Limit("max_message_length", codes.MESSAGE_TOO_LONG)]
ClientMsgId = Annotated[str, Limit("max_client_msg_id_length")]
GroupName = Annotated[str, Limit("max_group_name_length")]
Device = Annotated[str, Limit("max_device_length")]
InviteCode = Annotated[str, Limit("max_token_length")]
Jwt = Annotated[str, Limit("max_jwt_length")]
Emoji = Annotated[str, Limit("max_emoji_length")]
MsgType = Annotated[str, Limit("max_name_length")]
Fields = Annotated[dict[str, Any], Limit("max_fields_keys")]
"""A typed message's fields: at most ``max_fields_keys`` keys; the server also bounds
their JSON size (``max_fields_size``) and validates them against the type's schema."""

TEXT = "text"
FILE = "file"
IMAGE = "image"
"""The built-in message types; an application registers more
(:meth:`bitchat.im.service.IMService.register_type`)."""

EDIT = "edit"
RECALL = "recall"
REACT = "react"
UNREACT = "unreact"
OPS = (EDIT, RECALL, REACT, UNREACT)
"""``ChatMessage.op`` of an event ("" = a message)."""


class Ok(Packet, type=100):
    """A request that needed no other answer succeeded."""


class Register(Packet, type=101):
    name: Name
    password: Password


class UserInfo(Packet, type=102):
    """Answer to Register: the new user."""

    user_id: int
    name: Name


class Login(Packet, type=103):
    """Log in with a password, with the token of an earlier login, or with a JWT
    the product's backend signed (checked first: ``token``, then ``jwt``, then the
    password)."""

    name: Name = ""
    password: Password = ""
    token: Token = ""
    device: Device = ""
    """The client's stable id for this device (letters, digits, ``-_.:``): what it
    missed is kept for it until it acks. Empty: the token's device, or for a
    password or JWT login a new one the server names (:attr:`LoginOk.device`); keep it."""
    jwt: Jwt = ""
    """A JWT (or another credential the server's :class:`~bitchat.im.auth.Authenticator`
    takes): its user, created at the first such login."""


class LoginOk(Packet, type=104):
    user_id: int
    name: Name
    token: Token
    pending: int = 0
    """Messages this device missed, pushed right after this answer (in id order)."""
    show_last_seen: bool = True
    """The user's privacy setting (:class:`SetPrivacy`)."""
    device: Device = ""
    """The device this session is (the one asked for, or the one the server named);
    the token is this device's."""


class Logout(Packet, type=105):
    pass


class ListOnline(Packet, type=106):
    watch: bool = False
    """Also push a :class:`Presence` whenever a user comes online or goes offline."""


class OnlineUsers(Packet, type=107):
    users: list[dict[str, Any]]
    """Each ``{"id": int, "name": str}``, ordered by id."""


class SendP2P(Packet, type=110):
    to: int
    text: Text
    client_msg_id: ClientMsgId = ""
    """The sender's id for this message: a retry with the same id is not stored twice."""
    reply_to: int = 0
    """The id of a message of the same conversation this one answers (0: none)."""
    type: MsgType = TEXT
    """"text", "file", "image" or a type the server's application registered
    (else ``bad_type``); ``text`` is then the fallback an old client shows."""
    fields: Fields = field(default_factory=dict)
    """The type's fields, validated by the server (``bad_fields``); empty for text."""


class SendGroup(Packet, type=111):
    group_id: int
    text: Text
    client_msg_id: ClientMsgId = ""
    reply_to: int = 0
    type: MsgType = TEXT
    fields: Fields = field(default_factory=dict)


class SendAck(Packet, type=112):
    """The message is durably stored; ``msg_id`` orders it."""

    msg_id: int
    ts: int
    client_msg_id: ClientMsgId = ""
    duplicate: bool = False
    seq: int = 0
    """Its place in its conversation (1, 2, 3..., no gap); a duplicate has the original's."""


class ChatMessage(Packet, type=113):
    """Push: a chat message. ``to`` is the recipient user id (p2p) or the group id."""

    msg_id: int
    kind: str
    sender_id: int
    sender_name: Name
    to: int
    text: Text
    ts: int
    client_msg_id: ClientMsgId = ""
    seq: int = 0
    """Its place in its conversation (the pair of users, or the group): 1, 2, 3...
    with no gap, in the order the conversation's messages and events were stored."""
    op: str = ""
    """"" for a message; for an event "edit", "recall", "react" or "unreact", which
    changes the message ``target``. Events take seqs like messages (a device that was
    away gets them in its backlog); the sender of a react/unreact is who reacted."""
    target: int = 0
    """An event's message id."""
    type: MsgType = TEXT
    fields: Fields = field(default_factory=dict)
    reply_to: int = 0
    reply: dict[str, Any] | None = None
    """The quoted message as it is now: ``{"msg_id", "sender_id", "sender_name",
    "snippet", "recalled"}`` (null when ``reply_to`` is 0 or the quoted one is gone)."""
    edited_at: int = 0
    """Unix ms of the last edit (0: never edited). An edit event carries the new text."""
    recalled: bool = False
    """The message was recalled: its text and fields are empty (a placeholder)."""
    emoji: Emoji = ""
    """A react/unreact event's emoji."""
    reactions: dict[str, list[int]] = field(default_factory=dict)
    """``{emoji: [user ids]}`` on messages in history and backlog."""
    mentions: list[int] = field(default_factory=list)
    """The user ids ``@name`` in a group message's text named (members at send)."""
    no: int = 0
    """The message's number in its conversation (1, 2, 3...: messages only, events
    have none); unread counts are differences of numbers."""


class Ack(Packet, type=114):
    """This device has the messages: in each of their conversations its cursor moves
    to the largest acked seq, and nothing up to there is pushed to it again (only
    messages pushed on this connection count)."""

    msg_ids: Annotated[list[int], Limit("max_ack_ids")]


class CreateGroup(Packet, type=120):
    name: GroupName


class GroupInfo(Packet, type=121):
    group_id: int
    name: GroupName
    owner_id: int
    members: int
    invite_only: bool = False
    """Joining needs an invite (or an admin's approval of a join request)."""
    history_visible: bool = False
    """A new member sees the group's whole history (else only from the join on)."""
    role: str = ""
    """The asker's role in the group: "owner", "admin", "member", or "" if not a member."""
    pending: bool = False
    """The answer to a join of an invite-only group without an invite: a join request
    is recorded and waits for an admin (:class:`AnswerJoinRequest`)."""


class JoinGroup(Packet, type=122):
    group_id: int
    invite: InviteCode = ""
    """An invite code (:class:`CreateInvite`): lets the user into an invite-only group."""


class LeaveGroup(Packet, type=123):
    group_id: int


class MyGroups(Packet, type=124):
    pass


class GroupList(Packet, type=125):
    groups: Annotated[list[dict[str, Any]], Limit("max_groups_per_user")]
    """Each ``{"id", "name", "owner_id", "members", "role"}`` (``role``: the user's)."""


class GroupMembers(Packet, type=126):
    group_id: int


class MemberList(Packet, type=127):
    group_id: int
    members: Annotated[list[dict[str, Any]], Limit("max_group_size")]
    """Each ``{"id", "name", "online", "last_seen", "role", "muted_until"}``:
    ``last_seen`` is Unix ms for an offline member who shows it, else null; ``role``
    "owner", "admin" or "member"; ``muted_until`` Unix ms, 0 when not muted. Only a
    member may ask (else ``not_member``)."""


class History(Packet, type=130):
    """A page of one conversation, newest first: ``peer_id`` (p2p) or ``group_id``."""

    peer_id: int = 0
    group_id: int = 0
    before: int = 0
    """Only messages with a smaller id; 0 = from the newest."""
    limit: int = 50
    before_seq: int = 0
    """Only messages with a smaller seq, newest (largest seq) first; 0 = no bound. Page
    back with the smallest seq of the last page."""
    after_seq: int = 0
    """Catching up instead: the messages with a larger seq, oldest first (``before``
    and ``before_seq`` are ignored); 0 = unset. Ask again from the largest seq while
    ``more``."""


class HistoryPage(Packet, type=131):
    messages: Annotated[list[dict[str, Any]], Limit("history_max_page")]
    """ChatMessage bodies, newest first (oldest first for ``after_seq``)."""
    more: bool
    """More messages exist past this page: ask again with ``before`` = its last id (or
    ``before_seq`` / ``after_seq`` = its last seq)."""

    def chat_messages(self) -> list[ChatMessage]:
        """The page as typed messages, newest first."""
        return [ChatMessage.from_dict(m) for m in self.messages]


class Presence(Packet, type=140):
    """Push: a user came online or went offline."""

    user_id: int
    name: Name
    online: bool
    last_seen: int = 0
    """When ``online`` is false: Unix ms the user was last seen, 0 if they hide it."""


class SetPrivacy(Packet, type=144):
    """Change the user's privacy settings; answered by :class:`Ok`."""

    show_last_seen: bool = True
    """Whether others see when the user was last seen (member lists, Presence)."""


class Typing(Packet, type=142):
    """The sender is typing in a conversation (``typing``), or stopped: ``to`` (a user)
    or ``group_id``. Never stored; best effort.

    Sent one-way (the usual), nothing comes back unless it is refused (an Error
    with request id 0: ``not_found``, ``not_member``, ``invalid_packet``); sent as a
    request, it is answered with :class:`Ok`. Repeats faster than the server's
    ``typing_interval`` are dropped silently. Repeat ``typing=True`` every few
    seconds while the user types: each one lasts ``typing_timeout`` seconds.
    """

    to: int = 0
    group_id: int = 0
    typing: bool = True


class TypingEvent(Packet, type=143):
    """Push: ``user_id`` is typing (``typing``), or stopped, in a conversation of yours:
    one-to-one (``to`` is you, the conversation is with ``user_id``) or the group
    ``group_id`` (``to`` is 0). A ``typing=True`` lasts ``expires_in`` seconds unless
    repeated; a stop comes at once when the typer stops, logs out or disconnects,
    and a message from the typer in that conversation also means stopped.
    """

    user_id: int
    name: Name
    to: int = 0
    group_id: int = 0
    typing: bool = True
    expires_in: float = 0.0


class GetConversations(Packet, type=160):
    """A page of the user's conversations, most recent activity first."""

    limit: int = 50
    """At most this many (the server caps it at ``conversations_max_page``)."""
    before: int = 0
    """Only conversations whose ``activity`` is smaller: the last one of the page
    before; 0 = from the most recent."""


class ConversationList(Packet, type=161):
    conversations: Annotated[list[dict[str, Any]], Limit("conversations_max_page")]
    """Each ``{"kind": "p2p"|"group", "peer_id", "group_id", "name", "last_seq",
    "read_seq", "unread", "mentions", "peer_read_seq", "peer_delivered_seq", "activity",
    "last_message", "last_no", "read_no"}``: ``peer_id`` (p2p) or ``group_id`` (group,
    else 0); ``name`` is the peer's or the group's; ``unread``: messages (not events)
    after the user's read position, ``last_no - read_no`` (the numbers of the last
    message and of the last one read); ``mentions``: unread messages that mention the user;
    ``peer_read_seq`` / ``peer_delivered_seq`` (p2p, else 0): how far the peer has
    read / has on some device; ``activity``: the id of the last message (or of the
    join, for a group without messages), the paging key; ``last_message``: a
    ChatMessage body or null."""
    more: bool
    """More conversations exist: ask again with ``before`` = the last ``activity``."""


class MarkRead(Packet, type=162):
    """The user has read a conversation up to ``seq`` (0 = its latest message), on
    any device: answered with :class:`ReadState`, which the user's other devices get
    as a push; the sender(s) get a :class:`Receipt`. A read position never moves
    back."""

    peer_id: int = 0
    group_id: int = 0
    seq: int = 0


class ReadState(Packet, type=163):
    """The answer to :class:`MarkRead`, and a push to the user's other devices: the
    user's read position in a conversation moved (``unread`` is what is left)."""

    peer_id: int = 0
    group_id: int = 0
    read_seq: int = 0
    unread: int = 0


class Receipt(Packet, type=164):
    """Push to a sender: ``user_id`` has your messages up to ``seq`` on a device
    (``kind`` "delivered") or has read them (``kind`` "read"); one-to-one (the
    conversation with ``user_id``, ``group_id`` 0) or in ``group_id``. Receipts only
    move forward; best effort (the conversation list and :class:`GetReceipts` have
    the stored state). Groups get "read" receipts only."""

    kind: str
    user_id: int
    name: Name
    seq: int
    group_id: int = 0


class GetReceipts(Packet, type=165):
    """How many members of a group have message ``seq`` on a device, and have read
    it; with ``who``, also which ones (the sender is never counted)."""

    group_id: int
    seq: int
    who: bool = False


class Receipts(Packet, type=166):
    group_id: int
    seq: int
    delivered: int
    read: int
    readers: Annotated[list[dict[str, Any]], Limit("max_group_size")]
    """Empty unless ``who``: then each ``{"id", "name", "read"}`` of the members who have the
    message, ``read`` true for those who read it; ordered by id."""


# Moderation (types 170-189): roles, kick/ban/mute, invite-only groups, blocks.
# Refusals: ``forbidden`` (the asker's role does not allow it), ``not_member``,
# ``not_found`` (no such group or user), ``banned``, ``muted``, ``blocked``,
# ``bad_invite``, ``invalid_packet`` (a value out of range).

OWNER = "owner"
ADMIN = "admin"
MEMBER = "member"
ROLES = (OWNER, ADMIN, MEMBER)
"""A group member's roles, highest first: one owner (the creator, until a transfer)."""


class SetRole(Packet, type=170):
    """The owner makes ``user_id`` (a member) "admin" or "member"; "owner" hands the
    group over (the old owner becomes an admin). Answered with :class:`Ok`."""

    group_id: int
    user_id: int
    role: Annotated[str, Limit("max_name_length")]


class KickMember(Packet, type=171):
    """An admin or the owner removes a member (who may join again); an admin cannot
    kick the owner or another admin. Answered with :class:`Ok`."""

    group_id: int
    user_id: int


class BanMember(Packet, type=172):
    """Ban ``user_id`` (removed if a member; later joins, invites included, fail with
    ``banned``), or with ``ban=False`` lift the ban. Admin or owner; an admin cannot
    ban the owner or another admin. Answered with :class:`Ok`."""

    group_id: int
    user_id: int
    ban: bool = True


class MuteMember(Packet, type=173):
    """Mute a member for ``seconds`` (at most the server's ``max_mute_seconds``): their
    SendGroup fails with ``muted``; 0 unmutes. Admin or owner, same rule as kick.
    Answered with :class:`Ok`."""

    group_id: int
    user_id: int
    seconds: int


class SetGroupOptions(Packet, type=174):
    """Change a group's options (None: unchanged). Admin or owner; answered with
    :class:`GroupInfo`."""

    group_id: int
    invite_only: bool | None = None
    history_visible: bool | None = None


class CreateInvite(Packet, type=175):
    """Make an invite code for a group, answered with :class:`InviteInfo`. In an
    invite-only group only admins and the owner may; in an open group any member."""

    group_id: int
    ttl: int = 0
    """Seconds it stays valid; 0 = the server's ``invite_ttl`` (also the most)."""
    max_uses: int = 0
    """Joins it allows; 0 = unlimited."""


class InviteInfo(Packet, type=176):
    group_id: int
    code: InviteCode
    """Give it to :class:`JoinGroup`'s ``invite`` (``-gjoin group code``)."""
    expires_at: int
    """Unix ms."""
    max_uses: int = 0


class AddMember(Packet, type=177):
    """Add ``user_id`` to the group directly. In an invite-only group only admins and the
    owner may; in an open group any member. Answered with :class:`Ok`."""

    group_id: int
    user_id: int


class GetJoinRequests(Packet, type=178):
    """The join requests waiting in an invite-only group (admin or owner)."""

    group_id: int


class JoinRequestList(Packet, type=179):
    group_id: int
    requests: Annotated[list[dict[str, Any]], Limit("max_join_requests_per_group")]
    """Each ``{"user_id", "name", "ts"}`` (``ts``: Unix ms of the request), oldest first."""


class AnswerJoinRequest(Packet, type=180):
    """Approve (the user joins) or deny a join request. Admin or owner; answered with
    :class:`Ok`."""

    group_id: int
    user_id: int
    approve: bool


class GroupEvent(Packet, type=181):
    """Push: something changed in a group. Sent to its members and to the user it
    concerns (a kicked or banned user learns of it too).

    ``event`` is one of "member_added", "member_removed", "kicked", "banned",
    "unbanned", "muted", "unmuted", "role", "options", "join_requested";
    ``user_id`` is whom it concerns, ``by_id`` who did it (0: the server);
    ``role``: the new role ("role"); ``until``: Unix ms ("muted").
    Membership changes are live pushes, not messages of the conversation: the
    state they report is in :class:`GroupMembers` and :class:`GroupInfo`.
    """

    group_id: int
    event: str
    user_id: int = 0
    by_id: int = 0
    role: str = ""
    until: int = 0
    user_name: Name = ""
    """The name of ``user_id`` (for display)."""
    by_name: Name = ""
    """The name of ``by_id`` ("" for the server)."""


class Block(Packet, type=182):
    """Block ``user_id`` (``block=False`` unblocks): no messages either way between
    the two (``blocked``), and the blocked user sees the blocker offline, without
    last-seen or typing. Groups are not affected. Answered with :class:`Ok`."""

    user_id: int
    block: bool = True


class GetBlocked(Packet, type=183):
    """The users this user blocks."""


class BlockedList(Packet, type=184):
    users: Annotated[list[dict[str, Any]], Limit("max_blocks_per_user")]
    """Each ``{"id", "name"}``, ordered by id."""


# Messages that live (types 190-209): edit, recall, reactions, delete for me.
# Refusals: ``not_found`` (no such message, or not one of your conversations'),
# ``not_member``, ``forbidden`` (someone else's message), ``window_passed``,
# ``recalled``, ``too_many_reactions``, ``invalid_packet``.


class EditMessage(Packet, type=190):
    """Replace the text of your own message (within the server's ``edit_window``):
    answered with :class:`SendAck` (the edit event's id and seq); every device of the
    conversation gets a ChatMessage with ``op`` "edit". Earlier texts are kept for
    the sender (:class:`GetVersions`)."""

    msg_id: int
    text: Text


class RecallMessage(Packet, type=191):
    """Take back your own message (within ``recall_window``; a group's admins and
    owner may recall any message of the group): its text, fields and earlier
    versions are erased; everyone sees a placeholder. Answered with :class:`SendAck`."""

    msg_id: int


class React(Packet, type=192):
    """Add (``on``) or remove an emoji reaction on a message of one of your
    conversations: answered with :class:`SendAck` (the event's)."""

    msg_id: int
    emoji: Emoji
    on: bool = True


class DeleteForMe(Packet, type=193):
    """Hide messages from your own devices only (history, backlog, the conversation
    list); your other devices get a :class:`Hidden` push. Answered with :class:`Ok`."""

    msg_ids: Annotated[list[int], Limit("max_ack_ids")]


class GetVersions(Packet, type=194):
    """The earlier texts of your own message (the sender only, else ``forbidden``)."""

    msg_id: int


class Versions(Packet, type=195):
    msg_id: int
    versions: Annotated[list[dict[str, Any]], Limit("max_versions_per_message")]
    """Each ``{"text", "ts"}`` (``ts``: Unix ms it was replaced), oldest first."""


class GetReactions(Packet, type=196):
    """Who reacted with what to a message of one of your conversations."""

    msg_id: int


class ReactionList(Packet, type=197):
    msg_id: int
    reactions: Annotated[list[dict[str, Any]], Limit("max_reactions_per_message")]
    """Each ``{"emoji", "users": [{"id", "name"}]}``, emoji in the order first used."""


class Hidden(Packet, type=198):
    """Push to the user's own devices: these messages were deleted for the user."""

    msg_ids: Annotated[list[int], Limit("max_ack_ids")]
