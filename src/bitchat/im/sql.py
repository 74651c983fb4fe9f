"""The SQL both message stores share: the schema, the queries, the row mapping.

SQLite (:mod:`bitchat.im.sqlite`) and PostgreSQL (:mod:`bitchat.cluster.pg`)
keep the same tables (:data:`SCHEMA`, checked against each database by the
tests) and ask them the same questions. A query is written once here, in the
SQL both understand, with ``:name`` parameters and ``GREATEST``/``LEAST``;
:func:`render` turns it into each driver's form (SQLite's own ``:name`` and
scalar ``max``/``min``; asyncpg's ``$1, $2...``). What differs stays in the
stores: how a batch is sent (SQLite rows of ``VALUES``, PostgreSQL arrays
through ``unnest``), each driver's errors, and the migrations already released
in each dialect. The batching itself (numbering, dedup, read offsets, cursor
moves) is in :mod:`bitchat.im.centers`.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from bitchat.im.centers import Conversation, Message, conversation
from bitchat.im.ids import MAX_NODE, SEQ_BITS
from bitchat.webhooks import MESSAGE_EDITED, MESSAGE_RECALLED, MESSAGE_STORED


class Dialect(enum.Enum):
    SQLITE = "sqlite"
    POSTGRES = "postgres"


SCHEMA: dict[str, tuple[str, ...]] = {
    "schema_version": ("version",),
    "users": (
        "id",
        "name",
        "password_hash",
        "created_at",
        "name_key",
        "name_shape",
        "last_seen",
        "show_last_seen",
        "banned_at",
    ),
    "tokens": ("digest", "user_id", "expires_at", "device_id"),
    "devices": ("id", "user_id", "name", "created_at", "last_seen"),
    "groups": ("id", "name", "owner_id", "created_at", "invite_only", "history_visible"),
    "group_members": (
        "group_id",
        "user_id",
        "joined_at",
        "read_seq",
        "start_seq",
        "joined_id",
        "role",
        "muted_until",
    ),
    "group_bans": ("group_id", "user_id", "by_id", "created_at"),
    "group_invites": ("code", "group_id", "created_by", "created_at", "expires_at", "uses_left"),
    "group_requests": ("group_id", "user_id", "created_at"),
    "blocks": ("user_id", "blocked_id", "created_at"),
    "messages": (
        "id",
        "kind",
        "conv",
        "sender_id",
        "sender_name",
        "to_id",
        "text",
        "ts",
        "client_msg_id",
        "seq",
        "device",
        "op",
        "target",
        "type",
        "fields",
        "reply_to",
        "edited_at",
        "recalled",
        "reacts",
        "mentions",
        "no",
    ),
    "mentions": ("user_id", "conv", "seq"),
    "message_versions": ("msg_id", "version", "text", "ts"),
    "reactions": ("msg_id", "user_id", "emoji", "ts"),
    "hidden": ("user_id", "msg_id", "ts"),
    "conversations": (
        "conv",
        "last_seq",
        "lo",
        "hi",
        "last_id",
        "lo_read",
        "hi_read",
        "last_no",
    ),
    "cursors": ("user_id", "conv", "device", "seq"),
    "external_users": ("provider", "subject", "user_id", "created_at"),
    "files": (
        "id",
        "owner_id",
        "name",
        "size",
        "content_type",
        "width",
        "height",
        "has_thumbnail",
        "thumbnail_type",
        "created_at",
    ),
    "file_refs": ("file_id", "conv", "msg_id"),
    "file_chunks": ("file_id", "n", "data"),
    "webhook_outbox": (
        "id",
        "event_id",
        "endpoint",
        "type",
        "order_key",
        "body",
        "created_at",
        "state",
        "attempts",
        "next_at",
        "last_error",
    ),
}
"""Every table of the current schema version and its columns, in both stores."""

SCHEMA_VERSION = 11

_PARAM = re.compile(r"(?<![:\w]):([a-z_]+)")


@functools.cache
def _render(sql: str, dialect: Dialect) -> tuple[str, tuple[str, ...]]:
    if dialect is Dialect.SQLITE:
        return sql.replace("GREATEST(", "max(").replace("LEAST(", "min("), ()
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAM.sub(number, sql), tuple(names)


def render(sql: str, dialect: Dialect, params: Mapping[str, Any]) -> tuple[str, Any]:
    """The statement and its arguments for ``dialect``'s driver: a mapping for
    SQLite, a list in ``$n`` order for asyncpg."""
    text, names = _render(sql, dialect)
    if dialect is Dialect.SQLITE:
        return text, params
    return text, [params[n] for n in names]


EXTERNAL_USER = (
    "SELECT u.id, u.name FROM external_users e JOIN users u ON u.id = e.user_id "
    "WHERE e.provider = :p AND e.subject = :s"
)
"""The user an external identity maps to (provider :p, subject :s)."""
NO_PASSWORD = ""
"""The password hash of a user an external login created: no password matches it."""


# -- row mapping ----------------------------------------------------------------------------

MSG_COLUMNS = (
    "id",
    "kind",
    "sender_id",
    "sender_name",
    "to_id",
    "text",
    "ts",
    "client_msg_id",
    "seq",
    "device",
    "conv",
    "op",
    "target",
    "type",
    "fields",
    "reply_to",
    "edited_at",
    "recalled",
    "reacts",
    "mentions",
    "no",
)
"""A message row, in the order of :class:`~bitchat.im.centers.Message`'s fields."""
INSERT_COLUMNS = (
    "id, kind, conv, sender_id, sender_name, to_id, text, ts, client_msg_id, seq, device, "
    "op, target, type, fields, reply_to, edited_at, mentions, no"
)
"""The columns a store's batch insert writes, in this order (19)."""
_M = ", ".join("m." + c for c in MSG_COLUMNS)


