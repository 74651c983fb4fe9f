"""The SQL both stores share (bitchat.im.sql): each dialect's rendering, and the
schema every database has after its migrations, fresh or upgraded from version 1,
in SQLite and in PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from bitchat.cluster.pg import PgDatabase
from bitchat.im import sql
from bitchat.im.sqlite import open_db
from cluster_support import cluster_settings, pg_dsn_fixture  # noqa: F401 (fixture)
from test_identity_names import PG_V1, write_sqlite_v1


def test_each_dialect_gets_its_own_parameters_and_functions() -> None:
    query = "SELECT GREATEST(a, :x), LEAST(b, :y), c::bigint FROM t WHERE d = :x AND e = 'g:'"
    # ("::" casts and a colon inside a string are left alone.)
    text, args = sql.render(query, sql.Dialect.POSTGRES, {"x": 1, "y": 2})
    assert (
        text == "SELECT GREATEST(a, $1), LEAST(b, $2), c::bigint FROM t WHERE d = $1 AND e = 'g:'"
    )
    assert args == [1, 2]
    text, params = sql.render(query, sql.Dialect.SQLITE, {"x": 1, "y": 2})
    assert text == "SELECT max(a, :x), min(b, :y), c::bigint FROM t WHERE d = :x AND e = 'g:'"
    assert params == {"x": 1, "y": 2}


async def _sqlite_tables(path: Path) -> dict[str, tuple[str, ...]]:
    db = await open_db(str(path))
    try:
        names = await db.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        tables = {}
        for (name,) in names:
            cols = await db.execute_fetchall(f"SELECT name FROM pragma_table_info('{name}')")
            tables[str(name)] = tuple(str(c[0]) for c in cols)
        version = await db.execute_fetchall("SELECT version FROM schema_version")
        assert list(version) == [(sql.SCHEMA_VERSION,)]
        return tables
    finally:
        await db.close()


async def test_sqlite_has_the_shared_schema_fresh_and_upgraded(tmp_path: Path) -> None:
    assert await _sqlite_tables(tmp_path / "fresh.db") == sql.SCHEMA
    old = tmp_path / "old.db"
    write_sqlite_v1(old)
    assert await _sqlite_tables(old) == sql.SCHEMA


async def _pg_tables(dsn: str) -> dict[str, tuple[str, ...]]:
    db = PgDatabase(dsn, cluster_settings())
    await db.open()  # migrates
    await db.close()
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        )
        assert await con.fetchval("SELECT version FROM schema_version") == sql.SCHEMA_VERSION
    finally:
        await con.close()
    tables: dict[str, tuple[str, ...]] = {}
    for r in rows:
        tables[r["table_name"]] = (*tables.get(r["table_name"], ()), r["column_name"])
    return tables


async def test_postgresql_has_the_shared_schema_upgraded(pg_dsn: str) -> None:
    con = await asyncpg.connect(pg_dsn)
    try:
        for statement in PG_V1:
            await con.execute(statement)
    finally:
        await con.close()
    assert await _pg_tables(pg_dsn) == sql.SCHEMA


async def test_postgresql_has_the_shared_schema_fresh(pg_dsn: str) -> None:
    assert await _pg_tables(pg_dsn) == sql.SCHEMA
