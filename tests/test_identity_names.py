"""Look-alike names are refused (issue 10, item 8): NFKC, no default-ignorable code
points, one user per confusable skeleton and case fold; the schema change in both
stores, upgraded from databases written by the previous schema version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest

from bitchat import RequestError, codes
from bitchat.cluster import pg
from bitchat.cluster.pg import PgDatabase, PgMessageCenter, PgUserCenter
from bitchat.im import sqlite as store
from bitchat.im.names import dedupe_keys, name_key, name_keys, name_shape, normalize_name
from bitchat.im.passwords import make_hasher
from bitchat.im.sqlite import SqliteMessageCenter, SqliteUserCenter
from cluster_support import cluster_settings, pg_dsn_fixture  # noqa: F401 (fixture)
from im_helpers import FAST_HASH, clients_of, im_server

HASHER = make_hasher(FAST_HASH["password_hash_time_cost"], FAST_HASH["password_hash_memory_kib"])

CGJ = "\u034f"  # COMBINING GRAPHEME JOINER: draws as nothing
LOOK_ALIKES = [
    "Houyi",
    "HOUYI",
    "houy\u0456",  # Cyrillic i
    "h\u043euyi",  # Cyrillic o
    "\uff48\uff4f\uff55\uff59\uff49",  # fullwidth: NFKC makes it houyi itself
    "ho\u0301uyi",  # a combining accent
    "h\u00f3uyi",  # the same, precomposed
    "hou\u0323yi",  # a dot below
    "h0uyi",  # zero for o
    "h\u03bfuyi",  # Greek omicron
]


def test_names_are_normalized_and_invisible_characters_refused() -> None:
    assert normalize_name(" \uff48\uff4f\uff55\uff59\uff49 ", 32) == "houyi"
    assert normalize_name("ho\u0301uyi", 32) == "h\u00f3uyi"
    assert normalize_name("后羿", 32) == "后羿"
    for bad in (f"houyi{CGJ}", "hou\u200byi", "\u3164houyi", "houyi\ufe0f", "hou\u00adyi"):
        with pytest.raises(RequestError) as info:
            normalize_name(bad, 32)
        assert info.value.code == codes.INVALID_PACKET, bad
    with pytest.raises(RequestError):
        normalize_name("a b", 32)
    with pytest.raises(RequestError):
        normalize_name("x" * 33, 32)


def test_look_alikes_share_a_key_and_others_do_not() -> None:
    houyi = name_keys("houyi")
    for name in LOOK_ALIKES:
        mine = name_keys(normalize_name(name, 32))
        assert mine[0] == houyi[0] or mine[1] == houyi[1], name
    # The classic one: capital I for l only looks alike before the case fold.
    assert name_shape("PayPaI") == name_shape("paypal")
    assert name_key("rn") == name_key("m")
    for other in ("gris", "houyi2", "后羿", "hou_yi", "houy"):
        assert name_keys(other)[0] != houyi[0] and name_keys(other)[1] != houyi[1], other


def test_colliding_keys_of_existing_users_get_a_suffix() -> None:
    rows = [(1, "houyi"), (2, "gris"), (5, "Houyi"), (7, "HOUYI")]
    assert dedupe_keys(rows) == [
        (1, "houyi", "houyi"),
        (2, "gris", "gris"),
        (5, "houyi #5", "houyi #5"),
        (7, "houyi #7", "houyl"),  # I is l before the case fold: no collision there
    ]


async def test_a_server_refuses_look_alikes_on_every_path(tmp_path: Path) -> None:
    # No login throttle here: the wrong passwords are on purpose.
    async with im_server(tmp_path, login_delay=0.0) as server, clients_of(server) as clients:
        owner = await clients.connect()
        assert (await owner.register("houyi", "right")).name == "houyi"
        im = await clients.connect()
        for name in LOOK_ALIKES:
            for attempt in (im.register, im.login):  # login would auto-register
                with pytest.raises(RequestError) as info:
                    await attempt(name, "other")
                # The fullwidth name and the case variants are houyi: a wrong password.
                assert info.value.code in (codes.NAME_TAKEN, codes.LOGIN_FAILED), name
        for attempt in (im.register, im.login):
            with pytest.raises(RequestError) as info:
                await attempt(f"houyi{CGJ}", "other")
            assert info.value.code == codes.INVALID_PACKET
        # Logging in by a name of the same key is logging in as houyi.
        for name in ("HOUYI", "\uff48\uff4f\uff55\uff59\uff49"):
            ok = await (await clients.connect()).login(name, "right")
            assert (ok.user_id, ok.name) == (1, "houyi")
        # Nothing was registered beside houyi.
        assert (await im.register("gris", "pw")).id == 2


# -- upgrading a database written by schema version 1 ---------------------------------------

SQLITE_V1 = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
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
"""
"""Schema version 1 as that version created it (a frozen copy, not the code's)."""