def message(row: Sequence[Any]) -> Message:
    """A message from the columns of :data:`MSG_COLUMNS` (a tuple or a record)."""
    return Message(*row[: len(MSG_COLUMNS)])


def conversation_row(row: Sequence[Any]) -> Conversation:
    """A conversation from a row of :data:`CONVERSATIONS`."""
    kind, peer, group_id, name, last_seq, read_seq, peer_read, peer_delivered, activity = row[:9]
    mentioned, last_no, read_no = row[9:12]
    last = row[12:]
    return Conversation(
        kind,
        peer,
        group_id,
        name,
        last_seq,
        read_seq,
        peer_read,
        peer_delivered,
        activity,
        message(last) if last[0] is not None else None,
        int(mentioned),
        int(last_no),
        int(read_no),
    )


# -- queries --------------------------------------------------------------------------------

# The conversations of user :u: each with its last seq, the user's read position, where
# a device without a cursor there starts (0 for a pair; a group: the user's join), the
# peer (0 for a group) or the group (0 for a pair), the activity (the last message's id,
# or a group's join), and the peer's read position (0 for a group).
USER_CONVS = (
    "SELECT c.conv AS conv, c.last_seq AS last_seq, "
    "CASE WHEN c.lo = :u THEN c.lo_read ELSE c.hi_read END AS read_seq, "
    "0 AS start_seq, CASE WHEN c.lo = :u THEN c.hi ELSE c.lo END AS peer, 0 AS grp, "
    "c.last_id AS activity, "
    "CASE WHEN c.lo = :u THEN c.hi_read ELSE c.lo_read END AS peer_read, "
    "c.last_no AS last_no "
    "FROM conversations c WHERE c.lo = :u OR c.hi = :u "
    "UNION ALL "
    "SELECT 'g:' || gm.group_id, COALESCE(c.last_seq, 0), gm.read_seq, gm.start_seq, 0, "
    "gm.group_id, GREATEST(COALESCE(c.last_id, 0), gm.joined_id), 0, COALESCE(c.last_no, 0) "
    "FROM group_members gm LEFT JOIN conversations c ON c.conv = 'g:' || gm.group_id "
    "WHERE gm.user_id = :u"
)

