"""JWT login through a real server: HS256, RS256 and ES256 keys, a JWKS file that
rotates, every refusal with its cause, users created at the first login (names
made free), password logins off, a pluggable Authenticator, the stores' upgrade
to schema version 6; standalone (SQLite) and cluster (PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bitchat import RequestError, Server, codes
from bitchat.app import build_server
from bitchat.cluster import pg
from bitchat.cluster.pg import PgDatabase, PgUserCenter
from bitchat.im import sql
from bitchat.im import sqlite as store
from bitchat.im.auth import Authenticator, Identity, JwtAuthenticator, login_failed
from bitchat.im.client import IMClient
from bitchat.im.packets import Login, LoginOk
from bitchat.im.sqlite import SqliteUserCenter
from cluster_support import (  # noqa: F401 (fixtures)
    cluster_settings,
    node_maker,
    pg_dsn_fixture,
    redis_prefix_fixture,
)
from conftest import WAIT
from im_helpers import (
    PYTHON,
    Clients,
    clients_of,
    free_port,
    im_server,
    im_settings,
    port_of,
    subprocess_env,
)
from test_im_sync_client import drop_connection

SECRET = "a-secret-of-the-product-backend-32+bytes"


def token(
    key: Any = SECRET, alg: str = "HS256", headers: dict[str, Any] | None = None, **claims: Any
) -> str:
    """A JWT as a backend signs it: ``exp`` in an hour unless given."""
    body: dict[str, Any] = {"exp": int(time.time()) + 3600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, alg, headers)


async def refused(im: IMClient, credential: str) -> str:
    """The message of the login_failed a JWT login gets."""
    with pytest.raises(RequestError) as info:
        await im.login(jwt=credential)
    assert info.value.code == codes.LOGIN_FAILED, info.value
    assert im.user is None
    return info.value.message


@contextlib.asynccontextmanager
async def serve(data_dir: Path, **changes: Any) -> AsyncIterator[tuple[Server, Clients]]:
    """A standalone server with ``changes``, and clients of it."""
    async with im_server(data_dir, **changes) as server, clients_of(server) as c:
        yield server, c


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "alg": "RS256", "use": "sig"}


def write_jwks(path: Path, keys: list[dict[str, Any]]) -> None:
    """Replace the file whole, as a rotation should (write, then rename)."""
    part = path.with_suffix(".part")
    part.write_text(json.dumps({"keys": keys}), encoding="utf-8")
    os.replace(part, path)


# -- HS256 --------------------------------------------------------------------------------


async def test_a_good_hs256_jwt_logs_in_and_the_same_subject_is_the_same_user(
    tmp_path: Path,
) -> None:
    async with im_server(tmp_path, jwt_secret=SECRET) as server, clients_of(server) as c:
        phone = await c.connect(device="phone")
        ok = await phone.login(jwt=token(sub="u-42", name="Ada Lovelace"))
        assert (ok.user_id, ok.name, ok.device) == (1, "Ada_Lovelace", "phone")
        assert ok.token and phone.user is not None and phone.user.name == "Ada_Lovelace"
        # Another device, another token for the same subject: the same user.
        laptop = await c.connect(device="laptop")
        again = await laptop.login(jwt=token(sub="u-42", name="Someone Else"))
        assert (again.user_id, again.name) == (1, "Ada_Lovelace")
        assert again.token != ok.token
        # The login token works as after a password login, and the user can chat.
        third = await c.connect()
        back = await third.login(token=ok.token)
        assert (back.user_id, back.device) == (1, "phone")
        bob = await c.connect()
        assert (await bob.login(jwt=token(sub="u-7", name="bob"))).user_id == 2
        assert (await bob.send_p2p(1, "hi Ada")).seq == 1
        # A password login cannot take the JWT user's account: it has no password.
        stranger = await c.connect()
        with pytest.raises(RequestError) as info:
            await stranger.login("Ada_Lovelace", "")
        assert info.value.code in (codes.LOGIN_FAILED, codes.INVALID_PACKET)
        with pytest.raises(RequestError) as info:
            await stranger.login("Ada_Lovelace", "guess")
        assert info.value.code == codes.LOGIN_FAILED


async def test_every_refusal_says_why(tmp_path: Path) -> None:
    settings = {"jwt_secret": SECRET, "jwt_issuer": "https://backend", "jwt_audience": "chat"}
    good = {"sub": "u-1", "name": "ada", "iss": "https://backend", "aud": "chat"}
    async with im_server(tmp_path, **settings) as server, clients_of(server) as c:
        im = await c.connect()
        past = int(time.time()) - 3600
        assert "expired" in await refused(im, token(**{**good, "exp": past}))
        # Within the leeway (30 s by default) an expired token still passes.
        assert "bad signature" in await refused(
            im, token("another-secret-of-at-least-32-bytes", **good)
        )
        assert "wrong audience" in await refused(im, token(**{**good, "aud": "other"}))
        assert "wrong issuer" in await refused(im, token(**{**good, "iss": "https://evil"}))
        assert "'aud' claim" in await refused(im, token(**{**good, "aud": None}))
        assert "'iss' claim" in await refused(im, token(**{**good, "iss": None}))
        assert "'sub' claim" in await refused(im, token(**{**good, "sub": None}))
        assert "'exp' claim" in await refused(
            im, jwt.encode({k: v for k, v in good.items()}, SECRET, "HS256")
        )
        assert "malformed" in await refused(im, "not.a.jwt")
        rs = token(rsa_key(), "RS256", **good)
        assert "no key is configured for RS256" in await refused(im, rs)
        # The connection may still log in.
        ok = await im.login(jwt=token(**{**good, "exp": int(time.time()) - 5}))
        assert ok.name == "ada"


async def test_no_key_configured(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        im = await c.connect()
        why = await refused(im, token(sub="u-1", name="ada"))
        assert "no key is configured" in why and "jwt_secret" in why


async def test_an_over_long_jwt_is_refused_by_its_limit(tmp_path: Path) -> None:
    async with serve(tmp_path, jwt_secret=SECRET, max_jwt_length=200) as (_, c):
        im = await c.connect()
        with pytest.raises(RequestError) as info:
            await im.login(jwt=token(sub="u-1", name="x" * 300))
        assert info.value.code == codes.INVALID_PACKET


# -- public keys --------------------------------------------------------------------------


async def test_rs256_and_es256_with_a_key_file(tmp_path: Path) -> None:
    rsa_private = rsa_key()
    (tmp_path / "rsa.pem").write_bytes(public_pem(rsa_private))
    ec_private = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(public_pem(ec_private))
    async with serve(tmp_path, jwt_public_key_file=str(tmp_path / "rsa.pem")) as (_, c):
        im = await c.connect()
        assert "bad signature" in await refused(im, token(rsa_key(), "RS256", sub="u-1"))
        # An HMAC token signed with the public key as its secret (alg confusion).
        assert "no key is configured for HS256" in await refused(
            im, token(public_pem(rsa_private).decode()[:64], "HS256", sub="u-1")
        )
        ok = await im.login(jwt=token(rsa_private, "RS256", sub="u-1", name="rita"))
        assert ok.name == "rita"
    async with serve(tmp_path, jwt_public_key_file=str(tmp_path / "ec.pem")) as (_, c):
        im = await c.connect()
        assert "not its key's" in await refused(im, token(rsa_private, "RS256", sub="u-1"))
        ok = await im.login(jwt=token(ec_private, "ES256", sub="u-2", name="ella"))
        assert (ok.user_id, ok.name) == (2, "ella")


async def test_a_bad_key_file_stops_the_server_at_start(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a key", encoding="utf-8")
    server = build_server(
        im_settings(
            tmp_path, host="127.0.0.1", port=0, jwt_public_key_file=str(tmp_path / "bad.pem")
        )
    )
    with pytest.raises(Exception, match="jwt_public_key_file"):
        await server.start()
    await server.stop()


async def test_a_jwks_file_rotates_without_a_restart(tmp_path: Path) -> None:
    old, new = rsa_key(), rsa_key()
    path = tmp_path / "jwks.json"
    write_jwks(path, [jwk(old, "k1")])
    async with im_server(tmp_path, jwt_jwks_file=str(path)) as server, clients_of(server) as c:
        auth = server.data["im"].authenticator
        assert isinstance(auth, JwtAuthenticator) and auth.jwks_reads == 1
        im = await c.connect()
        ok = await im.login(jwt=token(old, "RS256", {"kid": "k1"}, sub="u-1", name="ada"))
        assert ok.user_id == 1
        signed_new = token(new, "RS256", {"kid": "k2"}, sub="u-2", name="bob")
        assert "kid 'k2'" in await refused(await c.connect(), signed_new)
        # An unknown kid in an unchanged file does not read it again.
        assert auth.jwks_reads == 1
        # The backend rotates: k2 joins, then k1 leaves; no restart.
        write_jwks(path, [jwk(old, "k1"), jwk(new, "k2")])
        assert (await (await c.connect()).login(jwt=signed_new)).user_id == 2
        assert auth.jwks_reads == 2
        # A k1 signature under the k2 kid is a bad signature, not a key of its own.
        forged = token(old, "RS256", {"kid": "k2"}, sub="u-2", name="bob")
        assert "bad signature" in await refused(await c.connect(), forged)
        write_jwks(path, [jwk(new, "k2")])
        late = token(old, "RS256", {"kid": "k1"}, sub="u-1")
        # k1 is still known until a kid the set lacks makes it read the file again.
        assert (await (await c.connect()).login(jwt=late)).user_id == 1
        newer = rsa_key()
        write_jwks(path, [jwk(new, "k2"), jwk(newer, "k3")])
        assert (
            await (await c.connect()).login(jwt=token(newer, "RS256", {"kid": "k3"}, sub="u-3"))
        ).name == "u-3"  # no name claim: the subject's
        assert "kid 'k1'" in await refused(await c.connect(), late)


# -- names and password logins ------------------------------------------------------------


async def test_a_taken_name_gets_a_suffix(tmp_path: Path) -> None:
    async with serve(tmp_path, jwt_secret=SECRET, max_name_length=8) as (_, c):
        await c.login("alice", "pw")
        names = []
        for n in range(3):
            im = await c.connect()
            names.append((await im.login(jwt=token(sub=f"s{n}", name="Alice"))).name)
        # "Alice" is too like "alice"; then the first free suffix.
        assert names == ["Alice-2", "Alice-3", "Alice-4"]
        im = await c.connect()
        # Cut to fit max_name_length, suffix included; spaces become "_".
        assert (await im.login(jwt=token(sub="long", name="Grace Hopper"))).name == "Grace_Ho"
        im = await c.connect()
        assert (await im.login(jwt=token(sub="long2", name="Grace Hopper"))).name == "Grace_-2"


async def test_password_login_off(tmp_path: Path) -> None:
    async with serve(tmp_path, jwt_secret=SECRET, password_login=False) as (_, c):
        im = await c.connect()
        with pytest.raises(RequestError) as info:
            await im.register("houyi", "123456")
        assert info.value.code == codes.FORBIDDEN
        assert "password" in info.value.message
        with pytest.raises(RequestError) as info:
            await im.login("houyi", "123456")
        assert info.value.code == codes.LOGIN_FAILED
        assert "password logins are off" in info.value.message
        ok = await im.login(jwt=token(sub="u-1", name="houyi"))
        # Reconnects log in with the token, which still works.
        other = await c.connect()
        assert (await other.login(token=ok.token)).user_id == ok.user_id


async def test_relogin_after_a_reconnect_uses_the_token(tmp_path: Path) -> None:
    async with serve(tmp_path, jwt_secret=SECRET, password_login=False) as (_, c):
        im = await c.connect()
        ok = await im.login(jwt=token(sub="u-1", name="ada"))
        relogged: asyncio.Future[LoginOk | None] = asyncio.get_running_loop().create_future()
        im.on_relogin(lambda ok, err: relogged.done() or relogged.set_result(ok))
        drop_connection(im)
        again = await asyncio.wait_for(relogged, WAIT)
        assert again is not None and (again.user_id, again.device) == (ok.user_id, ok.device)


class Tickets(Authenticator):
    """A scheme of its own: ``ticket:<id>:<name>``."""

    provider = "tickets"

    def __init__(self) -> None:
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def authenticate(self, credential: str) -> Identity:
        kind, _, rest = credential.partition(":")
        if kind != "ticket":
            raise login_failed("not a ticket")
        subject, _, name = rest.partition(":")
        return Identity(self.provider, subject, name)


async def test_an_authenticator_of_your_own(tmp_path: Path) -> None:
    tickets = Tickets()
    server = build_server(im_settings(tmp_path, host="127.0.0.1", port=0), authenticator=tickets)
    async with server, clients_of(server) as c:
        assert tickets.started and server.data["im"].authenticator is tickets
        im = await c.connect()
        assert "not a ticket" in await refused(im, "nope")
        ok = await im.login(jwt="ticket:7:zoe")
        assert ok.name == "zoe"
        assert (await (await c.connect()).login(jwt="ticket:7:other")).user_id == ok.user_id


# -- cluster: PostgreSQL ------------------------------------------------------------------


async def test_cluster_nodes_share_jwt_users(redis_prefix: str, pg_dsn: str) -> None:
    clients: list[IMClient] = []

    async def connect(server: Server) -> IMClient:
        im = IMClient("127.0.0.1", port_of(server), cluster_settings())
        clients.append(im)
        await im.connect(WAIT)
        return im

    try:
        async with node_maker(redis_prefix, pg_dsn) as make:
            a = await make(1, jwt_secret=SECRET)
            b = await make(2, jwt_secret=SECRET)
            first = await (await connect(a)).login(jwt=token(sub="u-1", name="ada"))
            second = await (await connect(b)).login(jwt=token(sub="u-1", name="ignored"))
            assert (first.user_id, first.name) == (second.user_id, second.name)
            # First logins of one subject on both nodes at once: one user (each of a few
            # subjects, so the transactions do overlap).
            for n in range(4):
                ims = [await connect(node) for node in (a, b, a, b)]
                oks = await asyncio.gather(
                    *(im.login(jwt=token(sub=f"u-2{n}", name=f"bob{n}")) for im in ims)
                )
                assert len({ok.user_id for ok in oks}) == 1 and oks[0].name == f"bob{n}"
            # A taken name in PostgreSQL too.
            await (await connect(a)).login("carol", "pw")
            taken = await (await connect(b)).login(jwt=token(sub="u-3", name="Carol"))
            assert taken.name == "Carol-2"
            async with a.data["im"].users.db.connection() as con:
                assert await con.fetchval("SELECT count(*) FROM external_users") == 6
                assert await con.fetchval("SELECT count(*) FROM users") == 7
    finally:
        for im in clients:
            await im.close()


# -- the upgrade from version 5 -----------------------------------------------------------


async def test_sqlite_upgrades_a_version_5_database(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    users = SqliteUserCenter(str(path))
    saved = store.MIGRATIONS[:]
    store.MIGRATIONS[:] = saved[:5]
    try:
        await users.start()
        alice = await users.register("alice", "pw")
    finally:
        store.MIGRATIONS[:] = saved
        await users.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(5,)]
        assert not db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'external_users'"
        ).fetchall()
    finally:
        db.close()
    users = SqliteUserCenter(str(path))
    await users.start()
    try:
        [(version,)] = await users.db.execute_fetchall("SELECT version FROM schema_version")
        assert version == len(store.MIGRATIONS) == sql.SCHEMA_VERSION
        assert (await users.credentials("alice") or (0,))[0] == alice.id
        ada = await users.external_user("jwt", "u-1", ["alice", "alice-2"])
        assert ada.name == "alice-2" and ada.id != alice.id
        assert await users.external_user("jwt", "u-1", ["x"]) == ada
    finally:
        await users.close()


async def test_postgresql_upgrades_a_version_5_database(pg_dsn: str) -> None:
    con = await asyncpg.connect(pg_dsn)
    try:
        async with con.transaction():
            await con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            await con.execute("INSERT INTO schema_version VALUES (5)")
            for script in pg.MIGRATIONS[:5]:
                assert isinstance(script, str) or callable(script)
                if isinstance(script, str):
                    await con.execute(script)
                else:
                    await script(con)
            await con.execute(
                "INSERT INTO users (name, password_hash, created_at, name_key, name_shape) "
                "VALUES ('alice', 'x', 0, 'alice', 'alice')"
            )
            assert await con.fetchval("SELECT to_regclass('external_users')") is None
    finally:
        await con.close()
    users = PgUserCenter(PgDatabase(pg_dsn, cluster_settings()))
    await users.start()
    try:
        async with users.db.connection() as c:
            assert await c.fetchval("SELECT version FROM schema_version") == sql.SCHEMA_VERSION
        assert len(pg.MIGRATIONS) == sql.SCHEMA_VERSION
        ada = await users.external_user("jwt", "u-1", ["alice", "alice-2"])
        assert ada.name == "alice-2"
        assert await users.external_user("jwt", "u-1", ["x"]) == ada
    finally:
        await users.close()


async def test_a_login_packet_carries_the_jwt() -> None:
    p = Login(jwt="abc", device="d1")
    assert Login.from_dict(p.to_dict()) == p


async def test_bitchat_server_takes_jwt_secret_on_the_command_line(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bitchat",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "data"),
        "--jwt-secret",
        SECRET,
        "--jwt-audience",
        "chat",
        "--no-password-login",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    assert proc.stderr is not None
    try:

        async def started() -> None:
            while b"bitchat server started on" not in await proc.stderr.readline():  # type: ignore[union-attr]
                assert proc.returncode is None

        await asyncio.wait_for(started(), 4 * WAIT)
        async with IMClient("127.0.0.1", port, im_settings(tmp_path)) as im:
            assert "wrong audience" in await refused(im, token(sub="u-1", aud="other"))
            ok = await im.login(jwt=token(sub="u-1", name="ada", aud="chat"))
            assert (ok.user_id, ok.name) == (1, "ada")
            with pytest.raises(RequestError) as info:
                await im.register("bob", "pw")
            assert info.value.code == codes.FORBIDDEN
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 4 * WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_readme_jwt_example(tmp_path: Path, capsys: Any) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Log in with a JWT from your backend", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    namespace: dict[str, Any] = {"__name__": "readme_jwt_example"}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    changes = {"jwt_secret": namespace["SECRET"], "jwt_audience": "chat"}
    async with im_server(tmp_path, **changes) as server:
        await namespace["main"]("127.0.0.1", port_of(server))
    [line] = capsys.readouterr().out.splitlines()
    assert line == "1 Ada_Lovelace"
    assert f"it prints `{line}`" in section
