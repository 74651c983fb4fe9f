"""Standalone backends on SQLite, in one database file.

WAL mode; a ``schema_version`` table and numbered migrations. Users, groups and
every read go through aiosqlite. The message center commits in batches (group
commit) on a writer thread of its own, with the standard ``sqlite3`` module:
every store and ack queued while a transaction is being written goes into the
next one, so an ack to the sender still means the message is on disk, without
one fsync per message. (aiosqlite hands each statement to its thread and back;
a whole batch in one hand-off is what made the store keep up with the loop.)

Both SQL backends batch the same way (``AckJob`` and ``take_acks`` in
:mod:`bitchat.im.centers`): a transaction holds at most ``batch_max`` messages
and ``ack_batch_max`` acked ids, and acks wait in a queue of their own, so a
flood of acks spreads over many transactions rather than holding up the
messages of one; and when a batch statement fails for one row's data, its rows
are written again one by one (a savepoint each), so only that row fails.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiosqlite

from bitchat.errors import RequestError, ServiceUnavailable, codes
from bitchat.im import sql
from bitchat.im.centers import (
    NO_BLOCKS,
    AckJob,
    Blocks,
    Group,
    Invite,
    Member,
    Message,
    MessageCenter,
    StoreCallback,
    User,
    UserCenter,
    conversation,
    conversation_counts,
    first_of_each,
    id_order,
    make_blocks,
    message_counts,
    number,
    p2p_pair,
    read_offsets,
    refused,
    take_acks,
)
from bitchat.im.ids import EPOCH_MS, join_id
from bitchat.im.names import dedupe_keys, name_key, name_keys, taken
from bitchat.im.passwords import Passwords, new_token, token_digest
from bitchat.webhooks import (
    MEMBER_ADDED,
    MEMBER_REMOVED,
    MESSAGE_STORED,
    Outbox,
    OutboxRow,
    group_key,
    member_data,
)

if TYPE_CHECKING:
    from argon2 import PasswordHasher

log = logging.getLogger("bitchat.sqlite")


async def _add_name_keys(db: aiosqlite.Connection) -> None:
    """Every user's name_key and name_shape (bitchat.im.names), each UNIQUE. Existing
    users that collide all stay: the later ones' keys get a suffix (dedupe_keys)."""
    await db.execute("ALTER TABLE users ADD COLUMN name_key TEXT")
    await db.execute("ALTER TABLE users ADD COLUMN name_shape TEXT")
    rows = [
        (int(r[0]), str(r[1]))
        for r in await db.execute_fetchall("SELECT id, name FROM users ORDER BY id")
    ]
    await db.executemany(
        "UPDATE users SET name_key = ?, name_shape = ? WHERE id = ?",
        [(key, shape, user_id) for user_id, key, shape in dedupe_keys(rows)],
    )
    # Nullable (SQLite adds no NOT NULL column to a filled table); every insert sets them.
    await db.execute("CREATE UNIQUE INDEX users_key_unique ON users(name_key)")
    await db.execute("CREATE UNIQUE INDEX users_shape_unique ON users(name_shape)")


async def _devices_and_cursors(db: aiosqlite.Connection) -> None:
    """Version 5: devices, a cursor per device and conversation, read positions; the
    pending rows become read positions (just before each user's first pending message
    of a conversation), so the first device to log in gets every one of them."""
    for statement in (
        "CREATE TABLE devices ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " user_id INTEGER NOT NULL REFERENCES users(id),"
        " name TEXT NOT NULL, created_at REAL NOT NULL, last_seen REAL NOT NULL,"
        " UNIQUE (user_id, name))",
        "ALTER TABLE tokens ADD COLUMN device_id INTEGER",
        "ALTER TABLE messages ADD COLUMN device INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE conversations ADD COLUMN lo INTEGER",
        "ALTER TABLE conversations ADD COLUMN hi INTEGER",
        "ALTER TABLE conversations ADD COLUMN last_id INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE conversations ADD COLUMN lo_read INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE conversations ADD COLUMN hi_read INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE group_members ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE group_members ADD COLUMN start_seq INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE group_members ADD COLUMN joined_id INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE cursors ("
        " user_id INTEGER NOT NULL, conv TEXT NOT NULL, device INTEGER NOT NULL,"
        " seq INTEGER NOT NULL, PRIMARY KEY (user_id, conv, device)) WITHOUT ROWID",
        "UPDATE conversations SET last_id = "
        "(SELECT max(id) FROM messages m WHERE m.conv = conversations.conv)",
    ):
        await db.execute(statement)
    rows = await db.execute_fetchall("SELECT conv FROM conversations WHERE conv LIKE 'p:%'")
    pairs = []
    for (conv,) in rows:
        _, lo, hi = str(conv).split(":")
        pairs.append((int(lo), int(hi), conv))
    await db.executemany("UPDATE conversations SET lo = ?, hi = ? WHERE conv = ?", pairs)
    first_pending = (
        "(SELECT min(m.seq) - 1 FROM pending p JOIN messages m ON m.id = p.msg_id "
        "WHERE p.user_id = {user} AND m.conv = {conv})"
    )
    for side in ("lo", "hi"):
        await db.execute(
            f"UPDATE conversations SET {side}_read = coalesce("
            + first_pending.format(user=f"conversations.{side}", conv="conversations.conv")
            + ", last_seq) WHERE lo IS NOT NULL"
        )
    group_conv = "'g:' || group_members.group_id"
    await db.execute(
        "UPDATE group_members SET read_seq = coalesce("
        + first_pending.format(user="group_members.user_id", conv=group_conv)
        + f", (SELECT last_seq FROM conversations c WHERE c.conv = {group_conv}), 0), "
        f"joined_id = max(0, CAST(joined_at * 1000 AS INTEGER) - {EPOCH_MS}) << 22"
    )
    for statement in (
        "CREATE INDEX conversations_lo ON conversations(lo) WHERE lo IS NOT NULL",
        "CREATE INDEX conversations_hi ON conversations(hi) WHERE hi IS NOT NULL",
        "DROP TABLE pending",
    ):
        await db.execute(statement)


Migration = str | Callable[[aiosqlite.Connection], Awaitable[None]]
"""A script of statements, or a step in Python (given the connection, in the
migration's transaction)."""