# What device :d of user :u misses: every message past its cursor in each conversation
# (or past where it starts there), but those it sent itself (_NOT_OWN).
_PAST_CURSORS = (
    "FROM (" + USER_CONVS + ") x "
    "LEFT JOIN cursors k ON k.user_id = :u AND k.conv = x.conv AND k.device = :d "
    "JOIN messages m ON m.conv = x.conv AND m.seq > GREATEST(x.start_seq, COALESCE(k.seq, 0)) "
    "WHERE x.last_seq > GREATEST(x.start_seq, COALESCE(k.seq, 0))"
)
_NOT_OWN = " AND NOT (m.sender_id = :u AND m.device = :d)"
_AFTER = " AND m.id > :after ORDER BY m.id LIMIT :limit"
PENDING = f"SELECT {_M} {_PAST_CURSORS}{_NOT_OWN}{_AFTER}"
# The same with the device's own messages among them (a sync notes that it has those).
PENDING_WITH_OWN = f"SELECT {_M} {_PAST_CURSORS}{_AFTER}"

# Where device :d of user :u is in each of the user's conversations (its cursor, or where
# it starts there): a sync pushes from there on.
DEVICE_CURSORS = (
    "SELECT x.conv, GREATEST(x.start_seq, COALESCE(k.seq, 0)), x.last_seq "
    "FROM (" + USER_CONVS + ") x "
    "LEFT JOIN cursors k ON k.user_id = :u AND k.conv = x.conv AND k.device = :d"
)
COUNT_PENDING = f"SELECT count(*) {_PAST_CURSORS}{_NOT_OWN}"

# A new device of :u: a cursor in each conversation, at the read position.
START_DEVICE = (
    "INSERT INTO cursors (user_id, conv, device, seq) "
    "SELECT :u, x.conv, :d, x.read_seq FROM (" + USER_CONVS + ") x WHERE x.conv IS NOT NULL "
    "ON CONFLICT (user_id, conv, device) DO NOTHING"
)

# The list, newest activity first, below :before unless it is 0; the peer's delivered
# position is the furthest of their read position and their devices' cursors.
CONVERSATIONS = (
    "SELECT CASE WHEN x.grp = 0 THEN 'p2p' ELSE 'group' END, x.peer, x.grp, "
    "COALESCE(u.name, g.name, ''), x.last_seq, x.read_seq, x.peer_read, "
    "CASE WHEN x.grp = 0 THEN GREATEST(x.peer_read, COALESCE((SELECT max(k.seq) "
    "FROM cursors k WHERE k.user_id = x.peer AND k.conv = x.conv), 0)) ELSE 0 END, "
    "x.activity, CASE WHEN x.grp = 0 THEN 0 ELSE (SELECT count(*) FROM mentions mm "
    "WHERE mm.user_id = :u AND mm.conv = x.conv AND mm.seq > x.read_seq) END, "
    # The number at the read position: one index probe (unread = last_no - that).
    "x.last_no, COALESCE((SELECT r.no FROM messages r WHERE r.conv = x.conv "
    "AND r.seq = x.read_seq), 0), "
    f"{_M} "
    "FROM (" + USER_CONVS + ") x "
    "LEFT JOIN users u ON x.grp = 0 AND u.id = x.peer "
    "LEFT JOIN groups g ON x.grp != 0 AND g.id = x.grp "
    # The last message (not an event, nor one the user deleted): back from the newest.
    "LEFT JOIN messages m ON x.last_seq > 0 AND m.id = (SELECT l.id FROM messages l "
    "WHERE l.conv = x.conv AND l.op = '' AND NOT EXISTS (SELECT 1 FROM hidden h "
    "WHERE h.user_id = :u AND h.msg_id = l.id) ORDER BY l.id DESC LIMIT 1) "
    "WHERE CAST(:before AS BIGINT) = 0 OR x.activity < CAST(:before AS BIGINT) "
    "ORDER BY x.activity DESC, x.conv LIMIT :limit"
)