# What version 1 let in: names stripped, nothing else (the fullwidth one as typed).
OLD_USERS = ["houyi", "gris", "Houyi", "\uff48\uff4f\uff55\uff59\uff49"]
OLD_MESSAGES = [  # id, kind, conv, sender, sender name, to, text, ts
    (1 << 22, "p2p", "p:1:2", 2, "gris", 1, "hello,houyi", 1000),
    (2 << 22, "p2p", "p:1:3", 3, "Houyi", 1, "it is me", 1001),
]


def old_password_hash() -> str:
    return HASHER.hash("pw")


def write_sqlite_v1(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(SQLITE_V1)
        digest = old_password_hash()
        db.executemany(
            "INSERT INTO users (name, password_hash, created_at) VALUES (?, ?, 0)",
            [(n, digest) for n in OLD_USERS],
        )
        db.executemany(
            "INSERT INTO messages (id, kind, conv, sender_id, sender_name, to_id, text, ts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            OLD_MESSAGES,
        )
        db.execute("INSERT INTO pending VALUES (1, ?)", (OLD_MESSAGES[0][0],))
        db.commit()
    finally:
        db.close()


async def check_upgraded(users: SqliteUserCenter | PgUserCenter, messages: object) -> None:
    """What every store must show after the upgrade of OLD_USERS and OLD_MESSAGES."""
    found = await users.get_users([1, 2, 3, 4])
    assert [found[i].name for i in (1, 2, 3, 4)] == OLD_USERS
    # Each logs in by its exact name; a name of houyi's key is houyi.
    for user_id, name in enumerate(OLD_USERS, start=1):
        assert (await users.authenticate(name, "pw", False)).id == user_id
    assert (await users.authenticate("HOUYI", "pw", False)).id == 1
    history = await messages.history(1, 3, 0, 0, 10)  # type: ignore[attr-defined]
    assert [m.text for m in history] == ["it is me"]
    # The pending delivery is kept: a new device of the user gets it.
    await messages.start_device(1, 101)  # type: ignore[attr-defined]
    pending = await messages.pending(1, 101, 0, 10)  # type: ignore[attr-defined]
    assert [m.id for m in pending] == [OLD_MESSAGES[0][0]]
    # Collisions are refused from now on; other names are not.
    for name in ("houy\u0456", "HouYi", "gr\u0456s"):
        with pytest.raises(RequestError) as info:
            await users.register(name, "pw")
        assert info.value.code == codes.NAME_TAKEN, name
    assert (await users.register("chang-e", "pw")).name == "chang-e"


async def test_sqlite_upgrades_a_version_1_database(tmp_path: Path) -> None:
    path = tmp_path / "bitchat.db"
    write_sqlite_v1(path)
    users = SqliteUserCenter(str(path), HASHER)
    messages = SqliteMessageCenter(str(path))
    await users.start()
    await messages.start()
    try:
        [(version,)] = await users.db.execute_fetchall("SELECT version FROM schema_version")
        assert version == len(store.MIGRATIONS)
        keys = await users.db.execute_fetchall(
            "SELECT id, name_key, name_shape FROM users ORDER BY id"
        )
        assert [tuple(r) for r in keys] == [
            (1, "houyi", "houyi"),
            (2, "gris", "gris"),
            (3, "houyi #3", "houyi #3"),  # the later of two colliding users
            (4, "houyi #4", "houyi #4"),
        ]
        await check_upgraded(users, messages)
    finally:
        await messages.close()
        await users.close()


PG_V1 = [
    """CREATE TABLE schema_version (version INTEGER NOT NULL)""",
    """INSERT INTO schema_version VALUES (1)""",
    """CREATE TABLE users (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE tokens (
        digest TEXT PRIMARY KEY,
        user_id BIGINT NOT NULL REFERENCES users(id),
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE INDEX tokens_expires ON tokens(expires_at)""",
    """CREATE TABLE groups (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL,
        owner_id BIGINT NOT NULL REFERENCES users(id),
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE group_members (
        group_id BIGINT NOT NULL REFERENCES groups(id),
        user_id BIGINT NOT NULL REFERENCES users(id),
        joined_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (group_id, user_id)
    )""",
    """CREATE INDEX group_members_user ON group_members(user_id)""",
    """CREATE TABLE messages (
        id BIGINT PRIMARY KEY,
        kind TEXT NOT NULL,
        conv TEXT NOT NULL,
        sender_id BIGINT NOT NULL,
        sender_name TEXT NOT NULL,
        to_id BIGINT NOT NULL,
        text TEXT NOT NULL,
        ts BIGINT NOT NULL,
        client_msg_id TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE INDEX messages_conv ON messages(conv, id)""",
    """CREATE UNIQUE INDEX messages_dedup ON messages(sender_id, client_msg_id)
        WHERE client_msg_id <> ''""",
    """CREATE INDEX messages_node ON messages(((id >> 12) & 1023), id)""",
    """CREATE TABLE pending (
        user_id BIGINT NOT NULL,
        msg_id BIGINT NOT NULL,
        PRIMARY KEY (user_id, msg_id)
    )""",
]
"""Schema version 1 of PostgreSQL as that version created it (a frozen copy)."""


async def test_postgresql_upgrades_a_version_1_database(pg_dsn: str) -> None:
    con = await asyncpg.connect(pg_dsn)
    try:
        for statement in PG_V1:
            await con.execute(statement)
        digest = old_password_hash()
        for name in OLD_USERS:
            await con.execute(
                "INSERT INTO users (name, password_hash, created_at) VALUES ($1, $2, 0)",
                name,
                digest,
            )
        await con.executemany(
            "INSERT INTO messages (id, kind, conv, sender_id, sender_name, to_id, text, ts) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            OLD_MESSAGES,
        )
        await con.execute("INSERT INTO pending VALUES (1, $1)", OLD_MESSAGES[0][0])
    finally:
        await con.close()

    db = PgDatabase(pg_dsn, cluster_settings())
    users = PgUserCenter(db, HASHER)
    messages = PgMessageCenter(db)
    await users.start()
    await messages.start()
    try:
        con = await asyncpg.connect(pg_dsn)
        try:
            assert await con.fetchval("SELECT version FROM schema_version") == len(pg.MIGRATIONS)
            keys = await con.fetch("SELECT id, name_key, name_shape FROM users ORDER BY id")
            assert [tuple(r) for r in keys] == [
                (1, "houyi", "houyi"),
                (2, "gris", "gris"),
                (3, "houyi #3", "houyi #3"),
                (4, "houyi #4", "houyi #4"),
            ]
            # Every later insert must carry the keys.
            with pytest.raises(asyncpg.NotNullViolationError):
                await con.execute(
                    "INSERT INTO users (name, password_hash, created_at) VALUES ('x', 'h', 0)"
                )
        finally:
            await con.close()
        await check_upgraded(users, messages)
    finally:
        await messages.close()
        await users.close()