MIGRATIONS: list[Migration] = [
    # 1: users, tokens, groups, messages, pending deliveries.
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE tokens (
        digest TEXT PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id),
        expires_at REAL NOT NULL
    );
    CREATE TABLE groups (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        owner_id INTEGER NOT NULL REFERENCES users(id),
        created_at REAL NOT NULL
    );
    CREATE TABLE group_members (
        group_id INTEGER NOT NULL REFERENCES groups(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        joined_at REAL NOT NULL,
        PRIMARY KEY (group_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX group_members_user ON group_members(user_id);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        conv TEXT NOT NULL,
        sender_id INTEGER NOT NULL,
        sender_name TEXT NOT NULL,
        to_id INTEGER NOT NULL,
        text TEXT NOT NULL,
        ts INTEGER NOT NULL,
        client_msg_id TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX messages_conv ON messages(conv, id);
    CREATE UNIQUE INDEX messages_dedup ON messages(sender_id, client_msg_id)
        WHERE client_msg_id != '';
    CREATE TABLE pending (
        user_id INTEGER NOT NULL,
        msg_id INTEGER NOT NULL,
        PRIMARY KEY (user_id, msg_id)
    ) WITHOUT ROWID;
    """,
    # 2: look-alike names are refused (keys of the case fold and the skeleton).
    _add_name_keys,
    # 3: when each user was last seen (Unix ms, none yet), and whether others may know.
    """
    ALTER TABLE users ADD COLUMN last_seen INTEGER;
    ALTER TABLE users ADD COLUMN show_last_seen INTEGER NOT NULL DEFAULT 1;
    """,
    # 4: conversations, each with a gapless sequence of its messages (the stored ones
    # numbered in id order).
    """
    CREATE TABLE conversations (
        conv TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    ALTER TABLE messages ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    UPDATE messages SET seq = r.n FROM (
        SELECT id, ROW_NUMBER() OVER (PARTITION BY conv ORDER BY id) AS n FROM messages
    ) AS r WHERE r.id = messages.id;
    CREATE UNIQUE INDEX messages_seq ON messages(conv, seq);
    INSERT INTO conversations SELECT conv, max(seq) FROM messages GROUP BY conv;
    """,
    # 5: devices and their cursors; read positions (pending rows become them).
    _devices_and_cursors,
    # 6: users of external logins (a JWT's subject, say), each mapped to its user.
    """
    CREATE TABLE external_users (
        provider TEXT NOT NULL,
        subject TEXT NOT NULL,
        user_id INTEGER NOT NULL REFERENCES users(id),
        created_at REAL NOT NULL,
        PRIMARY KEY (provider, subject)
    ) WITHOUT ROWID;
    CREATE INDEX external_users_user ON external_users(user_id);
    """,
    # 7: server-wide bans (Unix ms of the ban; 0: not banned), set by the server API.
    """
    ALTER TABLE users ADD COLUMN banned_at INTEGER NOT NULL DEFAULT 0;
    """,
    # 8: the webhook outbox: one row per event and endpoint, written with the event.
    """
    CREATE TABLE webhook_outbox (
        id INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        type TEXT NOT NULL,
        order_key TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox(next_at) WHERE state = 'pending';
    CREATE INDEX webhook_outbox_order ON webhook_outbox(endpoint, order_key, id)
        WHERE state = 'pending';
    CREATE INDEX webhook_outbox_dead ON webhook_outbox(id) WHERE state = 'dead';
    """,
    # 9: moderation: member roles and mutes, group options, bans, invites, join
    # requests, blocks (times in Unix ms; by_id/created_by 0 is the server API).
    """
    ALTER TABLE group_members ADD COLUMN role TEXT NOT NULL DEFAULT 'member';
    ALTER TABLE group_members ADD COLUMN muted_until INTEGER NOT NULL DEFAULT 0;
    UPDATE group_members SET role = 'owner' WHERE user_id =
        (SELECT g.owner_id FROM groups g WHERE g.id = group_members.group_id);
    ALTER TABLE groups ADD COLUMN invite_only INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE groups ADD COLUMN history_visible INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE group_bans (
        group_id INTEGER NOT NULL REFERENCES groups(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        by_id INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (group_id, user_id)
    ) WITHOUT ROWID;
    CREATE TABLE group_invites (
        code TEXT PRIMARY KEY,
        group_id INTEGER NOT NULL REFERENCES groups(id),
        created_by INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        uses_left INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX group_invites_group ON group_invites(group_id);
    CREATE TABLE group_requests (
        group_id INTEGER NOT NULL REFERENCES groups(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        created_at INTEGER NOT NULL,
        PRIMARY KEY (group_id, user_id)
    ) WITHOUT ROWID;
    CREATE TABLE blocks (
        user_id INTEGER NOT NULL REFERENCES users(id),
        blocked_id INTEGER NOT NULL REFERENCES users(id),
        created_at INTEGER NOT NULL,
        PRIMARY KEY (user_id, blocked_id)
    ) WITHOUT ROWID;
    CREATE INDEX blocks_blocked ON blocks(blocked_id);
    """,
    # 10: files and images (bitchat.files): metadata, the messages that refer to each,
    # and chunk rows (here only thumbnails: a file's bytes are under the data folder).
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        owner_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        width INTEGER NOT NULL DEFAULT 0,
        height INTEGER NOT NULL DEFAULT 0,
        has_thumbnail INTEGER NOT NULL DEFAULT 0,
        thumbnail_type TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL
    );
    CREATE INDEX files_owner ON files(owner_id);
    CREATE TABLE file_refs (
        file_id TEXT NOT NULL,
        conv TEXT NOT NULL,
        msg_id INTEGER NOT NULL,
        PRIMARY KEY (file_id, conv, msg_id)
    ) WITHOUT ROWID;
    CREATE TABLE file_chunks (
        file_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (file_id, n)
    ) WITHOUT ROWID;
    """,
    # 11: messages that live: events (edit, recall, react, unreact) are rows of messages
    # (op, target); typed messages and replies; earlier texts, reactions, delete for me.
    """
    ALTER TABLE messages ADD COLUMN op TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN target INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN type TEXT NOT NULL DEFAULT 'text';
    ALTER TABLE messages ADD COLUMN fields TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN reply_to INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN edited_at INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN recalled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN reacts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN mentions TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN no INTEGER NOT NULL DEFAULT 0;
    UPDATE messages SET no = seq;
    ALTER TABLE conversations ADD COLUMN last_no INTEGER NOT NULL DEFAULT 0;
    UPDATE conversations SET last_no = last_seq;
    CREATE TABLE mentions (
        user_id INTEGER NOT NULL,
        conv TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (user_id, conv, seq)
    ) WITHOUT ROWID;
    CREATE INDEX messages_target ON messages(target) WHERE target != 0;
    CREATE TABLE message_versions (
        msg_id INTEGER NOT NULL,
        version INTEGER NOT NULL,
        text TEXT NOT NULL,
        ts INTEGER NOT NULL,
        PRIMARY KEY (msg_id, version)
    ) WITHOUT ROWID;
    CREATE TABLE reactions (
        msg_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        emoji TEXT NOT NULL,
        ts INTEGER NOT NULL,
        PRIMARY KEY (msg_id, user_id, emoji)
    ) WITHOUT ROWID;
    CREATE TABLE hidden (
        user_id INTEGER NOT NULL,
        msg_id INTEGER NOT NULL,
        ts INTEGER NOT NULL,
        PRIMARY KEY (user_id, msg_id)
    ) WITHOUT ROWID;
    """,
]


_WAL_AUTOCHECKPOINT = 10_000
"""WAL pages after which a commit checkpoints (SQLite's default: 1,000): see _connect_writer."""


async def open_db(path: str, synchronous: str = "FULL") -> aiosqlite.Connection:
    """Open (creating the folder) and migrate the database at ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise ServiceUnavailable(f"cannot open the database {path}: {exc}") from exc
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={synchronous}")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        # A recalled message's text is overwritten on disk, not only unlinked.
        await db.execute("PRAGMA secure_delete=ON")
        # As the message writer (below): a commit here must not checkpoint sooner.
        await db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT}")
        await _migrate(db)
    except BaseException as exc:
        await db.close()
        if isinstance(exc, sqlite3.Error):
            raise ServiceUnavailable(f"cannot open the database {path}: {exc}") from exc
        raise
    return db


async def _migrate(db: aiosqlite.Connection) -> None:
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        rows = list(await db.execute_fetchall("SELECT version FROM schema_version"))
        current = rows[0][0] if rows else 0
        if not rows:
            await db.execute("INSERT INTO schema_version VALUES (0)")
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            if isinstance(script, str):
                for statement in script.split(";"):
                    if statement.strip():
                        await db.execute(statement)
            else:
                await script(db)
            await db.execute("UPDATE schema_version SET version = ?", (version,))
            log.info("database migrated to schema version %d", version)
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise


class SqliteUserCenter(UserCenter):
    """Users, tokens and groups in SQLite. Passwords are hashed with ``hasher`` (default:
    the production cost), ``hash_concurrency`` at once (0: one per core)."""

    def __init__(
        self, path: str, hasher: PasswordHasher | None = None, *, hash_concurrency: int = 0
    ) -> None:
        self.path = path
        self.passwords = Passwords(hasher, hash_concurrency)
        self._db: aiosqlite.Connection | None = None
        # This process is the only writer, so these caches are complete and current.
        self._names: dict[int, str] = {}
        self._users: dict[int, User] = {}
        self._members: dict[int, list[int]] = {}
        self._banned: set[int] = set()
        self._mutes: dict[int, dict[int, int]] = {}
        """Per group in ``_members``: its muted members (kept with it)."""
        self._blocks: dict[int, Blocks] = {}
        """Every user with a block either way (loaded at start)."""
        # One connection: writes (and their transactions) must not interleave.
        self._lock = asyncio.Lock()
        self.outbox: Outbox | None = None
        """Webhooks: membership events go into the outbox with the change (None: off)."""

    async def start(self) -> None:
        self._db = await open_db(self.path)
        for uid, name, banned_at in await self._rows("SELECT id, name, banned_at FROM users"):
            self._names[uid] = name
            if banned_at:
                self._banned.add(uid)
        mine: dict[int, set[int]] = {}
        by: dict[int, set[int]] = {}
        # (A database migrated only part of the way, in a test of an upgrade, has none.)
        has = await self._rows("SELECT 1 FROM sqlite_master WHERE name = 'blocks'")
        for uid, other in await self._rows("SELECT user_id, blocked_id FROM blocks") if has else []:
            mine.setdefault(uid, set()).add(other)
            by.setdefault(other, set()).add(uid)
        for uid in mine.keys() | by.keys():
            self._blocks[uid] = make_blocks(mine.get(uid, ()), by.get(uid, ()))

    def known_user(self, user_id: int) -> User | None:
        # Asked on every one-to-one send: hand out one User per id (names never change)
        # rather than building a frozen dataclass each time.
        user = self._users.get(user_id)
        if user is None:
            name = self._names.get(user_id)
            if name is None:
                return None
            user = self._users[user_id] = User(user_id, name)
        return user

    def known_members(self, group_id: int) -> list[int] | None:
        return self._members.get(group_id)

    def known_mutes(self, group_id: int) -> dict[int, int] | None:
        return self._mutes.get(group_id)

    def known_blocks(self, user_id: int) -> Blocks | None:
        return self._blocks.get(user_id, NO_BLOCKS)

    async def close(self) -> None:
        self.passwords.close()
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ServiceUnavailable("the user database is not open")
        return self._db

    async def _rows(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
        try:
            return list(await self.db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"user database error: {exc}") from exc

    async def register(self, name: str, password: str) -> User:
        key, shape = name_keys(name)
        digest = await self.passwords.hash(password)
        try:
            async with self._lock:
                cur = await self.db.execute(
                    "INSERT INTO users (name, name_key, name_shape, password_hash, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, key, shape, digest, time.time()),
                )
        except sqlite3.IntegrityError:
            raise taken(name) from None
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"user database error: {exc}") from exc
        user_id = cur.lastrowid
        assert user_id is not None
        self._names[user_id] = name
        return User(user_id, name)

    async def credentials(self, name: str) -> tuple[int, str, str] | None:
        # The exact name first: a user whose key a migration suffixed keeps its name.
        rows = await self._rows(
            "SELECT id, name, password_hash FROM users WHERE name = ? OR name_key = ? "
            "ORDER BY name = ? DESC LIMIT 1",
            (name, name_key(name), name),
        )
        if not rows:
            return None
        user_id, stored_name, stored = rows[0]
        self._names[user_id] = stored_name
        return user_id, stored_name, stored

    async def external_user(self, provider: str, subject: str, names: Sequence[str]) -> User:
        params = {"p": provider, "s": subject}
        query = sql.render(sql.EXTERNAL_USER, sql.Dialect.SQLITE, params)
        async with self._lock:
            rows = await self._rows(*query)
            if rows:
                self._names[rows[0][0]] = rows[0][1]
                return User(rows[0][0], rows[0][1])
            now = time.time()
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                for name in names:
                    key, shape = name_keys(name)
                    try:
                        cur = await self.db.execute(
                            "INSERT INTO users (name, name_key, name_shape, password_hash, "
                            "created_at) VALUES (?, ?, ?, ?, ?)",
                            (name, key, shape, sql.NO_PASSWORD, now),
                        )
                    except sqlite3.IntegrityError:
                        continue  # the statement alone is undone: try the next name
                    break
                else:
                    await self.db.execute("ROLLBACK")
                    raise taken(names[0] if names else "")
                user_id = cur.lastrowid
                assert user_id is not None
                await self.db.execute(
                    "INSERT INTO external_users (provider, subject, user_id, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (provider, subject, user_id, now),
                )
                await self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise ServiceUnavailable(f"user database error: {exc}") from exc
        self._names[user_id] = name
        return User(user_id, name)

    async def issue_token(self, user_id: int, ttl: float, device_id: int = 0) -> str:
        token = new_token()
        now = time.time()
        async with self._lock:
            await self._rows("DELETE FROM tokens WHERE expires_at < ?", (now,))
            await self._rows(
                "INSERT INTO tokens (digest, user_id, expires_at, device_id) VALUES (?, ?, ?, ?)",
                (token_digest(token), user_id, now + ttl, device_id or None),
            )
        return token

    async def check_token(self, token: str) -> tuple[User, int] | None:
        rows = await self._rows(
            "SELECT u.id, u.name, coalesce(t.device_id, 0) FROM tokens t "
            "JOIN users u ON u.id = t.user_id WHERE t.digest = ? AND t.expires_at > ?",
            (token_digest(token), time.time()),
        )
        return (User(rows[0][0], rows[0][1]), int(rows[0][2])) if rows else None

    async def device(self, user_id: int, name: str, max_devices: int) -> tuple[int, bool]:
        now = time.time()
        async with self._lock:
            rows = await self._rows(
                "UPDATE devices SET last_seen = ? WHERE user_id = ? AND name = ? RETURNING id",
                (now, user_id, name),
            )
            if rows:
                return int(rows[0][0]), False
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                # At the cap: the device seen longest ago goes, with its cursors and tokens.
                old = list(
                    await self.db.execute_fetchall(
                        "SELECT id FROM devices WHERE user_id = ? ORDER BY last_seen DESC, id DESC "
                        "LIMIT -1 OFFSET ?",
                        (user_id, max(0, max_devices - 1)),
                    )
                )
                for (gone,) in old:
                    await self.db.execute(
                        "DELETE FROM cursors WHERE user_id = ? AND device = ?", (user_id, gone)
                    )
                    await self.db.execute("DELETE FROM tokens WHERE device_id = ?", (gone,))
                    await self.db.execute("DELETE FROM devices WHERE id = ?", (gone,))
                cur = await self.db.execute(
                    "INSERT INTO devices (user_id, name, created_at, last_seen) "
                    "VALUES (?, ?, ?, ?)",
                    (user_id, name, now, now),
                )
                device_id = cur.lastrowid
                assert device_id is not None
                # Its cursors in the same transaction (as in PostgreSQL): a device that
                # exists has them, even if the login that registered it fails after.
                await self.db.execute(
                    *sql.render(
                        sql.START_DEVICE, sql.Dialect.SQLITE, {"u": user_id, "d": device_id}
                    )
                )
                await self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise ServiceUnavailable(f"user database error: {exc}") from exc
            return device_id, True

    async def device_name(self, user_id: int, device_id: int) -> str | None:
        rows = await self._rows(
            "SELECT name FROM devices WHERE id = ? AND user_id = ?", (device_id, user_id)
        )
        return str(rows[0][0]) if rows else None

    async def revoke_token(self, token: str) -> None:
        async with self._lock:
            await self._rows("DELETE FROM tokens WHERE digest = ?", (token_digest(token),))

    async def revoke_user_tokens(self, user_id: int) -> int:
        async with self._lock:
            rows = await self._rows("DELETE FROM tokens WHERE user_id = ? RETURNING 1", (user_id,))
        return len(rows)

    async def set_banned(self, user_id: int, banned: bool, ts: int = 0) -> bool:
        async with self._lock:
            rows = await self._rows(
                "UPDATE users SET banned_at = ? WHERE id = ? RETURNING 1",
                (max(1, ts) if banned else 0, user_id),
            )
            if rows:
                if banned:
                    self._banned.add(user_id)
                else:
                    self._banned.discard(user_id)
        return bool(rows)

    async def is_server_banned(self, user_id: int) -> bool:
        return user_id in self._banned

    async def bind_token(self, token: str, device_id: int) -> bool:
        async with self._lock:
            rows = await self._rows(
                "UPDATE tokens SET device_id = ? WHERE digest = ? AND device_id IS NULL "
                "RETURNING 1",
                (device_id, token_digest(token)),
            )
        return bool(rows)

    async def get_users(self, ids: Iterable[int]) -> dict[int, User]:
        wanted = set(ids)
        found = {i: User(i, self._names[i]) for i in wanted if i in self._names}
        missing = [i for i in wanted if i not in found]
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for uid, name in await self._rows(
                f"SELECT id, name FROM users WHERE id IN ({marks})", chunk
            ):
                self._names[uid] = name
                found[uid] = User(uid, name)
        return found

    async def touch_last_seen(self, user_ids: Sequence[int], ts: int) -> None:
        async with self._lock:
            for start in range(0, len(user_ids), 500):
                chunk = list(user_ids[start : start + 500])
                marks = ",".join("?" * len(chunk))
                await self._rows(
                    "UPDATE users SET last_seen = max(coalesce(last_seen, 0), ?) "
                    f"WHERE id IN ({marks})",
                    [ts, *chunk],
                )

    async def last_seen(self, user_ids: Iterable[int], viewer: int) -> dict[int, int]:
        ids = list(set(user_ids))
        seen: dict[int, int] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for uid, ts in await self._rows(
                f"SELECT id, last_seen FROM users WHERE id IN ({marks}) "
                "AND last_seen IS NOT NULL AND (show_last_seen OR id = ?)",
                [*chunk, viewer],
            ):
                seen[uid] = ts
        return seen

    async def set_show_last_seen(self, user_id: int, on: bool) -> None:
        async with self._lock:
            await self._rows("UPDATE users SET show_last_seen = ? WHERE id = ?", (int(on), user_id))

    async def show_last_seen(self, user_id: int) -> bool:
        rows = await self._rows("SELECT show_last_seen FROM users WHERE id = ?", (user_id,))
        return bool(rows[0][0]) if rows else True

    async def create_group(self, owner_id: int, name: str) -> Group:
        now = time.time()
        events: list[OutboxRow] = []
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                cur = await self.db.execute(
                    "INSERT INTO groups (name, owner_id, created_at) VALUES (?, ?, ?)",
                    (name, owner_id, now),
                )
                group_id = cur.lastrowid
                assert group_id is not None
                await self.db.execute(
                    "INSERT INTO group_members (group_id, user_id, joined_at, joined_id, role) "
                    "VALUES (?, ?, ?, ?, 'owner')",
                    (group_id, owner_id, now, join_id(now, group_id)),
                )
                events = self._member_events(MEMBER_ADDED, group_id, owner_id, "created")
                if events:
                    await self.db.executemany(OUTBOX_INSERT, events)
                await self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise ServiceUnavailable(f"user database error: {exc}") from exc
        self._woke(events)
        self._members[group_id] = [owner_id]
        self._mutes[group_id] = {}
        return Group(group_id, name, owner_id, 1, role="owner")

    async def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            await self.db.execute("ROLLBACK")

    async def join_group(
        self, group_id: int, user_id: int, max_size: int, *, reason: str = "joined"
    ) -> Group:
        events: list[OutboxRow] = []
        async with self._lock:
            group = await self.get_group(group_id)
            if group is None:
                raise RequestError(codes.NOT_FOUND, f"no group {group_id}")
            members = await self.group_members(group_id)
            if user_id in members:
                return group
            if await self.is_banned(group_id, user_id):
                raise RequestError(codes.BANNED, f"you are banned from group {group_id}")
            if len(members) >= max_size:
                raise RequestError(
                    codes.GROUP_FULL, f"group {group_id} has reached {max_size} members"
                )
            # A member starts at the group's last message (what came before is history),
            # or at its start where the history is visible; read up to the last either way.
            now = time.time()
            insert = (
                "INSERT INTO group_members "
                "(group_id, user_id, joined_at, joined_id, read_seq, start_seq) "
                "SELECT ?, ?, ?, ?, s, CASE WHEN ? THEN 0 ELSE s END FROM (SELECT coalesce("
                "(SELECT last_seq FROM conversations WHERE conv = ?), 0) AS s)",
                (
                    group_id,
                    user_id,
                    now,
                    join_id(now, group_id),
                    int(group.history_visible),
                    f"g:{group_id}",
                ),
            )
            request = (
                "DELETE FROM group_requests WHERE group_id = ? AND user_id = ?",
                (group_id, user_id),
            )
            steps = [insert, request]
            if not members:
                # An empty group (its owner left last) is the joiner's: someone can run it.
                steps += [
                    sql.render(statement, sql.Dialect.SQLITE, {"g": group_id})
                    for statement in sql.SUCCESSOR
                ]
                group = dataclasses.replace(group, owner_id=user_id)
            events = self._member_events(MEMBER_ADDED, group_id, user_id, reason)
            await self._transaction(steps, events)
            self._members[group_id] = sorted([*members, user_id])
        self._woke(events)
        role = "owner" if group.owner_id == user_id else "member"
        return dataclasses.replace(group, members=len(members) + 1, role=role)

    async def leave_group(self, group_id: int, user_id: int, *, reason: str = "left") -> None:
        async with self._lock:
            group = await self.get_group(group_id)
            if group is None:
                raise RequestError(codes.NOT_FOUND, f"no group {group_id}")
            forget = (
                "DELETE FROM cursors WHERE user_id = ? AND conv = ?",
                (user_id, conversation("group", 0, group_id)),
            )
            events: list[OutboxRow] = []
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                cur = await self.db.execute(
                    "DELETE FROM group_members WHERE group_id = ? AND user_id = ?",
                    (group_id, user_id),
                )
                gone = cur.rowcount
                await self.db.execute(*forget)
                if gone and group.owner_id == user_id:
                    # The group goes to the first admin, else the first member to join.
                    for statement in sql.SUCCESSOR:
                        text, params = sql.render(statement, sql.Dialect.SQLITE, {"g": group_id})
                        await self.db.execute(text, params)
                if gone:
                    # The event only if a member was removed.
                    events = self._member_events(MEMBER_REMOVED, group_id, user_id, reason)
                    if events:
                        await self.db.executemany(OUTBOX_INSERT, events)
                await self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise ServiceUnavailable(f"user database error: {exc}") from exc
            finally:
                self._members.pop(group_id, None)
                self._mutes.pop(group_id, None)
        if gone == 0:
            raise RequestError(codes.NOT_MEMBER, f"you are not in group {group_id}")
        self._woke(events)

    def _member_events(
        self, event: str, group_id: int, user_id: int, reason: str
    ) -> list[OutboxRow]:
        if self.outbox is None:
            return []
        return self.outbox.rows(event, group_key(group_id), member_data(group_id, user_id, reason))

    def _woke(self, events: list[OutboxRow]) -> None:
        if events and self.outbox is not None:
            self.outbox.written()

    async def _transaction(
        self, steps: Sequence[tuple[str, Sequence[Any]]], events: list[OutboxRow]
    ) -> None:
        """``steps`` and the outbox rows ``events`` in one transaction."""
        try:
            await self.db.execute("BEGIN IMMEDIATE")
            for statement, params in steps:
                await self.db.execute(statement, params)
            if events:
                await self.db.executemany(OUTBOX_INSERT, events)
            await self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._rollback()
            raise ServiceUnavailable(f"user database error: {exc}") from exc

    async def get_group(self, group_id: int) -> Group | None:
        rows = await self._rows(
            "SELECT g.id, g.name, g.owner_id, "
            "(SELECT count(*) FROM group_members m WHERE m.group_id = g.id), "
            "g.invite_only, g.history_visible "
            "FROM groups g WHERE g.id = ?",
            (group_id,),
        )
        return _group(rows[0]) if rows else None

    async def user_groups(self, user_id: int) -> list[Group]:
        rows = await self._rows(
            "SELECT g.id, g.name, g.owner_id, "
            "(SELECT count(*) FROM group_members m2 WHERE m2.group_id = g.id), "
            "g.invite_only, g.history_visible, m.role "
            "FROM group_members m JOIN groups g ON g.id = m.group_id "
            "WHERE m.user_id = ? ORDER BY g.id",
            (user_id,),
        )
        return [_group(r) for r in rows]

    async def group_members(self, group_id: int) -> list[int]:
        cached = self._members.get(group_id)
        if cached is not None:
            return cached
        rows = await self._rows(
            "SELECT user_id, muted_until FROM group_members WHERE group_id = ? ORDER BY user_id",
            (group_id,),
        )
        members = [r[0] for r in rows]
        if members or await self.get_group(group_id) is not None:
            self._members[group_id] = members
            self._mutes[group_id] = {r[0]: r[1] for r in rows if r[1]}
        return members

    # -- moderation ---------------------------------------------------------------------------

    async def members_info(self, group_id: int) -> list[Member]:
        rows = await self._rows(
            "SELECT user_id, role, muted_until FROM group_members WHERE group_id = ? "
            "ORDER BY user_id",
            (group_id,),
        )
        return [Member(*r) for r in rows]

    async def member(self, group_id: int, user_id: int) -> Member | None:
        rows = await self._rows(
            "SELECT user_id, role, muted_until FROM group_members "
            "WHERE group_id = ? AND user_id = ?",
            (group_id, user_id),
        )
        return Member(*rows[0]) if rows else None

    async def _change(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run the statements in one transaction; each one's row count."""
        counts: list[int] = []
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                for text, params in statements:
                    cur = await self.db.execute(text, params)
                    counts.append(cur.rowcount)
                await self.db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                await self._rollback()
                raise RequestError(codes.NOT_FOUND, f"no such user or group: {exc}") from exc
            except sqlite3.Error as exc:
                await self._rollback()
                raise ServiceUnavailable(f"user database error: {exc}") from exc
        return counts

    async def set_role(self, group_id: int, user_id: int, role: str) -> None:
        statements: list[tuple[str, Sequence[Any]]] = []
        if role == "owner":
            # The old owner (whoever holds the role) becomes an admin.
            statements.append(
                (
                    "UPDATE group_members SET role = 'admin' WHERE group_id = ? "
                    "AND role = 'owner' AND user_id != ? AND EXISTS (SELECT 1 FROM "
                    "group_members WHERE group_id = ? AND user_id = ?)",
                    (group_id, user_id, group_id, user_id),
                )
            )
            statements.append(
                (
                    "UPDATE groups SET owner_id = ? WHERE id = ? AND EXISTS (SELECT 1 FROM "
                    "group_members WHERE group_id = ? AND user_id = ?)",
                    (user_id, group_id, group_id, user_id),
                )
            )
        statements.append(
            (
                "UPDATE group_members SET role = ? WHERE group_id = ? AND user_id = ?",
                (role, group_id, user_id),
            )
        )
        counts = await self._change(statements)
        if not counts[-1]:
            raise RequestError(codes.NOT_MEMBER, f"user {user_id} is not in group {group_id}")

    async def set_muted(self, group_id: int, user_id: int, until: int) -> None:
        [n] = await self._change(
            [
                (
                    "UPDATE group_members SET muted_until = ? WHERE group_id = ? AND user_id = ?",
                    (until, group_id, user_id),
                )
            ]
        )
        if not n:
            raise RequestError(codes.NOT_MEMBER, f"user {user_id} is not in group {group_id}")
        mutes = self._mutes.get(group_id)
        if mutes is not None:
            if until:
                mutes[user_id] = until
            else:
                mutes.pop(user_id, None)

    async def set_ban(self, group_id: int, user_id: int, by_id: int, on: bool) -> bool:
        statement: tuple[str, Sequence[Any]]
        if on:
            statement = (
                "INSERT INTO group_bans (group_id, user_id, by_id, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (group_id, user_id, by_id, _now_ms()),
            )
        else:
            statement = (
                "DELETE FROM group_bans WHERE group_id = ? AND user_id = ?",
                (group_id, user_id),
            )
        [n] = await self._change([statement])
        return n > 0

    async def is_banned(self, group_id: int, user_id: int) -> bool:
        return bool(
            await self._rows(
                "SELECT 1 FROM group_bans WHERE group_id = ? AND user_id = ?", (group_id, user_id)
            )
        )

    async def set_group_options(
        self, group_id: int, invite_only: bool | None, history_visible: bool | None
    ) -> Group:
        await self._change(
            [
                (
                    "UPDATE groups SET invite_only = coalesce(?, invite_only), "
                    "history_visible = coalesce(?, history_visible) WHERE id = ?",
                    (
                        None if invite_only is None else int(invite_only),
                        None if history_visible is None else int(history_visible),
                        group_id,
                    ),
                )
            ]
        )
        group = await self.get_group(group_id)
        if group is None:
            raise RequestError(codes.NOT_FOUND, f"no group {group_id}")
        return group

    async def add_invite(self, invite: Invite, created_by: int, most: int) -> None:
        now = _now_ms()
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                await self.db.execute(
                    "DELETE FROM group_invites WHERE group_id = ? "
                    "AND (expires_at <= ? OR uses_left = 0)",
                    (invite.group_id, now),
                )
                [(n,)] = await self.db.execute_fetchall(
                    "SELECT count(*) FROM group_invites WHERE group_id = ?", (invite.group_id,)
                )
                if n >= most:
                    await self._rollback()
                    raise RequestError(
                        codes.FORBIDDEN, f"a group may have at most {most} open invites"
                    )
                await self.db.execute(
                    "INSERT INTO group_invites "
                    "(code, group_id, created_by, created_at, expires_at, uses_left) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        invite.code,
                        invite.group_id,
                        created_by,
                        now,
                        invite.expires_at,
                        invite.max_uses or -1,
                    ),
                )
                await self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise ServiceUnavailable(f"user database error: {exc}") from exc

    async def use_invite(self, code: str, group_id: int, now_ms: int) -> bool:
        [n] = await self._change(
            [
                (
                    "UPDATE group_invites SET uses_left = "
                    "CASE WHEN uses_left > 0 THEN uses_left - 1 ELSE uses_left END "
                    "WHERE code = ? AND group_id = ? AND expires_at > ? AND uses_left != 0",
                    (code, group_id, now_ms),
                )
            ]
        )
        return n > 0

    async def add_join_request(self, group_id: int, user_id: int, now_ms: int, most: int) -> bool:
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                rows = await self.db.execute_fetchall(
                    "SELECT count(*), coalesce(sum(user_id = ?), 0) FROM group_requests "
                    "WHERE group_id = ?",
                    (user_id, group_id),
                )
                [(n, mine)] = list(rows)
                if mine:
                    await self._rollback()
                    return False
                if n >= most:
                    await self._rollback()
                    raise RequestError(
                        codes.FORBIDDEN, f"group {group_id} has {most} join requests waiting"
                    )
                await self.db.execute(
                    "INSERT INTO group_requests (group_id, user_id, created_at) VALUES (?, ?, ?)",
                    (group_id, user_id, now_ms),
                )
                await self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise ServiceUnavailable(f"user database error: {exc}") from exc
        return True

    async def join_requests(self, group_id: int) -> list[tuple[int, int]]:
        rows = await self._rows(
            "SELECT user_id, created_at FROM group_requests WHERE group_id = ? "
            "ORDER BY created_at, user_id",
            (group_id,),
        )
        return [(int(r[0]), int(r[1])) for r in rows]

    async def drop_join_request(self, group_id: int, user_id: int) -> bool:
        [n] = await self._change(
            [
                (
                    "DELETE FROM group_requests WHERE group_id = ? AND user_id = ?",
                    (group_id, user_id),
                )
            ]
        )
        return n > 0

    async def set_block(self, user_id: int, other_id: int, on: bool, most: int) -> bool:
        current = self._blocks.get(user_id, NO_BLOCKS)
        if on == (other_id in current.mine):
            return False
        if on and len(current.mine) >= most:
            raise RequestError(codes.FORBIDDEN, f"a user may block at most {most} users")
        statement: tuple[str, Sequence[Any]]
        if on:
            statement = (
                "INSERT INTO blocks (user_id, blocked_id, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (user_id, other_id, _now_ms()),
            )
        else:
            statement = (
                "DELETE FROM blocks WHERE user_id = ? AND blocked_id = ?",
                (user_id, other_id),
            )
        await self._change([statement])
        me, other = self._blocks.get(user_id, NO_BLOCKS), self._blocks.get(other_id, NO_BLOCKS)
        if on:
            self._blocks[user_id] = make_blocks(me.mine | {other_id}, me.by)
            self._blocks[other_id] = make_blocks(other.mine, other.by | {user_id})
        else:
            self._blocks[user_id] = make_blocks(me.mine - {other_id}, me.by)
            self._blocks[other_id] = make_blocks(other.mine, other.by - {user_id})
        return True

    async def blocks(self, user_id: int) -> Blocks:
        return self._blocks.get(user_id, NO_BLOCKS)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _group(row: Sequence[Any]) -> Group:
    """A Group of ``(id, name, owner_id, members, invite_only, history_visible[, role])``."""
    role = str(row[6]) if len(row) > 6 else ""
    return Group(row[0], row[1], row[2], int(row[3]), bool(row[4]), bool(row[5]), role)


OUTBOX_INSERT = (
    "INSERT INTO webhook_outbox (event_id, endpoint, type, order_key, body, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
"""One :data:`~bitchat.webhooks.OutboxRow` into the outbox."""
_INSERT_OUTBOX = (
    "INSERT INTO webhook_outbox (event_id, endpoint, type, order_key, body, created_at) "
    "SELECT * FROM (VALUES {rows}) WHERE column1 IS NOT NULL"
)
_OUTBOX_ROWS = 160
"""Outbox rows (6 values) per statement."""
_MESSAGE_ROWS = 52
"""Message rows per INSERT statement (19 variables each: under SQLite's oldest limit of 999)."""
_PAIR_ROWS = 400
"""Rows of two values per statement."""
_CONV_ROWS = 112
"""Conversation rows (8 values) per statement."""
_CURSOR_ROWS = 200
"""Cursor rows (4 values) per statement."""
# Plain INSERT: retries are found before (a numbered row is never skipped silently).
_INSERT_MESSAGES = (
    f"INSERT INTO messages ({sql.INSERT_COLUMNS}) "
    "SELECT * FROM (VALUES {rows}) WHERE column1 IS NOT NULL"
)
# One row per conversation of a batch: its counter moves on by the batch's count, and a
# sender's read position to their own last message (SET sees the row as it was).
_BUMP_CONVERSATIONS = (
    "INSERT INTO conversations (conv, last_seq, lo, hi, last_id, lo_read, hi_read, last_no) "
    "SELECT * FROM (VALUES {rows}) WHERE column1 IS NOT NULL "
    "ON CONFLICT (conv) DO UPDATE SET last_seq = last_seq + excluded.last_seq, "
    "last_no = last_no + excluded.last_no, "
    "last_id = max(last_id, excluded.last_id), "
    "lo_read = CASE WHEN excluded.lo_read > 0 THEN last_seq + excluded.lo_read ELSE lo_read END, "
    "hi_read = CASE WHEN excluded.hi_read > 0 THEN last_seq + excluded.hi_read ELSE hi_read END "
    "RETURNING conv, last_seq, last_no"
)
_READ_OWN_GROUP = (
    "UPDATE group_members SET read_seq = max(read_seq, v.column3) "
    "FROM (SELECT * FROM (VALUES {rows}) WHERE column1 IS NOT NULL) AS v "
    "WHERE group_members.group_id = v.column1 AND group_members.user_id = v.column2"
)
# A join from the keys (not a row-value IN, which scans the whole index).
_FIND_RETRIES = (
    f"SELECT {', '.join('m.' + c for c in sql.MSG_COLUMNS)} "
    "FROM (VALUES {rows}) AS d CROSS JOIN messages m "
    "ON m.sender_id = d.column1 AND m.client_msg_id = d.column2 AND m.client_msg_id != ''"
)
_MOVE_CURSORS = (
    "INSERT INTO cursors (user_id, conv, device, seq) "
    "SELECT * FROM (VALUES {rows}) WHERE column1 IS NOT NULL "
    "ON CONFLICT (user_id, conv, device) DO UPDATE SET seq = max(seq, excluded.seq)"
)


def _erase_recalled(db: sqlite3.Connection, stores: list[_Store]) -> None:
    """After a batch with a recall: checkpoint the WAL and truncate it, so the recalled
    text (overwritten in the database file: secure_delete) leaves the log as well."""
    if any(store[0].op == "recall" for store in stores):
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # the next checkpoint gets it; the text is cleared
            log.warning("the WAL checkpoint after a recall failed: %s", exc)


@functools.cache
def _statement(sql: str, width: int, rows: int) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return sql.format(rows=",".join([row] * rows))


def _write_rows(db: sqlite3.Connection, sql: str, width: int, flat: list[Any], chunk: int) -> int:
    """Run ``sql`` over ``flat`` (rows of ``width`` values, laid end to end); rows changed.

    A few statements of a few fixed sizes (``chunk`` rows, a quarter of that, and
    so on down to under 8), the last one padded with rows of NULLs that the
    statement skips: every statement is compiled once and then found in sqlite3's
    statement cache, and each is one GIL release (sqlite3 releases the GIL around
    every step, and taking it back waits for a busy event loop).
    """
    changed = 0
    for statement, params in _chunked(sql, width, flat, chunk):
        changed += db.execute(statement, params).rowcount
    return changed


def _chunked(sql: str, width: int, flat: list[Any], chunk: int) -> Iterator[tuple[str, list[Any]]]:
    """The statements and parameters :func:`_write_rows` and :func:`_read_rows` run."""
    n = len(flat) // width
    pos = 0
    while pos < n:
        left = n - pos
        size = chunk
        while size > 8 and size // 4 >= left:
            size //= 4
        take = min(size, left)
        params = flat[pos * width : (pos + take) * width]
        if take < size:
            params += [None] * ((size - take) * width)
        yield _statement(sql, width, size), params
        pos += take


def _read_rows(
    db: sqlite3.Connection, sql: str, width: int, flat: list[Any], chunk: int
) -> list[Any]:
    """As :func:`_write_rows`, for a statement that returns rows: all of them."""
    out: list[Any] = []
    for statement, params in _chunked(sql, width, flat, chunk):
        out += db.execute(statement, params).fetchall()
    return out


_ROW_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.DataError,
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,  # a value of a type SQLite does not bind
    OverflowError,  # an integer over 64 bits
    ValueError,  # a string that does not encode (a lone surrogate)
    TypeError,
)
"""Errors of one row's data (not of the database): the batch is written again row by row."""

_Store = tuple[Message, Sequence[int], "asyncio.Future[tuple[Message, bool]] | StoreCallback"]
_Outcome = tuple[Message, bool] | BaseException
"""A store's result: ``(message, duplicate)``, or the error it alone gets."""
_Batch = tuple[list[_Store], list[AckJob]]


class SqliteMessageCenter(sql.SqlReads, MessageCenter):
    """Messages and pending deliveries, written in batches.

    Each batch is one transaction, run whole on a writer thread of its own with
    a plain ``sqlite3`` connection, in a few multi-row statements. The event
    loop hands the thread what one loop iteration queued, in one piece; the
    thread commits whatever is waiting when it is free (up to ``batch_max``
    messages) and hands the results back, in one piece, without waiting for the
    loop between two batches.
    """

    def __init__(
        self,
        path: str,
        batch_max: int = 512,
        synchronous: str = "FULL",
        ack_batch_max: int = 4096,
    ) -> None:
        self.path = path
        self.batch_max = batch_max
        self.ack_batch_max = max(1, ack_batch_max)
        self.synchronous = synchronous
        self._loop: asyncio.AbstractEventLoop | None = None
        # Reads go through their own connection: with WAL they see only committed
        # data, never a batch the writer is in the middle of.
        self._rdb: aiosqlite.Connection | None = None
        # Queued during this loop iteration; handed to the writer by _hand_over.
        self._stores: list[_Store] = []
        self._acks: list[AckJob] = []
        self._handing_over = False
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._closing = False
        self._marking = asyncio.Lock()
        self.outbox: Outbox | None = None
        """Webhooks: each stored message's event goes into the outbox in its batch's
        transaction (None: off, and the batch does nothing more)."""

    async def start(self) -> None:
        self._rdb = await open_db(self.path, self.synchronous)  # creates and migrates
        self._loop = loop = asyncio.get_running_loop()
        self._queue = queue.SimpleQueue()
        self._stopped = loop.create_future()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="bitchat-sqlite-writer", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            await self._rdb.close()
            self._rdb = None
            self._thread = None
            raise
        self._closing = False

    def _connect_writer(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("PRAGMA secure_delete=ON")  # a recall leaves no text behind
            # Room for the hot index pages (they fill only as the store grows).
            db.execute("PRAGMA cache_size=-32768")
            # Checkpoint every 10,000 WAL pages (40 MiB) rather than 1,000: a batch
            # dirties hundreds of index pages, and between two checkpoints each hot
            # page is copied back to the database once however often it was
            # rewritten. Commits are still fsynced (synchronous is unchanged).
            db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT}")
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"cannot open the database {self.path}: {exc}") from exc
        return db

    async def close(self) -> None:
        if self._thread is not None and not self._closing:
            self._closing = True
            self._hand_over()  # what this iteration queued is written before the end
            self._queue.put(None)
        self._closing = True
        if self._stopped is not None:
            await self._stopped
            self._stopped = None
        self._thread = None
        if self._rdb is not None:
            await self._rdb.close()
        self._rdb = None

    @property
    def db(self) -> aiosqlite.Connection:
        """The connection reads go through (writes have their own thread)."""
        if self._rdb is None:
            raise ServiceUnavailable("the message database is not open")
        return self._rdb

    # -- writes (group commit) ----------------------------------------------------------------

    def store(
        self, message: Message, recipients: Sequence[int]
    ) -> asyncio.Future[tuple[Message, bool]]:
        # The loop saved at start: get_running_loop() costs a getpid() call per message.
        fut: asyncio.Future[tuple[Message, bool]] = (
            self._loop or asyncio.get_running_loop()
        ).create_future()
        self.store_then(message, recipients, fut)
        return fut

    def store_then(
        self,
        message: Message,
        recipients: Sequence[int],
        then: StoreCallback | asyncio.Future[tuple[Message, bool]],
    ) -> None:
        if self._closing or self._thread is None:
            err = ServiceUnavailable("the message store is closed")
            if isinstance(then, asyncio.Future):
                then.set_exception(err)
            else:
                then(None, err)
            return
        self._stores.append((message, recipients, then))
        if not self._handing_over:
            self._handing_over = True
            # After every request this iteration read: one hand-over for all of them.
            self._loop.call_soon(self._hand_over)  # type: ignore[union-attr]

    def ack(
        self, user_id: int, device_id: int, cursors: Sequence[tuple[str, int]]
    ) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = (self._loop or asyncio.get_running_loop()).create_future()
        if self._closing or self._thread is None:
            fut.set_exception(ServiceUnavailable("the message store is closed"))
            return fut
        self._acks.append(AckJob(user_id, device_id, cursors, fut))
        if not self._handing_over:
            self._handing_over = True
            self._loop.call_soon(self._hand_over)  # type: ignore[union-attr]
        return fut

    def _hand_over(self) -> None:
        """Queue this iteration's stores and acks for the writer thread (on the loop)."""
        self._handing_over = False
        stores, acks = self._stores, self._acks
        if not stores and not acks:
            return
        self._stores, self._acks = [], []
        step = self.batch_max
        put = self._queue.put
        put((stores[:step], acks))
        for start in range(step, len(stores), step):
            put((stores[start : start + step], []))

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        """The writer thread: commit what is queued, batch after batch, until None."""
        try:
            db = self._connect_writer()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        get, get_nowait = self._queue.get, self._queue.get_nowait
        # Acks wait here, oldest first: each batch takes at most ack_batch_max ids, and
        # every message queued meanwhile, so no ack flood holds a message back.
        backlog: collections.deque[AckJob] = collections.deque()
        carry: _Batch | None = None
        stopping = False
        try:
            while True:
                first: _Batch | None
                if carry is not None:
                    first, carry = carry, None
                elif stopping:
                    first = ([], [])
                elif backlog:
                    try:
                        first = get_nowait()
                    except queue.Empty:
                        first = ([], [])
                else:
                    first = get()
                if first is None:
                    stopping, first = True, ([], [])
                stores, jobs = first
                backlog.extend(jobs)
                # Group commit: everything that queued up meanwhile, up to batch_max.
                while not stopping and len(stores) < self.batch_max:
                    try:
                        more = get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    if len(stores) + len(more[0]) > self.batch_max:
                        carry = more
                        break
                    stores = stores + more[0]
                    backlog.extend(more[1])
                acks, waiters, partial = take_acks(backlog, self.ack_batch_max)
                if stores or acks or waiters:
                    outcomes, ack_error = self._write(db, stores, acks)
                    if stores and self.outbox is not None:
                        self._call(self.outbox.written)
                    if ack_error is not None and partial is not None:
                        backlog.popleft()  # its rest is dropped: its waiter fails now
                        waiters.append(partial.waiter)
                    self._call(self._finish, stores, outcomes, waiters, ack_error)
                if stopping and carry is None and not backlog:
                    break
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.close()
            self._call(self._thread_done)

    def _write(
        self, db: sqlite3.Connection, stores: list[_Store], acks: list[int]
    ) -> tuple[list[_Outcome], BaseException | None]:
        """Write one batch: each store's outcome, and the acks' error (None: written)."""
        try:
            return list(self._write_batch(db, stores, acks)), None
        except _ROW_ERRORS as exc:
            log.warning(
                "a batch of %d messages and %d acks failed (%s); writing its rows one by one",
                len(stores),
                len(acks) // 4,
                exc,
            )
        except Exception as exc:
            return self._failed(stores, exc)
        try:
            return self._write_each(db, stores, acks)
        except Exception as exc:
            return self._failed(stores, exc)

    @staticmethod
    def _failed(
        stores: list[_Store], exc: BaseException
    ) -> tuple[list[_Outcome], BaseException | None]:
        log.error("writing %d messages failed: %s", len(stores), exc)
        error = ServiceUnavailable(f"the message store failed: {exc}")
        return [error] * len(stores), error

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(fn, *args)

    def _thread_done(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    @staticmethod
    def _finish(
        stores: list[_Store],
        outcomes: list[_Outcome],
        waiters: list[asyncio.Future[None]],
        ack_error: BaseException | None,
    ) -> None:
        """Resolve one committed (or failed) batch, in queueing order (on the loop)."""
        for (_, _, then), outcome in zip(stores, outcomes, strict=True):
            failed = isinstance(outcome, BaseException)
            if isinstance(then, asyncio.Future):
                if not then.done():
                    if failed:
                        then.set_exception(outcome)  # type: ignore[arg-type]
                    else:
                        then.set_result(outcome)  # type: ignore[arg-type]
                continue
            try:
                if failed:
                    then(None, outcome)  # type: ignore[arg-type]
                else:
                    then(outcome, None)  # type: ignore[arg-type]
            except Exception:
                log.exception("a callback of a stored message failed")
        for w in waiters:
            if not w.done():
                if ack_error is None:
                    w.set_result(None)
                else:
                    w.set_exception(ack_error)

    def _write_batch(
        self, db: sqlite3.Connection, stores: list[_Store], acks: list[int]
    ) -> list[tuple[Message, bool]]:
        """One group-commit transaction, on the writer thread (touches no future).

        ``acks`` are ``(user_id, conv, device_id, seq)`` cursor rows laid end to end.
        """
        db.execute("BEGIN IMMEDIATE")
        try:
            results = self._insert(db, stores) if stores else []
            if acks:
                _write_rows(db, _MOVE_CURSORS, 4, acks, _CURSOR_ROWS)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        _erase_recalled(db, stores)
        return results

    def _write_each(
        self, db: sqlite3.Connection, stores: list[_Store], acks: list[int]
    ) -> tuple[list[_Outcome], BaseException | None]:
        """The batch again in one transaction, each row in a savepoint of its own: a
        row whose data the database refuses fails alone."""
        outcomes: list[_Outcome] = []
        ack_error: BaseException | None = None
        db.execute("BEGIN IMMEDIATE")
        try:
            for store in stores:
                db.execute("SAVEPOINT one_row")
                try:
                    outcomes += self._insert(db, [store])
                except _ROW_ERRORS as exc:
                    db.execute("ROLLBACK TO one_row")
                    m = store[0]
                    log.warning("message %d of user %d refused: %s", m.id, m.sender_id, exc)
                    outcomes.append(refused(exc))
                db.execute("RELEASE one_row")
            if acks:
                db.execute("SAVEPOINT acks")
                try:
                    _write_rows(db, _MOVE_CURSORS, 4, acks, _CURSOR_ROWS)
                except _ROW_ERRORS as exc:
                    db.execute("ROLLBACK TO acks")
                    ack_error = ServiceUnavailable(f"the acks could not be stored: {exc}")
                db.execute("RELEASE acks")
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        _erase_recalled(db, stores)
        return outcomes, ack_error

    def _insert(self, db: sqlite3.Connection, stores: list[_Store]) -> list[tuple[Message, bool]]:
        """Number and insert messages (in the caller's transaction, so a rolled-back row
        gives its seq back)."""
        results: list[tuple[Message, bool]] = [(m, False) for m, _, _ in stores]
        fresh, repeats = first_of_each(stores)
        # Optimistic: a retry of a stored message is rare, so the batch is numbered and
        # inserted as it is; the dedup index refuses a retry, and only then are the
        # originals looked up and the batch numbered again without them.
        db.execute("SAVEPOINT fresh")
        try:
            try:
                self._number_and_insert(db, [stores[i][0] for i in fresh], self.outbox)
            except sqlite3.IntegrityError:
                db.execute("ROLLBACK TO fresh")
                fresh = self._drop_retries(db, stores, results, fresh)
                self._number_and_insert(db, [stores[i][0] for i in fresh], self.outbox)
        finally:
            db.execute("RELEASE fresh")
        for i, first in repeats.items():
            results[i] = (results[first][0], True)
        return results

    @staticmethod
    def _drop_retries(
        db: sqlite3.Connection,
        stores: list[_Store],
        results: list[tuple[Message, bool]],
        fresh: list[int],
    ) -> list[int]:
        """The indexes of ``fresh`` that are not retries of a stored message; a retry's
        result becomes the original (it keeps the seq it was stored with)."""
        keys: list[Any] = []
        for i in fresh:
            m = stores[i][0]
            if m.client_msg_id:
                keys += (m.sender_id, m.client_msg_id)
        if not keys:
            return fresh
        originals = {
            (o.sender_id, o.client_msg_id): o
            for o in map(sql.message, _read_rows(db, _FIND_RETRIES, 2, keys, _PAIR_ROWS))
        }
        kept = []
        for i in fresh:
            m = stores[i][0]
            o = originals.get((m.sender_id, m.client_msg_id)) if m.client_msg_id else None
            if o is None:
                kept.append(i)
            else:
                results[i] = (o, True)
        return kept

    def _number_and_insert(
        self, db: sqlite3.Connection, msgs: list[Message], outbox: Outbox | None
    ) -> None:
        """Give ``msgs`` the next seqs of their conversations and insert them (and
        their ``message.stored`` events into the outbox, if webhooks want them)."""
        if not msgs:
            return
        convs = [m.conversation_key for m in msgs]
        counts = conversation_counts(convs)
        order = id_order(msgs)
        reads = read_offsets(msgs, convs, order)
        numbers = message_counts(msgs, convs)
        flat_counts: list[Any] = []
        for c, n in counts.items():
            lo, hi, last_id, lo_off, hi_off = reads[c]
            flat_counts += (c, n, lo, hi, last_id, lo_off, hi_off, numbers.get(c, 0))
        bumped = _read_rows(db, _BUMP_CONVERSATIONS, 8, flat_counts, _CONV_ROWS)
        last = {r[0]: r[1] for r in bumped}
        number(msgs, convs, counts, last, order, {r[0]: r[2] for r in bumped}, numbers)
        flat: list[Any] = []
        own: dict[tuple[int, int], int] = {}
        changes: list[Message] = []
        for m, conv in zip(msgs, convs, strict=True):
            flat += (
                m.id,
                m.kind,
                conv,
                m.sender_id,
                m.sender_name,
                m.to,
                m.text,
                m.ts,
                m.client_msg_id,
                m.seq,
                m.device,
                m.op,
                m.target,
                m.type,
                m.fields,
                m.reply_to,
                m.edited_at,
                m.mentions,
                m.no,
            )
            if m.op or m.mentions:
                changes.append(m)
            if m.op:
                continue  # an event moves no read position
            if m.kind == "group" and own.get((m.to, m.sender_id), 0) < m.seq:
                own[m.to, m.sender_id] = m.seq
        _write_rows(db, _INSERT_MESSAGES, 19, flat, _MESSAGE_ROWS)
        for m in changes:  # events: the change they make, in the same transaction
            for statement, params in sql.event_statements(m, self.keep_versions):
                db.execute(statement, params)
        if outbox is not None:
            changes = [m for m in changes if m.op]
        if outbox is not None and (changes or outbox.wants(MESSAGE_STORED)):
            event_rows = outbox.rows
            events: list[Any] = []
            for m, conv in zip(msgs, convs, strict=True):
                kind = sql.webhook_event(m)
                if kind and outbox.wants(kind):
                    for row in event_rows(kind, conv, m.to_dict()):
                        events += row
            if events:
                _write_rows(db, _INSERT_OUTBOX, 6, events, _OUTBOX_ROWS)
        if own:
            rows: list[Any] = []
            for (group_id, sender), seq in own.items():
                rows += (group_id, sender, seq)
            _write_rows(db, _READ_OWN_GROUP, 3, rows, _PAIR_ROWS // 2)

    # -- reads --------------------------------------------------------------------------------

    async def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[Any]:
        if self._rdb is None:
            raise ServiceUnavailable("the message database is not open")
        try:
            return list(await self._rdb.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"message database error: {exc}") from exc

    async def _query(self, sql_text: str, **params: Any) -> list[Any]:
        return await self._rows(*sql.render(sql_text, sql.Dialect.SQLITE, params))

    async def _read(self, doing: str, query: str, **params: Any) -> list[Any]:
        return await self._query(query, **params)

    async def start_device(self, user_id: int, device_id: int) -> None:
        # SqliteUserCenter.device did this in the transaction that registered the device;
        # again, it changes nothing (no cursor is moved).
        await self._query(sql.START_DEVICE, u=user_id, d=device_id)

    async def mark_read(self, user_id: int, conv: str, seq: int) -> tuple[int, int, list[int]]:
        # One at a time: two marks at once would both read the old position and both
        # report the range between (its senders told twice).
        async with self._marking:
            return await self._mark_read(user_id, conv, seq)

    async def _mark_read(self, user_id: int, conv: str, seq: int) -> tuple[int, int, list[int]]:
        if p2p_pair(conv) is not None:
            found = await self._query(sql.P2P_READ, u=user_id, c=conv)
            if not found:
                return 0, 0, []
            rows = await self._query(sql.P2P_MARK_READ, u=user_id, c=conv, seq=seq)
        else:
            group_id = int(conv[2:])
            found = await self._query(sql.GROUP_READ, u=user_id, g=group_id)
            if not found:
                return 0, 0, []
            last = await self._query(sql.LAST_SEQ, c=conv)
            last_seq = int(last[0][0]) if last else 0
            moved = await self._query(
                sql.GROUP_MARK_READ, u=user_id, g=group_id, seq=seq, last=last_seq
            )
            rows = [(moved[0][0], last_seq)] if moved else []
        if not rows:
            return 0, 0, []
        old, (read_seq, last_seq) = int(found[0][0]), (int(rows[0][0]), int(rows[0][1]))
        senders: list[int] = []
        if read_seq > old:
            found_senders = await self._query(
                sql.SENDERS_BETWEEN, c=conv, after=old, upto=read_seq, u=user_id
            )
            senders = [int(r[0]) for r in found_senders]
        return read_seq, last_seq, senders