# Read positions: the user's in a pair (:c), or in a group (:g); then moved (never back,
# never past the last message; :seq 0 = the last).
P2P_READ = (
    "SELECT CASE WHEN lo = :u THEN lo_read ELSE hi_read END FROM conversations WHERE conv = :c"
)
_TARGET = (
    "CASE WHEN CAST(:seq AS BIGINT) <= 0 THEN last_seq "
    "ELSE LEAST(CAST(:seq AS BIGINT), last_seq) END"
)
P2P_MARK_READ = (
    "UPDATE conversations SET "
    f"lo_read = CASE WHEN lo = :u THEN GREATEST(lo_read, {_TARGET}) ELSE lo_read END, "
    f"hi_read = CASE WHEN hi = :u THEN GREATEST(hi_read, {_TARGET}) ELSE hi_read END "
    "WHERE conv = :c RETURNING CASE WHEN lo = :u THEN lo_read ELSE hi_read END, last_seq"
)
GROUP_READ = "SELECT read_seq FROM group_members WHERE group_id = :g AND user_id = :u"
LAST_SEQ = "SELECT last_seq FROM conversations WHERE conv = :c"
GROUP_MARK_READ = (
    "UPDATE group_members SET read_seq = GREATEST(read_seq, "
    "CASE WHEN CAST(:seq AS BIGINT) <= 0 THEN CAST(:last AS BIGINT) "
    "ELSE LEAST(CAST(:seq AS BIGINT), CAST(:last AS BIGINT)) END) "
    "WHERE group_id = :g AND user_id = :u RETURNING read_seq"
)
# Who else wrote what was just read (they get a read receipt).
SENDERS_BETWEEN = (
    "SELECT DISTINCT sender_id FROM messages WHERE conv = :c AND seq > :after "
    "AND seq <= :upto AND sender_id != :u"
)

# Members of group :g (not the sender of message :s, nor those who joined after it)
# who have it on a device or have read it.
RECEIPTS = (
    "SELECT gm.user_id, CASE WHEN gm.read_seq >= :s THEN 1 ELSE 0 END FROM group_members gm "
    "WHERE gm.group_id = :g AND gm.start_seq < :s "
    "AND gm.user_id != COALESCE((SELECT sender_id FROM messages WHERE conv = :c AND seq = :s), 0) "
    "AND (gm.read_seq >= :s OR EXISTS (SELECT 1 FROM cursors k "
    "WHERE k.user_id = gm.user_id AND k.conv = :c AND k.seq >= :s)) "
    "ORDER BY gm.user_id"
)

# History of one conversation :c: newest first below an id, or below a seq; or after a seq,
# oldest first.
_COLS = ", ".join(MSG_COLUMNS)
# A member's history (:floor) starts where the member does: at the join, unless the group's
# history was visible then.
# Messages the user deleted for themselves are left out of their history (a sync reads
# them, to move the device's cursor over them, and does not push them: see IMService._sync).
_HIDDEN_HERE = (
    " AND NOT EXISTS (SELECT 1 FROM hidden h WHERE h.user_id = :u AND h.msg_id = messages.id)"
)
HISTORY_BY_ID = (
    f"SELECT {_COLS} FROM messages WHERE conv = :c AND id < :before AND seq > :floor"
    f"{_HIDDEN_HERE} ORDER BY id DESC LIMIT :limit"
)
HISTORY_BEFORE_SEQ = (
    f"SELECT {_COLS} FROM messages WHERE conv = :c AND seq < :seq AND id < :before "
    f"AND seq > :floor{_HIDDEN_HERE} ORDER BY seq DESC LIMIT :limit"
)
HISTORY_AFTER_SEQ = (
    f"SELECT {_COLS} FROM messages WHERE conv = :c AND seq > :seq ORDER BY seq LIMIT :limit"
)
HISTORY_AFTER_SEQ_FLOOR = (
    f"SELECT {_COLS} FROM messages WHERE conv = :c "
    "AND seq > GREATEST(CAST(:seq AS BIGINT), CAST(:floor AS BIGINT))"
    f"{_HIDDEN_HERE} ORDER BY seq LIMIT :limit"
)
# Where member :u of group :g starts (History shows a member no message before it).
MEMBER_START = "SELECT start_seq FROM group_members WHERE group_id = :g AND user_id = :u"
# A leaving owner's group :g goes to the first admin, else the first member to join.
SUCCESSOR = (
    "UPDATE groups SET owner_id = (SELECT user_id FROM group_members WHERE group_id = :g "
    "ORDER BY CASE WHEN role = 'admin' THEN 0 ELSE 1 END, joined_id, user_id LIMIT 1) "
    "WHERE id = :g AND EXISTS (SELECT 1 FROM group_members WHERE group_id = :g)",
    "UPDATE group_members SET role = 'owner' WHERE group_id = :g "
    "AND user_id = (SELECT owner_id FROM groups WHERE id = :g)",
)
# The newest id a node issued (ids of one node share bits 12-21).
LAST_ID = "SELECT id FROM messages WHERE ((id >> :shift) & :mask) = :node ORDER BY id DESC LIMIT 1"


# -- the webhook outbox (bitchat.webhooks) ----------------------------------------------------

# One row per event and endpoint (bitchat.webhooks.OutboxRow; each store inserts them in
# its own way): each endpoint has its own attempts, next try and dead letter, and a
# claim takes rows, not parts of rows.
# The rows due whose endpoint has no earlier row of the same order key pending (that
# is the order per conversation), in id order (the commit order of one key); each
# claimed is leased (next_at moves to :lease) while it is being delivered.
_CLAIMABLE = (
    "SELECT o.id FROM webhook_outbox o WHERE o.state = 'pending' AND o.next_at <= :now "
    "AND o.endpoint {endpoints} AND NOT EXISTS (SELECT 1 FROM webhook_outbox p "
    "WHERE p.state = 'pending' AND p.endpoint = o.endpoint AND p.order_key = o.order_key "
    "AND p.id < o.id) ORDER BY o.id LIMIT :limit"
)
_CLAIMED = "RETURNING id, event_id, endpoint, type, body, attempts"
OUTBOX_CLAIM_SQLITE = (
    "UPDATE webhook_outbox SET next_at = :lease WHERE id IN ("
    + _CLAIMABLE.format(endpoints="IN (SELECT value FROM json_each(:endpoints))")
    + ") "
    + _CLAIMED
)
# Several nodes share the work: a row another node is claiming is skipped, not waited for.
OUTBOX_CLAIM_POSTGRES = (
    "UPDATE webhook_outbox SET next_at = :lease WHERE id IN ("
    + _CLAIMABLE.format(endpoints="= ANY(CAST(:endpoints AS TEXT[]))")
    + " FOR UPDATE SKIP LOCKED) "
    + _CLAIMED
)
OUTBOX_DELIVERED = "DELETE FROM webhook_outbox WHERE id = :id"
OUTBOX_RETRY = (
    "UPDATE webhook_outbox SET attempts = :attempts, next_at = :next_at, last_error = :error "
    "WHERE id = :id AND state = 'pending'"
)
OUTBOX_DEAD = (
    "UPDATE webhook_outbox SET state = 'dead', attempts = :attempts, next_at = :next_at, "
    "last_error = :error WHERE id = :id AND state = 'pending'"
)
OUTBOX_DEAD_LETTERS = (
    "SELECT id, event_id, endpoint, type, attempts, last_error, created_at, next_at, body "
    "FROM webhook_outbox WHERE state = 'dead' ORDER BY id LIMIT :limit"
)
"""The dead letters, oldest first (``next_at``: when the event died)."""
OUTBOX_REPLAY = (
    "UPDATE webhook_outbox SET state = 'pending', attempts = 0, next_at = 0, last_error = '' "
    "WHERE state = 'dead' AND (CAST(:id AS BIGINT) = 0 OR id = CAST(:id AS BIGINT)) "
    "RETURNING id"
)
"""Dead letters back to pending (:id, or all of them with 0)."""
OUTBOX_PENDING = "SELECT count(*) FROM webhook_outbox WHERE state = 'pending'"


# -- messages that live (issue 12) ------------------------------------------------------------

# One message (:id) with what the edit/recall/react checks need.
TARGET = f"SELECT {_COLS} FROM messages WHERE id = :id AND op = ''"
VERSIONS = "SELECT text, ts FROM message_versions WHERE msg_id = :id ORDER BY version"
REACTIONS_OF = "SELECT emoji, user_id FROM reactions WHERE msg_id = :id ORDER BY ts, user_id"
HAS_REACTION = "SELECT count(*) FROM reactions WHERE msg_id = :id AND emoji = :e"
UNREAD = (
    "SELECT c.last_no - COALESCE((SELECT r.no FROM messages r WHERE r.conv = :c "
    "AND r.seq = :s), 0) FROM conversations c WHERE c.conv = :c"
)
MENTION = "INSERT INTO mentions (user_id, conv, seq) VALUES (:u, :c, :s) ON CONFLICT DO NOTHING"
HIDDEN_OF = "SELECT msg_id FROM hidden WHERE user_id = :u ORDER BY ts DESC LIMIT :limit"
HIDE = (
    "INSERT INTO hidden (user_id, msg_id, ts) VALUES (:u, :id, :ts) "
    "ON CONFLICT (user_id, msg_id) DO NOTHING"
)
# What a page's messages add: the reactions of those with some, the messages they quote.
_IDS = {
    Dialect.SQLITE: "IN (SELECT value FROM json_each(:ids))",
    Dialect.POSTGRES: "= ANY(CAST(:ids AS BIGINT[]))",
}
PAGE_REACTIONS = {
    d: f"SELECT msg_id, emoji, user_id FROM reactions WHERE msg_id {w} ORDER BY ts, user_id"
    for d, w in _IDS.items()
}
PAGE_QUOTED = {
    d: f"SELECT id, sender_id, sender_name, text, recalled FROM messages WHERE id {w}"
    for d, w in _IDS.items()
}

# The statements an event runs in the transaction that stores its row (:t its target,
# :text the new text or the emoji, :u who, :ts when); see event_statements.
_EDIT = (
    "INSERT INTO message_versions (msg_id, version, text, ts) "
    "SELECT id, COALESCE((SELECT max(version) FROM message_versions WHERE msg_id = :t), 0) + 1, "
    "text, CAST(:ts AS BIGINT) FROM messages WHERE id = :t AND recalled = 0",
    "UPDATE messages SET text = :text, edited_at = :ts WHERE id = :t AND recalled = 0",
    # Every edit event of the message carries its current text (a device that was away
    # replays them all and ends on the latest).
    "UPDATE messages SET text = :text WHERE target = :t AND op = 'edit' AND target != 0",
    "DELETE FROM message_versions WHERE msg_id = :t AND version <= "
    "(SELECT max(version) FROM message_versions WHERE msg_id = :t) - CAST(:keep AS BIGINT)",
)
_RECALL = (
    "UPDATE messages SET text = '', fields = '', recalled = 1 WHERE id = :t",
    "UPDATE messages SET text = '' WHERE target = :t AND op = 'edit' AND target != 0",
    "DELETE FROM message_versions WHERE msg_id = :t",
)
_COUNT_REACTS = (
    "UPDATE messages SET reacts = (SELECT count(DISTINCT emoji) FROM reactions "
    "WHERE msg_id = :t) WHERE id = :t"
)
_REACT = (
    "INSERT INTO reactions (msg_id, user_id, emoji, ts) VALUES (:t, :u, :text, :ts) "
    "ON CONFLICT (msg_id, user_id, emoji) DO NOTHING",
    _COUNT_REACTS,
)
_UNREACT = (
    "DELETE FROM reactions WHERE msg_id = :t AND user_id = :u AND emoji = :text",
    _COUNT_REACTS,
)
EVENT_STATEMENTS = {"edit": _EDIT, "recall": _RECALL, "react": _REACT, "unreact": _UNREACT}


def event_statements(m: Message, keep_versions: int) -> list[tuple[str, dict[str, Any]]]:
    """The statements event ``m`` runs with its row (for a message: its mentions)."""
    if not m.op:
        conv = m.conversation_key
        return [(MENTION, {"u": u, "c": conv, "s": m.seq}) for u in json.loads(m.mentions or "[]")]
    params = {"t": m.target, "text": m.text, "u": m.sender_id, "ts": m.ts, "keep": keep_versions}
    out = []
    for statement in EVENT_STATEMENTS[m.op]:
        used = {k: v for k, v in params.items() if f":{k}" in statement}
        out.append((statement, used))
    return out


_WEBHOOK_EVENTS = {"": MESSAGE_STORED, "edit": MESSAGE_EDITED, "recall": MESSAGE_RECALLED}


def webhook_event(m: Message) -> str:
    """The webhook event a stored row is ("" for reactions: none)."""
    return _WEBHOOK_EVENTS.get(m.op, "")


def snippet(text: str, most: int = 80) -> str:
    """The start of a quoted message's text."""
    return text if len(text) <= most else text[: most - 1] + "…"


class SqlReads:
    """The reads both message stores answer the same way: each store gives only
    :meth:`_read` (its driver, its connection, its errors) and inherits these."""

    DIALECT: Dialect = Dialect.SQLITE

    def _ids(self, ids: Sequence[int]) -> Any:
        if self.DIALECT is Dialect.SQLITE:
            return "[" + ",".join(str(int(i)) for i in ids) + "]"
        return list(ids)

    async def enrich(self, msgs: list[Message]) -> list[Message]:
        """Add to messages read what lives beside their rows: their reactions and the
        message each quotes (as it is now). No query unless a message of the page has
        reactions or quotes one."""
        reacted = [m.id for m in msgs if m.reacts]
        quoting = sorted({m.reply_to for m in msgs if m.reply_to})
        if not reacted and not quoting:
            return msgs
        by_msg: dict[int, dict[str, list[int]]] = {}
        if reacted:
            rows = await self._read(
                "reading reactions", PAGE_REACTIONS[self.DIALECT], ids=self._ids(reacted)
            )
            for msg_id, emoji, user_id in rows:
                by_msg.setdefault(int(msg_id), {}).setdefault(str(emoji), []).append(int(user_id))
        quoted: dict[int, dict[str, Any]] = {}
        if quoting:
            rows = await self._read(
                "reading quoted messages", PAGE_QUOTED[self.DIALECT], ids=self._ids(quoting)
            )
            for qid, sender_id, sender_name, text, recalled in rows:
                quoted[int(qid)] = {
                    "msg_id": int(qid),
                    "sender_id": int(sender_id),
                    "sender_name": str(sender_name),
                    "snippet": "" if recalled else snippet(str(text)),
                    "recalled": bool(recalled),
                }
        for m in msgs:
            extra: dict[str, Any] = {}
            if m.id in by_msg:
                extra["reactions"] = by_msg[m.id]
            if m.reply_to:
                extra["reply"] = quoted.get(m.reply_to)
            if extra:
                m.extra = extra
        return msgs

    async def target(self, msg_id: int) -> Message | None:
        """A message (not an event), as it is now."""
        rows = await self._read("reading a message", TARGET, id=msg_id)
        return message(rows[0]) if rows else None

    async def versions(self, msg_id: int) -> list[tuple[str, int]]:
        rows = await self._read("reading versions", VERSIONS, id=msg_id)
        return [(str(r[0]), int(r[1])) for r in rows]

    async def reactions(self, msg_id: int) -> list[tuple[str, int]]:
        rows = await self._read("reading reactions", REACTIONS_OF, id=msg_id)
        return [(str(r[0]), int(r[1])) for r in rows]

    async def has_reaction(self, msg_id: int, emoji: str) -> bool:
        rows = await self._read("reading reactions", HAS_REACTION, id=msg_id, e=emoji)
        return bool(rows[0][0])

    async def member_floor(self, group_id: int, user_id: int) -> int:
        rows = await self._read("reading a member's start", MEMBER_START, g=group_id, u=user_id)
        return int(rows[0][0]) if rows else 0

    async def unread(self, conv: str, read_seq: int) -> int:
        rows = await self._read("counting unread messages", UNREAD, c=conv, s=read_seq)
        return max(0, int(rows[0][0])) if rows else 0

    async def hidden_of(self, user_id: int, limit: int) -> list[int]:
        """The user's most recently hidden messages."""
        rows = await self._read("reading hidden messages", HIDDEN_OF, u=user_id, limit=limit)
        return [int(r[0]) for r in rows]

    async def hide(self, user_id: int, msg_ids: Sequence[int], ts: int) -> None:
        for msg_id in msg_ids:
            await self._read(
                "hiding a message", HIDE + " RETURNING msg_id", u=user_id, id=msg_id, ts=ts
            )

    async def _read(self, doing: str, query: str, **params: Any) -> Sequence[Sequence[Any]]:
        """The rows of ``query`` (this module's SQL), ``doing`` naming it in errors."""
        raise NotImplementedError

    async def pending(
        self, user_id: int, device_id: int, after_id: int, limit: int, own: bool = False
    ) -> list[Message]:
        query = PENDING_WITH_OWN if own else PENDING
        rows = await self._read(
            "reading offline messages", query, u=user_id, d=device_id, after=after_id, limit=limit
        )
        return await self.enrich([message(r) for r in rows])

    async def count_pending(self, user_id: int, device_id: int) -> int:
        rows = await self._read("counting offline messages", COUNT_PENDING, u=user_id, d=device_id)
        return int(rows[0][0])

    async def positions(self, user_id: int, device_id: int) -> dict[str, tuple[int, int]]:
        rows = await self._read(
            "reading a device's cursors", DEVICE_CURSORS, u=user_id, d=device_id
        )
        return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}

    async def messages_after(self, conv: str, after_seq: int, limit: int) -> list[Message]:
        rows = await self._read(
            "reading offline messages", HISTORY_AFTER_SEQ, c=conv, seq=after_seq, limit=limit
        )
        return await self.enrich([message(r) for r in rows])

    async def conversations(self, user_id: int, before: int, limit: int) -> list[Conversation]:
        rows = await self._read(
            "reading conversations", CONVERSATIONS, u=user_id, before=before, limit=limit
        )
        return [conversation_row(r) for r in rows]

    async def receipts(self, group_id: int, seq: int) -> list[tuple[int, bool]]:
        rows = await self._read("reading receipts", RECEIPTS, g=group_id, c=f"g:{group_id}", s=seq)
        return [(int(r[0]), bool(r[1])) for r in rows]

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
        conv = (
            conversation("group", user_id, group_id)
            if group_id
            else conversation("p2p", user_id, peer_id)
        )
        below = before or (1 << 63) - 1
        floor = 0
        if group_id:
            start = await self._read("reading history", MEMBER_START, g=group_id, u=user_id)
            floor = int(start[0][0]) if start else 0
        params: dict[str, Any]
        if after_seq:
            query, params = HISTORY_AFTER_SEQ_FLOOR, {"seq": after_seq}
        elif before_seq:
            query, params = HISTORY_BEFORE_SEQ, {"seq": before_seq, "before": below}
        else:
            query, params = HISTORY_BY_ID, {"before": below}
        rows = await self._read(
            "reading history", query, c=conv, u=user_id, limit=limit, floor=floor, **params
        )
        return await self.enrich([message(r) for r in rows])

    async def last_id(self, node_id: int) -> int:
        rows = await self._read(
            "reading the node's last message id",
            LAST_ID,
            shift=SEQ_BITS,
            mask=MAX_NODE,
            node=node_id,
        )
        return int(rows[0][0]) if rows else 0
